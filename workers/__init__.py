"""Code that runs on worker nodes: long-lived state (sources, a resident model) that builds candidates.

Workers import `evomerge` (methods, plans, builder) but never the optimizers or the controller's ledger.
"""
