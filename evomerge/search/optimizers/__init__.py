"""Optimizers over plain vectors (ask/tell); they know nothing about models or recipes."""

from evomerge.search.optimizers.cmaes import CMAES
from evomerge.search.optimizers.m2n2 import M2N2
from evomerge.search.optimizers.optuna_opt import OptunaOptimizer
from evomerge.search.optimizers.protocol import Ask, Optimizer

__all__ = ["Ask", "CMAES", "M2N2", "OptunaOptimizer", "Optimizer"]
