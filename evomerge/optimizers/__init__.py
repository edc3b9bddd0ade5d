"""Optimizers over plain vectors (ask/tell); they know nothing about models or recipes."""

from evomerge.optimizers.cmaes import CMAES
from evomerge.optimizers.m2n2 import M2N2
from evomerge.optimizers.optuna_opt import OptunaOptimizer
from evomerge.optimizers.protocol import Ask, Optimizer

__all__ = ["Ask", "CMAES", "M2N2", "OptunaOptimizer", "Optimizer"]
