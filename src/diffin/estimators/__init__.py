"""Estimators, one module each, registered by name on :class:`Estimator`.

| name                 | module                 | needs                      |
|----------------------|------------------------|----------------------------|
| diffin               | diffin_sweep.py        | picks exact / expected     |
| diffin-exact         | diffin_sweep.py        | batch ids, SGD             |
| diffin-frozen        | diffin_sweep.py        | batch ids, SGD             |
| diffin-expected      | diffin_sweep.py        | SGD                        |
| diffin-closed-form   | diffin_closed_form.py  | checkpoints, learning rates|
| tracin               | tracin.py              | checkpoints, learning rates|
| tracin-every-step    | tracin.py              | batch ids, SGD             |
| if-cg, if-lissa      | influence_function.py  | final parameters           |
| grad-dot, grad-cos   | gradient_similarity.py | final parameters           |
"""

from . import (  # noqa: F401  (registration)
    diffin_closed_form,
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
