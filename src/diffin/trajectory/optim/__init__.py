"""Optimizer rules: one module per ``torch.optim`` class, one registry (docs/method.md §4.3)."""

from . import adam, sgd  # noqa: F401 - importing registers the rules
from .base import OptimizerRule, State, get_rule

__all__ = ["OptimizerRule", "State", "get_rule"]
