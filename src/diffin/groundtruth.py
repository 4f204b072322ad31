"""Ground truth by replayed removal (METHOD.md section 3).

Retrain from the recorded θ_0 with the recorded batch sequence and learning rates, with a sample
(or a group S) removed from every batch under the ``keep`` or ``renormalize`` convention, and
report ``f(θ_T^{−S}) − f(θ_T)``, where θ_T is the replay with nothing removed (so replay
rounding cancels). In float64 this is the exact trajectory-specific leave-S-out effect.

Removal sets are trained side by side: K parameter vectors advance together, one step at a
time; a removal set whose members have not appeared yet shares the full run's state (nothing
to recompute until its first member shows up).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._api import _eval_mode
from ._data import DataSource
from ._errors import ConfigError, DataMismatchError, InvalidIdsError
from ._functional import FlatModel, LossFn
from .config import CONVENTIONS, ScoreConfig
from .estimators.base import ScoringContext
from .recording.run import Run, load_run
from .targets import make_target


def _as_groups(remove: Any, n_train: int) -> list[np.ndarray]:
    if isinstance(remove, (int, np.integer)):
        groups = [np.array([int(remove)])]
    else:
        items = list(remove)
        if all(isinstance(i, (int, np.integer)) for i in items):
            groups = [np.array([int(i)]) for i in items]  # one removal per id
        else:
            groups = [np.unique(np.asarray(g, dtype=np.int64).reshape(-1)) for g in items]
    for g in groups:
        if g.size and (g.min() < 0 or g.max() >= n_train):
            raise InvalidIdsError(
                f"removal ids must lie in [0, {n_train}); got {int(g.min())}..{int(g.max())}"
            )
    return groups


def _step_weights(ids: np.ndarray, group: np.ndarray, convention: str) -> Tensor | None:
    """Per-sample weights of a batch with ``group`` removed (None: batch untouched)."""
    keep = ~np.isin(ids, group)
    if keep.all():
        return None
    B = len(ids)
    if convention == "keep":
        return torch.as_tensor(keep / B)
    n = int(keep.sum())
    return torch.as_tensor(keep / max(n, 1))  # all removed: zero gradient, the step is skipped


def replay_removal(
    run: str | os.PathLike[str] | Run,
    model: nn.Module,
    loss_fn: LossFn,
    *,
    train: Any,
    target: Any,
    remove: int | Sequence[int] | Sequence[Sequence[int]] = (),
    convention: str = "keep",
    pairwise: bool = False,
    progress: bool = True,
    return_thetas: bool = False,
) -> np.ndarray | tuple[np.ndarray, Tensor, Tensor]:
    """Replayed-removal effects ``f(θ_T^{−S}) − f(θ_T)`` for each removal set S.

    Args:
        remove: one id, a list of ids (one removal each), or a list of id groups.
        convention: ``"keep"`` (removed samples get weight 0; the divisor |B| stays) or
            ``"renormalize"`` (divide by the number of samples left).
        pairwise: one column per target example.
        return_thetas: also return the replayed full-run θ_T (P,) and the K removal θ's (K, P).

    Returns: (K,) or (K, Q) array in the model's dtype (loss units).
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    run_obj = run if isinstance(run, Run) else load_run(run)
    run_obj.check_model(model)
    if not run_obj.has_batch_ids:
        raise DataMismatchError("replayed removal needs the batch ids of every step; record them")
    if not run_obj.optimizer.is_sgd:
        raise DataMismatchError(f"replayed removal replays SGD; the run used {run_obj.optimizer.kind}")
    fm = FlatModel(model, loss_fn, trainable=run_obj.trainable)
    src = DataSource(train, fm.dtype, fm.device)
    run_obj.check_ids(len(src))
    groups = _as_groups(remove, len(src))
    tgt = make_target(target, src, fm, pairwise=pairwise)
    ctx = ScoringContext(run_obj, fm, src, tgt, ScoreConfig(), progress=progress)
    with _eval_mode(model), torch.no_grad():
        theta_full, thetas = _replay(ctx, groups, convention)
        base = tgt.values(fm, theta_full)
        if tgt.kind == "self":
            vals = torch.stack([tgt.values(fm, th)[g].sum() - base[g].sum()
                                for th, g in zip(thetas, groups)])
        else:
            vals = torch.stack([tgt.values(fm, th) - base for th in thetas])
            if tgt.kind == "mean":
                vals = vals[:, 0]
    out = vals.cpu().numpy()
    if return_thetas:
        return out, theta_full, thetas
    return out


def _replay(ctx: ScoringContext, groups: list[np.ndarray], convention: str) -> tuple[Tensor, Tensor]:
    """Advance the full run and K removal runs together from θ_0; returns θ_T (P,), (K, P)."""
    run = ctx.run
    theta, v = ctx.checkpoint(0)
    K = len(groups)
    thetas: list[Tensor | None] = [None] * K  # None: identical to the full run so far
    vs: list[Tensor | None] = [None] * K
    bar = tqdm(total=run.n_steps, desc="replay", disable=not ctx.progress, leave=False)
    for t in range(run.n_steps):
        ids, x, y = ctx.batch(t)
        for k, grp in enumerate(groups):
            w = _step_weights(ids, grp, convention)
            if w is None and thetas[k] is None:
                continue  # still on the full trajectory
            th = theta if thetas[k] is None else thetas[k]
            vk = v if thetas[k] is None else vs[k]
            thetas[k], vs[k] = _weighted_step(ctx, th, vk, t, x, y, w)
        theta, v = ctx.sgd_step(theta, v, t, x, y)
        bar.update()
    bar.close()
    final = torch.stack([theta if th is None else th for th in thetas]) if K else theta[None, :0]
    return theta, final


def _weighted_step(
    ctx: ScoringContext, theta: Tensor, v: Tensor | None, t: int, x: Tensor, y: Tensor,
    w: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Step t with per-sample weights w (B,) on the losses (None: the plain mean)."""
    if w is None:
        return ctx.sgd_step(theta, v, t, x, y)
    w = w.to(dtype=theta.dtype, device=theta.device)
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad((ctx.fm.losses(th, x, y) * w).sum(), th)
    return ctx.sgd_update(theta, v, t, g)
