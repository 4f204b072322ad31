"""TracIn (Pruthi et al. 2020), docs/method.md §5, in diffin's sign and units.

* ``tracin`` (TracIn-CP): for each segment between checkpoints c_k < c_{k+1},
  ``score(z) += (Σ_{t=c_k}^{c_{k+1}−1} η_t / N) · ⟨∇f(θ_{c_{k+1}}), G_z(θ_{c_{k+1}})⟩``:
  every sample is assumed seen (steps · |B| / N) times per segment at the checkpoint that
  closes the segment (the usual practice of saving after training on it).
* ``tracin-every-step``: ``score(z) += (η_t/|B_t|)·⟨∇f(θ_t), G_z(θ_t)⟩`` for each step whose
  batch holds z, with θ_t replayed from checkpoints (needs batch ids).

Both are first-order: they ignore how a removal's early effect is carried by later steps
(the Hessian terms Diff-In adds).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import Estimator, EstimatorOutput, ScoringContext, add_removal_contrib


def _self_sq_norms(ctx: ScoringContext, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """‖G_z(θ)‖² for the rows of (x, y), shape (B,), per-sample gradients in small chunks."""
    out = []
    for s in range(0, x.shape[0], 64):
        G = ctx.fm.per_sample_grads(theta, x[s : s + 64], y[s : s + 64])
        out.append((G * G).sum(dim=1))
    return torch.cat(out)


class TracInCP(Estimator):
    name = "tracin"
    summary = "TracIn-CP: first-order, gradients at the checkpoints"

    def score(self, ctx: ScoringContext) -> EstimatorOutput:
        run, fm, cfg = ctx.run, ctx.fm, ctx.config
        N = ctx.n_train
        tgt = ctx.target
        Q = 1 if tgt.kind == "self" else tgt.size
        scores = torch.zeros(N, Q, dtype=torch.float64)
        with ctx.bar(len(run.segments), self.name) as bar:
            for c0, c1 in run.segments:
                coef = float(np.sum(run.lrs[c0:c1])) / N
                theta, _ = ctx.checkpoint(c1)
                if tgt.kind == "self":
                    for ids, x, y in ctx.train.chunks(cfg.batch_size):
                        scores[ids, 0] += coef * _self_sq_norms(ctx, theta, x, y).double()
                else:
                    g = tgt.grads(fm, theta)  # (Q, P)
                    for ids, x, y in ctx.train.chunks(cfg.batch_size):
                        scores[ids] += coef * fm.dots(theta, x, y, g).T.double()
                bar.update()
        out = scores if tgt.kind == "pairwise" else scores[:, 0]
        return EstimatorOutput(out, self.name)


class TracInEveryStep(Estimator):
    name = "tracin-every-step"
    summary = "TracIn, every step: first-order, θ_t replayed (needs batch ids)"
    needs_batch_ids = True
    needs_sgd = True

    def score(self, ctx: ScoringContext) -> EstimatorOutput:
        run, fm, cfg = ctx.run, ctx.fm, ctx.config
        tgt = ctx.target
        Q = 1 if tgt.kind == "self" else tgt.size
        scores = torch.zeros(ctx.n_train, Q, dtype=torch.float64)
        with ctx.bar(run.n_steps, self.name) as bar:
            for c0, c1 in run.segments:
                for t, theta in ctx.replay_reversed(c0, c1):
                    ids, x, y = ctx.batch(t)
                    eta = float(run.lrs[t])
                    if tgt.kind == "self":
                        d = _self_sq_norms(ctx, theta, x, y).unsqueeze(0)
                        add_removal_contrib(scores, ids, -eta * d, "keep")
                    else:
                        d = fm.dots(theta, x, y, tgt.grads(fm, theta))
                        add_removal_contrib(scores, ids, -eta * d, cfg.convention)
                    bar.update()
        out = scores if tgt.kind == "pairwise" else scores[:, 0]
        return EstimatorOutput(out, self.name, {"replay_drift": ctx.drift})
