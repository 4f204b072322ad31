"""Named exceptions. Every user-facing failure raises a subclass of :class:`DiffinError`
with a message that says what is wrong and what to do about it."""

from __future__ import annotations


class DiffinError(Exception):
    """Base class of every error diffin raises on purpose."""


class ConfigError(DiffinError, ValueError):
    """A configuration value is out of range or inconsistent."""


# --- recordings -------------------------------------------------------------------------------
class RecordingError(DiffinError):
    """Something is wrong with a recorded training run (while recording or loading it)."""


class RunExistsError(RecordingError, FileExistsError):
    """The run folder already holds a recording and overwriting was not asked for."""


class RunNotFoundError(RecordingError, FileNotFoundError):
    """The run folder or its manifest does not exist."""


class IncompleteRunError(RecordingError):
    """The run folder holds checkpoints but no manifest (it stopped before its first checkpoint was
    written); record it again."""


class MissingFileError(RecordingError, FileNotFoundError):
    """A file listed in the manifest is missing."""


class TruncatedFileError(RecordingError):
    """A file of the run is shorter/longer than the manifest says, or cannot be parsed."""


class CorruptManifestError(RecordingError):
    """The manifest is not valid JSON or lacks required fields."""


class UnsafePathError(CorruptManifestError):
    """A file named by a run folder (manifest, log or state entry) lies outside that folder: an
    absolute path, a ``..`` component, or a symbolic link leading out. A run folder is data; it
    never chooses what diffin reads elsewhere on the disk."""


class FormatVersionError(RecordingError):
    """The run was written by a newer diffin with a format this version cannot read."""


class ParameterMismatchError(RecordingError):
    """The model's parameter names or shapes do not match the recorded checkpoints."""


class InvalidIdsError(RecordingError, IndexError):
    """Batch ids are negative, not integers, or out of range of the training set."""


class NonFiniteCheckpointError(RecordingError):
    """A checkpoint holds NaN or Inf values."""


class UnsupportedOptimizerError(RecordingError):
    """The optimizer (or its settings) cannot be recorded faithfully."""


class ResumeError(RecordingError):
    """``Recorder(..., resume=True)`` cannot continue the run: it is complete, it has no manifest,
    or the model / optimizer / settings differ from its last checkpoint."""


class PartialRunWarning(UserWarning):
    """The run was not closed (killed, or interrupted by an exception): only the steps up to its
    last checkpoint are loaded and scored."""


class UnsupportedOptimizerWarning(UserWarning):
    """The optimizer (or a setting of it, e.g. Adam's amsgrad) has no Diff-In rule: the run records,
    'tracin', 'if-cg' and 'grad-dot' score it, the sweep variants need SGD, Adam or AdamW."""


# --- scoring ----------------------------------------------------------------------------------
class UnknownMethodError(DiffinError, KeyError):
    """The method name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnsupportedMethodError(DiffinError):
    """The method needs something the recording does not have (e.g. batch ids)."""


class DataMismatchError(DiffinError, ValueError):
    """Training/target data do not match the recording or the model."""


class LossShapeError(DiffinError, ValueError):
    """``loss_fn`` did not return one loss per sample."""


class OutputExistsError(DiffinError, FileExistsError):
    """An output folder holds results made with a different configuration."""


class EmbeddingNotFoundError(DiffinError, FileNotFoundError):
    """A folder holds no finished embedding (``embedding.json`` and ``embedding.npy``)."""


class ResumeMismatchError(DiffinError):
    """``score(..., resume=True)`` found a saved sweep state (``OUT/.resume``) written for another
    config, run, data, method or world size, or a damaged one; nothing was overwritten."""


# --- input checks before scoring (diffin._data) -----------------------------------------------
class NonFiniteDataError(DataMismatchError):
    """Training or target inputs hold NaN or Inf; the message names the rows' ids."""


class DatasetIdError(DataMismatchError):
    """A Dataset of ``(id, input, target)`` items gave an item whose id is not its index."""


class ModelCallError(DataMismatchError):
    """Calling the user's model or loss on a small batch of the data failed (e.g. a shape error)."""


class UntrainedRowsWarning(UserWarning):
    """Some training rows were never in any recorded batch (their sweep scores are 0)."""


class MissingExtraError(DiffinError, ImportError):
    """An optional dependency (plots, built-in data sets, baselines) is not installed."""


class RecipeError(ConfigError):
    """The retraining recipe cannot be derived from the recorded run; explicit overrides are needed."""


class MissingOptimizerStateError(UnsupportedMethodError):
    """A checkpoint lacks the optimizer state (e.g. Adam's moments) that following the optimizer's
    steps needs: the run was recorded without it; record again, or use a method that does not
    follow the optimizer (tracin, if-cg)."""


class ReinitError(ConfigError):
    """A fresh initialisation of the model cannot be drawn (a trained parameter that no module's
    ``reset_parameters`` resets, or an ``init=`` callable that returns another architecture)."""


class DistributedError(DiffinError):
    """A collective operation of a multi-process run failed: another rank stopped (crashed,
    was killed or ran out of memory) or the process group broke. Nothing is written as if
    complete; rerun all ranks (with ``--resume`` where the sweep saved its state)."""


class TrainModeError(RecordingError):
    """A model's training-mode layers (BatchNorm using batch statistics, dropout) cannot be recorded
    or replayed as they trained: several training forwards in one step, modes changed during
    training, a module kind diffin cannot replay, or dropout masks asked for without the RNG state."""


class BatchLossWeightsWarning(UserWarning):
    """A batch loss (``diffin.batch_loss``) does not depend on its weights: removing a member
    changes nothing, so every score would be 0."""


class BatchLossUnsupportedError(UnsupportedMethodError):
    """The estimator (or option) cannot score a batch-coupled loss (``diffin.batch_loss``) or a
    model whose batch statistics couple its batch; the message names the ones that can."""


class TrainModeWarning(UserWarning):
    """A model with BatchNorm or dropout layers was recorded without their training modes (an
    older diffin): its run is replayed in eval mode, and the scores describe that run."""


class UnsupportedTrainingError(RecordingError):
    """A training setting diffin cannot replay (DeepSpeed, FSDP, torch.compile, gradient checkpointing,
    fp16 loss scaling, ...), refused when recording starts; the message says what to change."""


class FrozenWeightsMismatchError(RecordingError):
    """The frozen (untrained) parameters of the model given for scoring are not those the run trained
    with: checkpoints hold the trained parameters only and a fingerprint of the frozen ones."""


class UnstableInfluenceWarning(UserWarning):
    """The scores cannot be trusted: the linearised training dynamics are unstable on this run (the
    adjoint grew past its limit, a score exceeds the target's own size, or checked removals replayed
    for real disagree with their prediction). ``ScoreResult.diagnostics["trust"]`` holds the measures
    and the reasons; docs/guides/trust.md says what they mean and what to do."""
