"""Ground truth by replayed removal (docs/method.md §3), and LDS subsets.

Retrain from the recorded θ_0 (and optimizer state) with the recorded batch sequence, learning
rates and optimizer (every parameter group's settings; each run's own gradient clipped when the
run clipped), through :class:`diffin.trajectory.Trajectory`, with a sample
(or a group S) removed from every batch under the ``keep`` or ``renormalize`` convention, and
report ``f(θ_T^{−S}) − f(θ_T)``, where θ_T is the replay with nothing removed (computed side by
side with the same arithmetic, so replay rounding cancels). In float64 this is the exact
trajectory-specific leave-S-out effect, with no retraining noise.

Removal runs are trained side by side: K parameter vectors advance together, one vmapped
weighted-gradient evaluation per step (``torch.func.vmap`` over parameter copies with the batch
shared), in groups sized to a memory budget.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ._api import _eval_mode
from ._data import DataSource, check_id_groups
from ._errors import ConfigError, DataMismatchError
from ._functional import FlatModel, LossFn
from ._progress import progress_bar
from .config import CONVENTIONS
from .recording.run import Run, load_run
from .targets import make_target
from .trajectory import TrainState, Trajectory, check_rule

if TYPE_CHECKING:
    from tqdm import tqdm


def _as_groups(remove: Any, n_train: int) -> list[np.ndarray]:
    """One id → one removal; a list of ids → one removal each; a list of groups → each group."""
    if isinstance(remove, (int, np.integer)):
        groups: list[Any] = [[int(remove)]]
    else:
        items = list(remove)
        groups = [[int(i)] for i in items] if all(isinstance(i, (int, np.integer)) for i in items) else items
    return check_id_groups(groups, n_train, what="removal group", allow_empty=True)


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
    memory_mb: float = 1024.0,
    return_thetas: bool = False,
) -> np.ndarray | tuple[np.ndarray, Tensor, Tensor]:
    """Replayed-removal effects ``f(θ_T^{−S}) − f(θ_T)`` for each removal set S.

    Args:
        remove: one id, a list of ids (one removal each), or a list of id groups.
        convention: ``"keep"`` (removed samples get weight 0; the divisor |B| stays) or
            ``"renormalize"`` (divide by the number of samples left; a batch left empty is
            skipped).
        pairwise: one column per target example.
        memory_mb: budget for the parameter copies trained side by side.
        return_thetas: also return the replayed full-run θ_T (P,) and the removal θ's (K, P).

    Returns: (K,) or (K, Q) array in the model's dtype (loss units); with ``target="self"``,
    the change of the summed own losses of each group.
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    run_obj = run if isinstance(run, Run) else load_run(run)
    run_obj.check_model(model)
    if not run_obj.has_batch_ids:
        raise DataMismatchError("replayed removal needs the batch ids of every step; record them")
    check_rule(run_obj)  # a named error for optimizers without a rule
    fm = FlatModel(model, loss_fn, trainable=run_obj.trainable)
    src = DataSource(train, fm.dtype, fm.device)
    run_obj.check_ids(len(src))
    groups = _as_groups(remove, len(src))
    tgt = make_target(target, src, fm, pairwise=pairwise)
    traj = Trajectory(run_obj, fm, src)
    with _eval_mode(model), torch.no_grad():
        theta_full, thetas = replay_many(traj, groups, convention, memory_mb, progress=progress)
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


def replay_many(
    traj: Trajectory, groups: list[np.ndarray], convention: str, memory_mb: float = 1024.0,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Train the full run and one run per removal group from θ_0; returns θ_T (P,), (K, P).

    Every run follows the recorded optimizer (its rule, per-group hyper-parameters and learning
    rates, clipping of each run's own gradient). The full run travels with the first group of
    runs so its arithmetic (vmapped) is the same as theirs.
    """
    start_state = traj.state(0)
    theta0 = start_state.theta
    P = theta0.numel()
    n_state = len(traj.rule.state_keys)
    per_run = P * theta0.element_size() * (2 + n_state)
    width = max(1, int(memory_mb * 2**20 // per_run))
    finals: list[Tensor] = []
    full = theta0
    N = len(traj.train) if traj.train is not None else 0
    n_steps = traj.run.n_steps
    bar = progress_bar(n_steps * ((len(groups) + width) // width), "replay", progress, unit="step")
    start = 0
    first = True
    while first or start < len(groups):
        chunk = groups[start : start + width - (1 if first else 0)]
        member = np.zeros((len(chunk) + (1 if first else 0), N), dtype=bool)
        for k, g in enumerate(chunk):
            member[k + (1 if first else 0), g] = True
        th = _advance(traj, start_state, member, convention, bar)
        if first:
            full, th = th[0], th[1:]
        finals.append(th)
        start += len(chunk)
        first = False
    bar.close()
    return full, (torch.cat(finals) if finals else theta0[None, :0])


def _advance(traj: Trajectory, state0: TrainState, member: np.ndarray, convention: str, bar: tqdm) -> Tensor:
    """Advance K runs (rows of ``member``: the ids each removes) through every recorded step;
    returns their θ_T (K, P)."""
    K = member.shape[0]
    state = TrainState(state0.theta.expand(K, -1).clone(),
                       {k: v.expand(K, -1).clone() for k, v in state0.opt.items()}, state0.k)
    for t in range(traj.run.n_steps):
        ids, x, y = traj.batch(t)
        keep = torch.as_tensor(~member[:, ids], dtype=state.theta.dtype)  # (K, B)
        if convention == "keep":
            W = keep / len(ids)
        else:
            W = keep / keep.sum(dim=1, keepdim=True).clamp(min=1)
        state, _ = traj.step(state, t, x, y, weights=W)
        bar.update()
    return state.theta


def lds_subsets(n_train: int, n_subsets: int = 50, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Random training subsets for the linear datamodeling score: (S, N) bool, True = kept.

    Each subset keeps exactly ``round(fraction · N)`` samples.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"LDS subset fraction must be in (0, 1), got {fraction}")
    if n_subsets < 2:
        raise ConfigError("LDS needs at least 2 subsets")
    rng = np.random.default_rng(seed)
    k = int(round(fraction * n_train))
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for s in range(n_subsets):
        masks[s, rng.choice(n_train, size=k, replace=False)] = True
    return masks


def lds_ground_truth(
    run: str | os.PathLike[str] | Run,
    model: nn.Module,
    loss_fn: LossFn,
    *,
    train: Any,
    target: Any,
    masks: np.ndarray,
    pairwise: bool = False,
    progress: bool = True,
    memory_mb: float = 1024.0,
) -> np.ndarray:
    """``f(θ_T trained on the kept subset) − f(θ_T)`` for each LDS subset (rows of ``masks``),
    by replay with the complement removed under the ``keep`` convention: (S,) or (S, Q)."""
    removed = [np.flatnonzero(~m) for m in np.asarray(masks, dtype=bool)]
    return replay_removal(run, model, loss_fn, train=train, target=target, remove=removed,
                          convention="keep", pairwise=pairwise, progress=progress, memory_mb=memory_mb)
