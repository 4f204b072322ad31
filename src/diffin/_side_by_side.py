"""Runs replayed side by side: the run with nothing removed and one run per removal group, K
parameter copies advancing together through the recorded steps, one vmapped weighted-gradient
evaluation per step (``torch.func.vmap`` over parameter copies with the batch shared), in groups
sized to a memory budget (docs/method.md §3). A removal run starts at the first step whose batch
holds one of its removed ids, as a copy of the unremoved run's state there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ._progress import duration, progress_bar
from ._progress import log as progress_log
from .trajectory import TrainState, Trajectory

if TYPE_CHECKING:
    from tqdm import tqdm

ESTIMATE_AFTER_SECONDS = 5.0
"""When a replay of removals logs how long it will take (the pace of its first steps)."""


def replay_states(
    traj: Trajectory, groups: list[np.ndarray], convention: str, memory_mb: float = 1024.0,
    progress: bool = False,
) -> tuple[TrainState, TrainState]:
    """Train the full run and one run per removal group from θ_0; returns the final states: θ_T
    (P,) and (K, P), with the running statistics (R,) and (K, R) of train-mode BatchNorm layers
    (removal takes the sample out of its batches' statistics too, docs/method.md §4.8).

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
    finals: list[TrainState] = []
    full = start_state
    N = len(traj.train) if traj.train is not None else 0
    n_steps = traj.run.n_steps
    batch_ids = [traj.run.batch(t) for t in range(n_steps)]
    chunks: list[np.ndarray] = []
    start = 0
    first = True
    while first or start < len(groups):
        chunk = groups[start : start + width - (1 if first else 0)]
        member = np.zeros((len(chunk) + (1 if first else 0), N), dtype=bool)
        for k, g in enumerate(chunk):
            member[k + (1 if first else 0), g] = True
        chunks.append(member)
        start += len(chunk)
        first = False
    plans = [_activation_plan(member, batch_ids) for member in chunks]
    bar = _Estimated(progress_bar(sum(p.run_steps for p in plans), "replay", progress, unit="run-step"),
                     sum(p.run_steps for p in plans), progress)
    for i, (member, plan) in enumerate(zip(chunks, plans)):
        first = i == 0
        st = _advance(traj, start_state, member, convention, bar, plan)
        if first:
            full = TrainState(st.theta[0], {}, st.k, None if st.stats is None else st.stats[0])
            st = TrainState(st.theta[1:], {}, st.k, None if st.stats is None else st.stats[1:])
        finals.append(st)
    bar.close()
    stats = [f.stats for f in finals if f.stats is not None]
    return full, TrainState(torch.cat([f.theta for f in finals]), {}, full.k, torch.cat(stats) if stats else None)


def removal_weights(keep: Tensor, convention: str) -> Tensor:
    """Per-sample loss weights (K, B) of a batch from its kept mask (K, B) (0/1 in θ's dtype):
    ``keep``: 1/|B| for kept samples; ``renormalize``: 1/(number kept)."""
    if convention == "keep":
        return keep / keep.shape[1]
    return keep / keep.sum(dim=1, keepdim=True).clamp(min=1)


class _Estimated:
    """A progress bar that also logs, once, after :data:`ESTIMATE_AFTER_SECONDS`, how long the whole
    replay will take at the pace of its first steps (logger ``diffin.progress``)."""

    def __init__(self, bar: tqdm, total: int, enabled: bool) -> None:
        self.bar, self.total, self.done = bar, total, 0
        self.start = time.perf_counter()
        self.pending = enabled

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        elapsed = time.perf_counter() - self.start
        if self.pending and elapsed >= ESTIMATE_AFTER_SECONDS and self.done < self.total:
            self.pending = False
            progress_log.info("replay: %d of %d run-steps in %s, about %s in all", self.done, self.total,
                              duration(elapsed), duration(elapsed * self.total / self.done))

    def close(self) -> None:
        self.bar.close()


@dataclass
class _Plan:
    """When each of K removal runs first differs from the run with nothing removed.

    ``first[k]``: the first step whose batch holds one of run k's removed ids (``n_steps`` when
    none does: the run stays the unremoved one to the end). ``base``: the row of a run that removes
    nothing (``None``: :func:`_advance` adds one of its own when that saves work). ``run_steps``:
    the runs' steps that will be computed."""

    first: np.ndarray
    base: int | None
    run_steps: int
    shared: bool = False
    """Whether runs start late from a shared unremoved run (else all K advance from step 0)."""


def _activation_plan(member: np.ndarray, batch_ids: list[np.ndarray]) -> _Plan:
    """The :class:`_Plan` of the K runs of ``member`` (K, N) over the recorded batches."""
    K, T = member.shape[0], len(batch_ids)
    first = np.full(K, T, dtype=np.int64)
    pending = np.ones(K, dtype=bool) & member.any(axis=1)
    for t, ids in enumerate(batch_ids):
        if not pending.any():
            break
        hit = pending & member[:, ids].any(axis=1)
        first[hit] = t
        pending &= ~hit
    empty = np.flatnonzero(~member.any(axis=1))
    base = int(empty[0]) if len(empty) else None
    late = T + int(sum(T - int(first[k]) for k in range(K) if k != base))
    if late < K * T:
        return _Plan(first, base, late, shared=True)
    return _Plan(first, base, K * T)


def _advance(traj: Trajectory, state0: TrainState, member: np.ndarray, convention: str, bar: tqdm | _Estimated,
             plan: _Plan | None = None) -> TrainState:
    """Advance K runs (rows of ``member``: the ids each removes) through every recorded step;
    returns their final state (θ_T (K, P), running statistics (K, R) or None).

    Until its first removed id comes up in a batch a run is the run with nothing removed, so it is
    not computed: one unremoved run advances (row 0, a row of ``member`` that removes nothing or one
    added for this), and each run starts as a copy of its state at the step of its first removed id
    (``plan``, :func:`_activation_plan`). The runs of one step are one vmapped evaluation, as before,
    so a run's arithmetic does not depend on when the others started."""
    K = member.shape[0]
    T = traj.run.n_steps
    plan = plan or _activation_plan(member, [traj.run.batch(t) for t in range(T)])
    if not plan.shared:
        state = expand_state(state0, K)
        for t in range(T):
            ids, x, y = traj.batch(t)
            keep = torch.as_tensor(~member[:, ids], dtype=state.theta.dtype)  # (K, B)
            state, _ = traj.step(state, t, x, y, weights=removal_weights(keep, convention))
            bar.update(K)
        return state
    base = plan.base
    rows = [-1 if base is None else base]  # member rows of the state's rows; -1: the added unremoved run
    waiting = sorted((int(plan.first[k]), k) for k in range(K) if k != base and plan.first[k] < T)
    state = expand_state(state0, 1)
    nothing = np.zeros(member.shape[1], dtype=bool)
    w = 0
    for t in range(T):
        start = [k for f, k in waiting[w:] if f == t]
        if start:  # these runs' first removed id is in this batch: copies of the unremoved run's state
            w += len(start)
            state = _with_copies(state, len(start))
            rows += start
        ids, x, y = traj.batch(t)
        m = np.stack([nothing[ids] if r < 0 else member[r, ids] for r in rows])
        keep = torch.as_tensor(~m, dtype=state.theta.dtype)  # (K', B)
        state, _ = traj.step(state, t, x, y, weights=removal_weights(keep, convention))
        bar.update(len(rows))
    where = {r: i for i, r in enumerate(rows)}
    order = torch.as_tensor([where.get(k, 0) for k in range(K)])  # runs never started: the unremoved run
    return TrainState(state.theta[order], {k: v[order] for k, v in state.opt.items()}, state.k,
                      None if state.stats is None else state.stats[order], state.buffers)


def _with_copies(state: TrainState, n: int) -> TrainState:
    """``state`` (K', ...) with n copies of its row 0 appended."""
    def grow(v: Tensor) -> Tensor:
        return torch.cat([v, v[:1].expand(n, *v.shape[1:])])

    return TrainState(grow(state.theta), {k: grow(v) for k, v in state.opt.items()}, state.k,
                      None if state.stats is None else grow(state.stats), state.buffers)


def expand_state(state0: TrainState, K: int, theta: Tensor | None = None) -> TrainState:
    """K copies of a single run's state (θ from ``theta`` (K, P) when given)."""
    return TrainState(state0.theta.expand(K, -1).clone() if theta is None else theta,
                      {k: v.expand(K, -1).clone() for k, v in state0.opt.items()}, state0.k,
                      None if state0.stats is None else state0.stats.expand(K, -1).clone(), state0.buffers)


