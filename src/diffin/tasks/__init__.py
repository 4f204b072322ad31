"""The three data-centric tasks, as functions:

* :func:`clean` — flag the most harmful samples, measure detection, retrain without them;
* :func:`delete` — predict the effect of removing groups of records and check it by replay;
* :func:`prune` — keep a fraction chosen by score, retrain from scratch, compare test accuracy;
* :func:`debias` — remove what drives the worst group's failure (D3M), retrain, compare with ERM, JTT.

Each takes :class:`TaskInputs` (a recorded run with its model, loss and data; or
:func:`builtin_inputs` for a built-in setup) and writes JSON, CSV and a report into ``out``.
The command lines ``diffin clean|delete|prune|debias`` are in :mod:`diffin.cli`.
"""

from __future__ import annotations

from ._clean import CleanConfig, clean
from ._common import TaskInputs, builtin_inputs
from ._debias import DebiasConfig, debias
from ._delete import DeleteConfig, delete
from ._prune import PruneConfig, prune, select

__all__ = ["CleanConfig", "DebiasConfig", "DeleteConfig", "PruneConfig", "TaskInputs", "builtin_inputs", "clean",
           "debias", "delete", "prune", "select"]
