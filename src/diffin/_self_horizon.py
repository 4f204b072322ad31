"""Diff-In self-influence with a horizon: every training sample's effect on its own loss a few steps
after it was used (docs/method.md §4.11).

For a sample z used at step t (batch B_t), removing it from that step changes the batch gradient by
Δg_z = −∇ℓ_z(θ_t)/|B_t| (``keep``; ℓ_z its share of the batch loss, docs/method.md §4.7). The
horizon-H self-influence follows that change through the step and the next H steps and reads z's own
share (in the batch B_t it trained in) at θ_{t+H+1}:

    s_H(z) = Σ_{t: z ∈ B_t}  −d_z^{(t)} / |B_t|,      d_z^{(t)} = ⟨w_z, ∇ℓ_z(θ_t)⟩,
    w_z = the coefficient of step t's gradient in the adjoint sweep started at a_z = ∇ℓ_z(θ_{t+H+1})
          and carried back through steps t+H … t+1 (their exact transposes: optimizer rule and HVP)

with t + H + 1 capped at T. It is the first-order change of z's own loss H + 1 steps after its use if
it had been removed from that step (loss units; positive = z lowered its own loss). For a sample used
once, H ≥ T − 1 gives the whole-run self-influence ⟨∇ℓ_z(θ_T), e_z⟩ with z's share taken in its own
batch (``diffin.score(target="self")`` takes it in a chunk of the recorded batch size in id order).
For SGD at H = 0 it is (η_t/|B_t|)·⟨∇ℓ_z(θ_{t+1}), ∇ℓ_z(θ_t)⟩.

Two ways to compute d:

* exact (``dim=None``): per-sample (share) gradients of the batch at θ_{t+H+1} and θ_t, the H
  transposes vmapped over the |B_t| adjoints: about |B|·(H + 2) gradients per step; small runs.
* sketched (``dim=K``, H = 0 only): for optimizer rules whose adjoint is elementwise in θ̄ (SGD with
  momentum or weight decay, Adam, AdamW; not gradient clipping), w_z = c_t ⊙ a_z with c_t the rule's
  coefficient vector, and d_z = ⟨c_t ⊙ a_z, b_z⟩ is estimated with K Rademacher directions r_k
  (seeded by (seed, t)) as (1/K) Σ_k ⟨a_z, c_t ⊙ r_k⟩⟨b_z, r_k⟩ (unbiased since E[r rᵀ] = I): 2K
  forward-mode JVPs of the batch's shares per step, every sample of the batch at once.

``standardized``: each use's term as a z-score within its batch (mean over the sample's uses): it
removes the drift of the terms' scale along the run (a sample used early is compared with a model
that has barely trained), so that samples used at different times rank on one scale.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._data import DataSource
from ._errors import ConfigError, UnsupportedMethodError
from ._functional import FlatModel, LossFn
from ._progress import progress_bar
from ._train_mode import eval_mode
from .recording.run import Run, load_run
from .trajectory import TrainState, Trajectory


@dataclass
class SelfInfluence:
    """Horizon-limited self-influence of every training sample (docs/method.md §4.11).

    ``scores`` (N,) float64: loss_change_if_removed of the sample's own loss, H + 1 steps after each
    use, summed over its uses (positive: the sample lowered its own loss; large = memorised).
    ``standardized`` (N,) float64: each use's term as a z-score within its batch, averaged over uses
    (unitless). ``step`` (N,) int64: the first step that used the sample (−1: never; both scores 0).
    """

    scores: np.ndarray
    standardized: np.ndarray
    step: np.ndarray
    horizon: int
    dim: int | None
    seconds: float


def self_influence(
    run: str | os.PathLike[str] | Run,
    model: nn.Module,
    loss_fn: LossFn,
    *,
    train: Any,
    horizon: int = 0,
    dim: int | None = None,
    seed: int = 0,
    steps: tuple[int, int] | None = None,
    progress: bool = True,
    device: str | None = None,
) -> SelfInfluence:
    """Every training sample's Diff-In self-influence over ``horizon`` steps after its use.

    Args:
        run, model, loss_fn, train: as for :func:`diffin.influence` (the run must have recorded its
            batch ids; a batch loss made with :func:`diffin.batch_loss` is supported: ℓ_z is z's
            share of the batch it trained in).
        horizon: H ≥ 0, steps after the step of use that the effect is followed through (capped at
            the end of the run; H ≥ T − 1: the whole run).
        dim: None for exact per-sample gradients; K ≥ 1 for the sketched estimate with K random
            directions (H = 0 only; not for runs with gradient clipping).
        seed: seed of the sketch's directions.
        steps: ``(s0, s1)``: only the uses at steps s0 ≤ t < s1 (the samples of those batches; the run is
            still replayed from its start); default: every step.
        device: where to compute (``"cuda"``; default: the model's device).

    Returns:
        :class:`SelfInfluence` (``scores`` in loss units, sign of docs/method.md §2).
    """
    from ._api import scoring_model

    H = int(horizon)
    if H < 0:
        raise ConfigError(f"horizon must be >= 0, got {horizon}")
    if dim is not None and int(dim) < 1:
        raise ConfigError(f"dim must be >= 1 (or None for exact per-sample gradients), got {dim}")
    if dim is not None and H > 0:
        raise ConfigError("the sketched estimate (dim=K) is for horizon=0; use dim=None for horizon > 0 "
                          "(exact per-sample gradients, for small runs)")
    run_obj = run if isinstance(run, Run) else load_run(run)
    run_obj.check_model(model)
    if not run_obj.has_batch_ids:
        raise UnsupportedMethodError("horizon self-influence needs the batch ids of every step; record the run "
                                     "with Recorder.step(ids=...) (or score self-influence with diffin.embed)")
    fm = FlatModel(scoring_model(model, device), loss_fn, trainable=run_obj.trainable)
    src = DataSource(train, fm.dtype, fm.device, name="train")
    run_obj.check_ids(len(src))
    traj = Trajectory(run_obj, fm, src)
    if traj.train_mode:
        raise UnsupportedMethodError("horizon self-influence replays steps in eval mode; this run trained "
                                     "BatchNorm or dropout in training mode: use diffin.embed(...).self_influence()")
    if dim is not None and traj.clip_norm is not None:
        raise ConfigError("the sketched estimate needs an optimizer adjoint that is elementwise in the parameters' "
                          "adjoint; gradient clipping is not: pass dim=None (exact)")
    n = len(src)
    T = run_obj.n_steps
    s0, s1 = (0, T) if steps is None else (int(steps[0]), int(steps[1]))
    if not 0 <= s0 < s1 <= T:
        raise ConfigError(f"steps must be (s0, s1) with 0 <= s0 < s1 <= {T} (the run's steps), got {steps}")
    acc = _Accumulator(n)
    gen = torch.Generator(device="cpu")
    restart = set(run_obj.checkpoint_steps)
    t0 = time.perf_counter()
    bar = progress_bar(min(T, s1 + H), f"self-influence (horizon {H})", enabled=progress, unit="step")
    with eval_mode(fm.model):
        state = traj.state(0)
        window: deque[tuple[int, TrainState, Tensor]] = deque()
        for t in range(min(T, s1 + H)):
            with torch.no_grad():
                nxt, g = traj.step(state, t)
            window.append((t, state, g))
            state = traj.state(t + 1) if (t + 1) in restart and t + 1 < T else nxt
            if len(window) > H:
                _use(traj, fm, acc, window.popleft(), list(window), state, dim, seed, gen, s0)
            bar.update(1)
        while window and window[0][0] < s1:
            _use(traj, fm, acc, window.popleft(), list(window), state, dim, seed, gen, s0)
    bar.close()
    return SelfInfluence(acc.scores, acc.standardized(), acc.step, H, None if dim is None else int(dim),
                         time.perf_counter() - t0)


class _Accumulator:
    """Per-sample sums of the terms, of their within-batch z-scores, the count of uses, first step."""

    def __init__(self, n: int) -> None:
        self.scores = np.zeros(n, dtype=np.float64)
        self.z = np.zeros(n, dtype=np.float64)
        self.uses = np.zeros(n, dtype=np.int64)
        self.step = np.full(n, -1, dtype=np.int64)

    def add(self, t: int, ids: np.ndarray, term: np.ndarray) -> None:
        np.add.at(self.scores, ids, term)
        sd = term.std()
        np.add.at(self.z, ids, (term - term.mean()) / sd if sd > 0 else np.zeros_like(term))
        np.add.at(self.uses, ids, 1)
        first = self.step[ids] < 0
        self.step[ids[first]] = t

    def standardized(self) -> np.ndarray:
        return np.where(self.uses > 0, self.z / np.maximum(self.uses, 1), 0.0)


def _use(traj: Trajectory, fm: FlatModel, acc: _Accumulator, first: tuple[int, TrainState, Tensor],
         later: list[tuple[int, TrainState, Tensor]], end: TrainState, dim: int | None, seed: int,
         gen: torch.Generator, s0: int) -> None:
    """The terms −d_z/|B_t| of the members of step t's batch (t = ``first``'s step), with the target at
    ``end`` (θ after the steps of ``later``, each (step, state before it, its raw gradient))."""
    t, st, g = first
    if t < s0:
        return
    ids, x, y = traj.batch(t)
    B = len(ids)
    if dim is None:
        d = _exact_dots(traj, fm, t, st, g, later, end, x, y)
    else:
        c = traj.adjoint(t, st, g, torch.ones_like(st.theta), {})[0].reshape(-1)
        gen.manual_seed(int(np.random.SeedSequence([int(seed), t]).generate_state(1)[0]))
        R = (torch.randint(0, 2, (int(dim), st.theta.numel()), generator=gen).to(fm.dtype) * 2 - 1).to(fm.device)
        with torch.no_grad():  # vmapped forward-mode JVPs of the shares (measured 2× faster than a batched
            a = fm.dots(end.theta, x, y, R * c)  # double backward here); (K, B): ⟨∇ℓ_i(θ_{t+1}), c ⊙ r_k⟩
            b = fm.dots(st.theta, x, y, R)  # (K, B): ⟨∇ℓ_i(θ_t), r_k⟩
        d = (a * b).mean(0)
    acc.add(t, ids, -d.detach().to(torch.float64).cpu().numpy() / B)


def _exact_dots(traj: Trajectory, fm: FlatModel, t: int, st: TrainState, g: Tensor,
                later: list[tuple[int, TrainState, Tensor]], end: TrainState, x: Any, y: Any) -> Tensor:
    """d_i = ⟨w_i, ∇ℓ_i(θ_t)⟩ (B,) for the members of step t's batch, w_i from the adjoint started at
    ∇ℓ_i(θ_end) (its share in this batch) and carried back through the steps of ``later``."""
    A = fm.per_sample_grads(end.theta, x, y)  # (B, P)
    S: dict[str, Tensor] = {}
    for u, st_u, g_u in reversed(later):
        _, xu, yu = traj.batch(u)
        A, S, _, _ = traj.transpose(u, st_u, g_u, xu, yu, A, S, None, mode="exact", eps=None, dots="jvp")
    W = traj.adjoint(t, st, g, A, S)[0]
    G = fm.per_sample_grads(st.theta, x, y)
    return (W * G).sum(1)

