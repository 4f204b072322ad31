"""diffin: which training samples helped or hurt a PyTorch model, and by how much.

Diff-In (Tan et al., 2025): a sample's influence as the cumulative sum of its step-to-step
changes, each a Hessian–vector product from finite differences of gradients.

    rec = diffin.Recorder("runs/x", model, optimizer=opt, checkpoint_every=50)
    ... rec.step(ids, lr=...) after every optimizer step ...; rec.close()
    scores = diffin.influence("runs/x", model, loss_fn, train=(X, Y), target=(Xv, Yv))
"""

from ._api import ScoreResult, influence, score
from ._errors import (
    ConfigError,
    DataMismatchError,
    DiffinError,
    RecordingError,
    UnknownMethodError,
    UnsupportedMethodError,
)
from ._version import __version__
from .config import ScoreConfig
from .estimators import Estimator, available_methods
from .recording import Recorder, Run, load_run


def methods() -> dict[str, str]:
    """Registered estimator names with one-line summaries."""
    return available_methods()


__all__ = [
    "ConfigError",
    "DataMismatchError",
    "DiffinError",
    "Estimator",
    "Recorder",
    "RecordingError",
    "Run",
    "ScoreConfig",
    "ScoreResult",
    "UnknownMethodError",
    "UnsupportedMethodError",
    "__version__",
    "influence",
    "load_run",
    "methods",
    "score",
]
