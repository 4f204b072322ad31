"""Estimators, one module each, registered by name on :class:`Estimator`.

| name                 | module                 | needs                      |
|----------------------|------------------------|----------------------------|
| diffin               | diffin_auto.py         | picks exact / expected     |
| diffin-exact         | diffin_sweep.py        | batch ids, optimizer rule  |
| diffin-frozen        | diffin_sweep.py        | batch ids, optimizer rule  |
| diffin-expected      | diffin_sweep.py        | optimizer rule             |
| diffin-closed-form   | diffin_closed_form.py  | checkpoints, lrs; SGD only |
| tracin               | tracin.py              | checkpoints, learning rates|
| tracin-every-step    | tracin.py              | batch ids, optimizer rule  |
| if-cg, if-lissa      | influence_function.py  | final parameters           |
| grad-dot, grad-cos   | gradient_similarity.py | final parameters           |

"Optimizer rule": the run's optimizer has a rule in :mod:`diffin.trajectory.optim` (SGD, Adam,
AdamW; with parameter groups, clipping and accumulation).
"""

from . import (  # noqa: F401  (registration)
    diffin_auto,
    diffin_closed_form,
    diffin_retrain,
    diffin_sweep,
    gradient_similarity,
    influence_function,
    tracin,
)
from .base import (
    Estimator,
    EstimatorOutput,
    ScoringContext,
    available_methods,
    get_estimator,
)

__all__ = ["Estimator", "EstimatorOutput", "ScoringContext", "available_methods", "get_estimator"]
