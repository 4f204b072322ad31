"""diffin: which training samples helped or hurt a PyTorch model, and by how much.

Diff-In (Tan et al., 2025): a sample's influence as the cumulative sum of its step-to-step
changes, each a Hessian–vector product from finite differences of gradients.

    loader = DataLoader(diffin.with_ids(dataset), batch_size=64, shuffle=True)  # (ids, x, y)
    rec = diffin.Recorder("runs/x", model, optimizer=opt, checkpoint_every=50)
    ... for ids, x, y in loader: ... rec.step(ids) after every optimizer step ...; rec.close()
    scores = diffin.influence("runs/x", model, loss_fn, train=dataset, target=(Xv, Yv))
"""

from ._api import ScoreResult, influence, score
from ._data import loader, memmap_arrays, with_ids
from ._errors import (
    BatchLossUnsupportedError,
    BatchLossWeightsWarning,
    ConfigError,
    DataMismatchError,
    DatasetIdError,
    DiffinError,
    DistributedError,
    EmbeddingNotFoundError,
    FrozenWeightsMismatchError,
    LossShapeError,
    MissingOptimizerStateError,
    ModelCallError,
    NonFiniteDataError,
    OutputExistsError,
    RecordingError,
    ResumeMismatchError,
    TrainModeError,
    TrainModeWarning,
    UnknownMethodError,
    UnstableInfluenceWarning,
    UnsupportedMethodError,
    UnsupportedOptimizerWarning,
    UnsupportedTrainingError,
    UntrainedRowsWarning,
)
from ._functional import BatchLoss, batch_loss
from ._self_horizon import SelfInfluence, self_influence
from ._verify import VerifyResult, verify
from ._version import __version__
from .config import ScoreConfig
from .embedding import EmbedConfig, Embedding, embed, load_embedding
from .estimators import Estimator, available_methods
from .recording import PartialRunWarning, Recorder, Run, load_run, restore_checkpoint
from .trajectory import ReplayDriftWarning


def methods() -> dict[str, str]:
    """Registered estimator names with one-line summaries."""
    return available_methods()


__all__ = [
    "BatchLoss",
    "BatchLossUnsupportedError",
    "BatchLossWeightsWarning",
    "ConfigError",
    "DataMismatchError",
    "DatasetIdError",
    "DiffinError",
    "DistributedError",
    "EmbedConfig",
    "Embedding",
    "EmbeddingNotFoundError",
    "FrozenWeightsMismatchError",
    "Estimator",
    "LossShapeError",
    "MissingOptimizerStateError",
    "ModelCallError",
    "NonFiniteDataError",
    "OutputExistsError",
    "ResumeMismatchError",
    "PartialRunWarning",
    "Recorder",
    "ReplayDriftWarning",
    "RecordingError",
    "Run",
    "ScoreConfig",
    "ScoreResult",
    "SelfInfluence",
    "TrainModeError",
    "TrainModeWarning",
    "UnknownMethodError",
    "UnstableInfluenceWarning",
    "UnsupportedMethodError",
    "UnsupportedOptimizerWarning",
    "UnsupportedTrainingError",
    "UntrainedRowsWarning",
    "VerifyResult",
    "__version__",
    "batch_loss",
    "embed",
    "influence",
    "load_embedding",
    "load_run",
    "loader",
    "memmap_arrays",
    "methods",
    "restore_checkpoint",
    "score",
    "self_influence",
    "verify",
    "with_ids",
]
