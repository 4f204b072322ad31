"""Gradient similarity at the final parameters, docs/method.md §5.

* ``grad-dot``: ``(Σ_t η_t / N) · ⟨∇f(θ_T), G_z(θ_T)⟩`` — TracIn with the single checkpoint θ_T
  standing for the whole run, so in loss units and the removal sign.
* ``grad-cos``: ``cos(∇f(θ_T), G_z(θ_T))`` — unitless; only its ranking means anything.
"""

from __future__ import annotations

import numpy as np
import torch

from .._tree import batch_len, index
from .base import Estimator, EstimatorOutput, ScoringContext


class GradDot(Estimator):
    name = "grad-dot"
    summary = "gradient dot product at θ_T (scaled like a one-checkpoint TracIn)"

    def score(self, ctx: ScoringContext) -> EstimatorOutput:
        fm = ctx.fm
        theta = ctx.trajectory.theta(ctx.run.n_steps)
        coef = float(np.sum(ctx.run.lrs)) / ctx.n_train
        tgt = ctx.target
        if tgt.kind == "self":
            out = torch.cat([(fm.per_sample_grads(theta, index(x, slice(s, s + 64)), index(y, slice(s, s + 64))) ** 2
                              ).sum(1)
                             for _, x, y in ctx.train.chunks(ctx.product_chunk())
                             for s in range(0, batch_len(x), 64)])
            return EstimatorOutput(coef * out.double(), self.name)
        g = tgt.grads(fm, theta)
        d = torch.cat([fm.dots(theta, x, y, g).T for _, x, y in ctx.train.chunks(ctx.product_chunk())])
        d = coef * d.double()
        return EstimatorOutput(d[:, 0] if tgt.kind == "mean" else d, self.name)


class GradCos(Estimator):
    name = "grad-cos"
    summary = "gradient cosine similarity at θ_T (unitless, for ranking)"
    supports_self = False  # the cosine of a gradient with itself is 1
    loss_units = False
    linear_in_target = False  # normalised by ‖∇f‖: the mean target's cosine weighs examples by ‖∇f_j‖

    def score(self, ctx: ScoringContext) -> EstimatorOutput:
        fm = ctx.fm
        tgt = ctx.target
        theta = ctx.trajectory.theta(ctx.run.n_steps)
        g = tgt.grads(fm, theta)  # (Q, P)
        gn = g.norm(dim=1).clamp(min=torch.finfo(g.dtype).tiny)
        rows = []
        for _, x, y in ctx.train.chunks(64):
            G = fm.per_sample_grads(theta, x, y)  # (B, P)
            Gn = G.norm(dim=1).clamp(min=torch.finfo(G.dtype).tiny)
            rows.append((G @ g.T) / (Gn[:, None] * gn[None, :]))
        out = torch.cat(rows).double()
        return EstimatorOutput(out[:, 0] if tgt.kind == "mean" else out, self.name)
