"""Recording a training run (:class:`Recorder`), reading it back (:func:`load_run`), and
continuing a killed run (:func:`restore_checkpoint`, then ``Recorder(..., resume=True)``)."""

from .._errors import PartialRunWarning, ResumeError, UnsupportedOptimizerWarning
from ._checkpoints import restore_checkpoint
from .manifest import OptimizerSpec
from .recorder import Recorder
from .run import Checkpoint, Run, load_run

__all__ = [
    "Checkpoint",
    "OptimizerSpec",
    "PartialRunWarning",
    "Recorder",
    "ResumeError",
    "Run",
    "UnsupportedOptimizerWarning",
    "load_run",
    "restore_checkpoint",
]
