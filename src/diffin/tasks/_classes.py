"""``METHOD-classes``, the detector of ``diffin clean`` where a model memorises its labels
(docs/method.md §6): influence on each class of a trusted validation set, scored on the run up to a
horizon checkpoint (by default the one with the lowest validation loss)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata

from .._api import score
from .._data import DataSource
from .._errors import ConfigError
from .._functional import FlatModel
from ..config import ScoreConfig
from ..recording.run import Run
from ..targets import GroupMeanLoss
from ..trajectory import Trajectory
from ._common import TaskInputs, TaskState, losses_at


def _all_seen_step(run: Run, n_train: int) -> int:
    """The first step by which every training id has been in a batch (``run.n_steps`` if never;
    0 without recorded batch ids)."""
    if not run.has_batch_ids:
        return 0
    seen = np.zeros(n_train, dtype=bool)
    for t in range(run.n_steps):
        seen[run.batch(t)] = True
        if seen.all():
            return t + 1
    return run.n_steps


def horizon_step(inp: TaskInputs, run: Run, horizon: str) -> tuple[int, list[float] | None]:
    """The checkpoint step ``horizon`` names, and the validation loss at every checkpoint when it
    was chosen by them (``best-val``: among the checkpoints by which every training sample has been
    trained on, the one with the lowest mean validation loss: where the model generalises best,
    before it memorises its labels)."""
    if horizon == "end":
        return run.n_steps, None
    if horizon != "best-val":
        return int(horizon), None
    if inp.val is None:
        raise ConfigError("horizon 'best-val' needs a validation set; give --horizon end or a checkpoint step")
    fm = FlatModel(inp.model_factory(), inp.loss_fn, run.trainable)
    traj = Trajectory(run, fm)
    curve = [float(losses_at(fm, traj.theta(c), inp.val).mean()) for c in run.checkpoint_steps]
    first = _all_seen_step(run, inp.n_train)
    allowed = [i for i, c in enumerate(run.checkpoint_steps) if c >= max(first, 1)] or [len(curve) - 1]
    best = min(allowed, key=lambda i: curve[i])
    return run.checkpoint_steps[best], curve


def class_harm(method: str, inp: TaskInputs, state: TaskState, horizon: str, progress: bool,
               notes: dict[str, Any]) -> np.ndarray:
    """``METHOD-classes``: score every training sample against the mean loss of each class of the
    validation set (one sweep with C targets, :class:`~diffin.targets.GroupMeanLoss`), on the run up
    to the horizon's checkpoint; in each class's column rank the samples by harm (percentile of
    −score, ties averaged); a sample's harm is its highest percentile over the classes.

    Why: a wrong label raises the validation loss of the class its image belongs to and barely
    moves the others, so the mean over all classes dilutes it among the C − 1 classes it does not
    touch; and each class's scores have their own scale (its loss, its gradients), which the
    percentiles remove (docs/method.md §6)."""
    if inp.val is None:
        raise ConfigError(f"{method}-classes needs a validation set with class labels")
    xv, yv = inp.val
    if yv.is_floating_point() or yv.ndim != 1:
        raise ConfigError(f"{method}-classes needs integer class labels in the validation set")
    step, curve = horizon_step(inp, state.run, horizon)
    run = state.run.until(step)
    fm = FlatModel(inp.model_factory(), inp.loss_fn, run.trainable)
    labels = yv.detach().cpu().numpy()
    present = np.unique(labels)
    groups = np.searchsorted(present, labels)
    tgt = GroupMeanLoss(DataSource(inp.val, fm.dtype, fm.device, name="target"), groups)
    S = score(run, inp.model_factory(), inp.loss_fn, train=inp.train, target=tgt, config=ScoreConfig(method=method),
              progress=progress).scores.astype(np.float64)
    notes.setdefault("horizon", {})[f"{method}-classes"] = {
        "step": step, "of": state.run.n_steps, "rule": horizon, "val_loss_at_checkpoints": curve}
    return percentile_max(S)


def percentile_max(S: np.ndarray) -> np.ndarray:
    """(N, C) scores → (N,) harm: each class column's harm percentile (of −score, ties averaged),
    the highest over the classes."""
    pct = np.stack([rankdata(-S[:, g]) / len(S) for g in range(S.shape[1])], axis=1)
    return pct.max(axis=1)
