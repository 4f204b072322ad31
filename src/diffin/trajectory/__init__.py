"""A recorded run's dynamics (checkpoints with optimizer state, batches, one step, replay) and
the optimizer rules with their adjoints (docs/method.md §4.3)."""

from ._trajectory import (
    ReplayDriftWarning,
    TrainState,
    Trajectory,
    check_rule,
    optimizer_groups,
    rule_hyper,
)

__all__ = ["ReplayDriftWarning", "TrainState", "Trajectory", "check_rule", "optimizer_groups", "rule_hyper"]
