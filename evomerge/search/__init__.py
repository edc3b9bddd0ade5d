"""Search: spaces that map plain vectors to recipes (parameter, method choice, data-flow, piecewise), the
optimizers that ask and are told over those vectors, and the fitness policies that decide what a candidate is
scored on. It builds no model and runs no worker."""
