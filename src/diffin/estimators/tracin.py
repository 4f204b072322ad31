"""TracIn (Pruthi et al. 2020), docs/method.md §5, in diffin's sign and units.

* ``tracin`` (TracIn-CP): for each segment between checkpoints c_k < c_{k+1},
  ``score(z) += (Σ_{t=c_k}^{c_{k+1}−1} η_t / N) · ⟨∇f(θ_{c_{k+1}}), G_z(θ_{c_{k+1}})⟩``:
  every sample is assumed seen (steps · |B| / N) times per segment at the checkpoint that
  closes the segment (the usual practice of saving after training on it).
* ``tracin-every-step``: for each step whose batch holds z, with the state replayed from
  checkpoints (needs batch ids), ``score(z) += ⟨w_t, Δg_z⟩`` (keep: Δg_z = −G_z(θ_t)/|B_t|),
  where w_t is the step's own coefficient of its batch gradient for the target: the adjoint of
  the single step t (optimizer rule and clip transpose, ``Trajectory.adjoint``) applied to
  θ̄_{t+1} = ∇f(θ_t), s̄_{t+1} = 0, with no propagation to other steps. For plain SGD
  w_t = −η_t∇f(θ_t), i.e. ``score(z) += (η_t/|B_t|)·⟨∇f(θ_t), G_z(θ_t)⟩`` (Pruthi et al.);
  for momentum SGD the step's own share of the gradient (1, 1 − dampening, or 1 + μ(1 −
  dampening) with Nesterov) scales it; for Adam it is −(η_t/c1)(1 − β1)·∇f/(√v̂' + ε) corrected
  for the second moment's dependence on g, elementwise.

Both are first-order: they ignore how a removal's early effect is carried by later steps
(the Hessian terms Diff-In adds).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._tree import batch_len, index
from ..trajectory import TrainState
from .base import Estimator, EstimatorOutput, ScoringContext, add_removal_contrib


def _self_sq_norms(ctx: ScoringContext, theta: Tensor, x: Any, y: Tensor) -> Tensor:
    """‖G_z(θ)‖² for the rows of (x, y), shape (B,), per-sample gradients in small chunks (a
    batch-coupled loss: the shares' gradients within the whole chunk given)."""
    out = []
    n = batch_len(x)
    step = n if ctx.fm.coupled else 64
    for s in range(0, n, step):
        G = ctx.fm.per_sample_grads(theta, index(x, slice(s, s + step)), y[s : s + step])
        out.append((G * G).sum(dim=1))
    return torch.cat(out)


class TracInCP(Estimator):
    name = "tracin"
    supports_batch_loss = True
    summary = "TracIn-CP: first-order, gradients at the checkpoints"

    def score(self, ctx: ScoringContext) -> EstimatorOutput:
        run, fm = ctx.run, ctx.fm
        N = ctx.n_train
        tgt = ctx.target
        Q = 1 if tgt.kind == "self" else tgt.size
        scores = torch.zeros(N, Q, dtype=torch.float64, device=ctx.fm.device)
        with ctx.bar(len(run.segments), self.name) as bar:
            for c0, c1 in run.segments:
                coef = float(np.sum(run.lrs[c0:c1])) / N
                theta = ctx.trajectory.theta(c1)
                if tgt.kind == "self":
                    for ids, x, y in ctx.train.chunks(ctx.member_chunk()):
                        scores[ids, 0] += coef * _self_sq_norms(ctx, theta, x, y).double()
                else:
                    g = tgt.grads(fm, theta)  # (Q, P)
                    for ids, x, y in ctx.train.chunks(ctx.member_chunk()):
                        scores[ids] += coef * fm.dots(theta, x, y, g).T.double()
                bar.update()
        out = scores if tgt.kind == "pairwise" else scores[:, 0]
        return EstimatorOutput(out, self.name)


class TracInEveryStep(Estimator):
    name = "tracin-every-step"
    supports_batch_loss = True
    summary = "TracIn, every step: first-order, θ_t replayed (needs batch ids)"
    needs_batch_ids = True
    follows_recorded_order = True
    needs_rule = True

    def score(self, ctx: ScoringContext) -> EstimatorOutput:
        run, fm, cfg, traj = ctx.run, ctx.fm, ctx.config, ctx.trajectory
        tgt = ctx.target
        Q = 1 if tgt.kind == "self" else tgt.size
        scores = torch.zeros(ctx.n_train, Q, dtype=torch.float64, device=ctx.fm.device)
        need_g = traj.needs_gradient
        with ctx.bar(run.n_steps, self.name) as bar:
            for c0, c1 in run.segments:
                for t, state, g in traj.replay_reversed(c0, c1):
                    ids, x, y = traj.batch(t)
                    ft = tgt.grads(fm, state.theta) if tgt.kind != "self" else None  # eval mode
                    with traj.at_step(t, state, x):  # the step as it trained (docs/method.md §4.8)
                        if g is None and need_g:
                            g = traj.gradient(state.theta, x, y)
                        if ft is None:
                            d = _self_terms(ctx, state, t, g, x, y).unsqueeze(0)
                            add_removal_contrib(scores, ids, d, "keep")
                        else:
                            W, _, _ = traj.adjoint(t, state, g, ft, {})
                            add_removal_contrib(scores, ids, fm.dots(state.theta, x, y, W), cfg.convention)
                    bar.update()
        out = scores if tgt.kind == "pairwise" else scores[:, 0]
        return EstimatorOutput(out, self.name, {"replay_drift": traj.drift})


def _self_terms(ctx: ScoringContext, state: TrainState, t: int, g: Tensor | None, x: Tensor, y: Tensor) -> Tensor:
    """⟨w_z, G_z⟩ (B,) with w_z the step's coefficient for the target ∇f = G_z (the sample's own
    loss), per-sample gradients in small chunks."""
    out = []
    n = batch_len(x)
    step = n if ctx.fm.coupled_steps else 64
    for s in range(0, n, step):
        G = ctx.fm.per_sample_grads(state.theta, index(x, slice(s, s + step)), y[s : s + step])  # (b, P)
        W, _, _ = ctx.trajectory.adjoint(t, state, g, G, {})
        out.append((W * G).sum(dim=1))
    return torch.cat(out)
