"""Fitness policies: what a candidate is scored on and how what comes back becomes its fitness."""
