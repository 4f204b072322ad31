"""Diff-In for a fresh retraining, docs/method.md §4.4 (``predicts="retrain"``).

The sweep variants of :mod:`.diffin_sweep` answer "what if this very run were replayed without
z": they credit z at the steps where the recorded order put it, with the adjoint of the recorded
batches. A person who deletes z retrains with a fresh batch order (and often a fresh
initialisation); z then enters other batches at other times. This estimator predicts the
expectation over fresh orders:

* each sample is credited its expected share of every step: z is in B_t with probability
  |B|/N, so its expected credit at step t is ⟨w_t, −G_z(θ_t)⟩/N (``keep``);
* the adjoint is carried with Hessians of fresh proxy batches (a sampled order, not the recorded
  one), seeded by ``config.seed``;
* θ_t follows the recorded trajectory, replayed from the checkpoints when the run has its batch
  ids (else the checkpoint θ, as ``diffin-expected``, with the optimizer state of rules whose step
  depends on the gradient following the proxy batches);
* credits are summed over ``credit_every`` steps and paid with one pass of per-sample inner
  products at the θ of the earliest of those steps (default: once per checkpoint segment).

``removal_fraction`` α > 0 (a decision that removes a fraction α of the data, e.g. pruning to
keep 1 − α): the sweep linearises around the run in which every sample has loss weight 1 − α,
replayed from θ_0 with the recorded batches (one extra forward pass over the run), instead of the
recorded run. A subset of 1 − α of the data trains, in expectation over which samples it keeps,
like that run; the differences between subsets (what a decision ranks) are first-order around it,
not around the full-data run. The adjoint then carries (1 − α)·H_B, the credit of a sample stays
⟨w, G_z⟩/N. Needs the run's batch ids.

Scores from several independently recorded runs (``diffin.score(run=[...])``) average out the
initialisation as well (:func:`diffin._api.score`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._errors import ConfigError
from ..targets import Target
from ..trajectory import TrainState
from .base import ScoringContext
from .diffin_sweep import _frozen, _Sweep, pay_expected_credit


class DiffInRetrain(_Sweep):
    """Expected credit over fresh batch orders along the replayed trajectory."""

    name = "diffin-retrain"
    summary = "Diff-In for a fresh retraining: expected credit over batch orders, θ_t replayed"

    def sweep(self, ctx: ScoringContext, target: Target) -> Tensor:
        cfg, fm, traj = ctx.config, ctx.fm, ctx.trajectory
        N = ctx.n_train
        b = ctx.proxy_batch_size()
        every = cfg.credit_every
        rng = np.random.default_rng(cfg.seed)
        replay = ctx.run.has_batch_ids
        scale = 1.0 - cfg.removal_fraction
        A, scores, S, first = self.begin(ctx, target, rng)
        starts: dict[int, TrainState] = {}
        if scale != 1.0:
            starts, theta_T = self.reweighted(ctx, scale)
            if first == 0:
                A = target.grads(fm, theta_T)
                self.note_growth(A, start=True)
        with ctx.bar(ctx.run.n_steps, self.name) as bar:
            for i, c0, c1 in self.remaining(ctx, first, bar):
                ids_of = {t: rng.choice(N, size=b, replace=False) for t in range(c1 - 1, c0 - 1, -1)}
                if replay:
                    states = traj.replay_reversed(c0, c1, with_grads=False, start=starts.get(c0), scale=scale)
                elif traj.needs_gradient:  # no batch ids: the optimizer state follows the proxies (see _frozen)
                    states = traj.replay_reversed(c0, c1, freeze_theta=True, with_grads=False,
                                                  batch_of=lambda t, m=ids_of: ctx.train.get(m[t]))
                else:
                    states = _frozen(traj, c0, c1)
                W_sum = torch.zeros_like(A)
                for t, state, _ in states:  # t = c1−1 … c0
                    x, y = ctx.train.get(ids_of[t])
                    g = traj.gradient(state.theta, x, y) * scale if traj.needs_gradient else None
                    W, A_direct, S = traj.adjoint(t, state, g, A, S)
                    W_sum += W
                    A = A_direct + scale * fm.hvp(state.theta, x, y, W, mode=ctx.hvp_mode, eps=cfg.fd_eps)
                    if t == c0 or (every is not None and (t - c0) % every == 0):
                        pay_expected_credit(ctx, scores, state.theta, W_sum)
                        W_sum = torch.zeros_like(A)
                    bar.update()
                self.note_growth(A)
                self.save_point(ctx, c1 - c0, i + 1, A, scores, S, rng)
        return scores

    @staticmethod
    def reweighted(ctx: ScoringContext, scale: float) -> tuple[dict[int, TrainState], Tensor]:
        """The recorded run replayed from θ_0 with every sample's loss weight ``scale``: its state at
        the start of every checkpoint segment, and its θ_T (buffers of θ_T installed)."""
        if not ctx.run.has_batch_ids:
            raise ConfigError("removal_fraction > 0 replays the run with reweighted samples, which needs the "
                              "batch ids of every step; record them, or leave removal_fraction at 0")
        traj = ctx.trajectory
        seg_starts = {c0 for c0, _ in ctx.run.segments}
        starts: dict[int, TrainState] = {}
        state = traj.state(0)
        with torch.no_grad():
            for t in range(ctx.run.n_steps):
                if t in seg_starts:
                    starts[t] = state
                state, _ = traj.step(state, t, scale=scale)
        traj.theta(ctx.run.n_steps)  # θ_T's buffers, as the target's gradient expects
        return starts, state.theta
