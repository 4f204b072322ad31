"""Recording a training run (:class:`Recorder`) and reading it back (:func:`load_run`)."""

from .manifest import OptimizerSpec
from .recorder import Recorder
from .run import Checkpoint, Run, load_run

__all__ = ["Checkpoint", "OptimizerSpec", "Recorder", "Run", "load_run"]
