"""Diff-In by the backward (adjoint) sweep, docs/method.md §4.1.

For one target f, with the adjoint a_t = ∂f/∂θ_t (and b_t = ∂f/∂v_t for momentum SGD):

    a_T = ∇f(θ_T), b_T = 0
    for t = T−1 … 0:
        (a, α, β) = the step's SGD coefficients:  v' = μv + a·g,  θ' = θ − η(α·g + β·v)
        w   = a·b_{t+1} − η_t·α·a_{t+1}                 (how f moves with the step's gradient g)
        for z in B_t:  score(z) += ⟨w, Δg_z⟩            (keep: Δg_z = −G_z(θ_t)/|B_t|)
        a_t = a_{t+1} + (H_{B_t}(θ_t) + λI)·w
        b_t = μ·b_{t+1} − η_t·β·a_{t+1}

For plain SGD this is exactly  score(z) += (η_t/|B_t|)⟨a_{t+1}, G_z⟩,
a_t = a_{t+1} − η_t(H_{B_t} + λI)a_{t+1}.  One batch HVP and one per-sample inner product per
step serve every training sample together; with central differences both come from two
gradient evaluations at θ_t ± εŵ.

Variants differ in the θ_t used at step t:

* ``diffin-exact``  — replayed forward from the nearest earlier checkpoint (segment by segment).
* ``diffin-frozen`` — the nearest earlier checkpoint itself (no replay).
* ``diffin-expected`` — no batch ids: θ frozen at the checkpoint, H_{B_t} from proxy batches,
  each sample credited its expected share |B|/N of every step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..targets import Target
from .base import Estimator as _Estimator
from .base import EstimatorOutput, GroupAccumulator, ScoringContext, add_removal_contrib, log

SELF_CHUNK = 64


class _Sweep(_Estimator):
    """Shared driver: mean / pairwise targets in one sweep, self-influence in chunks."""

    needs_sgd = True
    group_acc: GroupAccumulator | None = None

    def score(self, ctx: ScoringContext) -> EstimatorOutput:
        tgt = ctx.target
        if tgt.kind == "self":
            scores = torch.zeros(ctx.n_train, dtype=torch.float64)
            chunks = range(0, ctx.n_train, SELF_CHUNK)
            for start in chunks:
                ids = np.arange(start, min(start + SELF_CHUNK, ctx.n_train))
                m = self.sweep(ctx, tgt.subset(ids))
                scores[ids] = m[torch.as_tensor(ids), torch.arange(len(ids))]
        else:
            m = self.sweep(ctx, tgt)
            scores = m[:, 0] if tgt.kind == "mean" else m
        groups = None
        if self.group_acc is not None:
            groups = self.group_acc.values
            groups = groups[:, 0] if tgt.kind == "mean" else groups
        return EstimatorOutput(scores, self.name, {"replay_drift": ctx.drift}, group_scores=groups)

    def sweep(self, ctx: ScoringContext, target: Target) -> Tensor:  # pragma: no cover
        raise NotImplementedError


def _coefficients(ctx: ScoringContext, t: int, A: Tensor, Bv: Tensor | None) -> Tensor:
    """w = a·b_{t+1} − η_t·α·a_{t+1}: the adjoint's coefficient of the step's gradient g."""
    eta = float(ctx.run.lrs[t])
    a, alpha, _ = ctx.run.optimizer.sgd_coefficients(ctx.first_step_fresh(t))
    w = -eta * alpha * A
    if Bv is not None:
        w = w + a * Bv
    return w


def _adjoint_update(
    ctx: ScoringContext, t: int, A: Tensor, Bv: Tensor | None, W: Tensor, HW: Tensor
) -> tuple[Tensor, Tensor | None]:
    """(a_t, b_t) from (a_{t+1}, b_{t+1}), w and H_{B_t}·w."""
    opt = ctx.run.optimizer
    A_new = A + HW
    if opt.weight_decay:
        A_new = A_new + opt.weight_decay * W
    if Bv is not None:
        _, _, beta = opt.sgd_coefficients(ctx.first_step_fresh(t))
        Bv = opt.momentum * Bv - float(ctx.run.lrs[t]) * beta * A
    return A_new, Bv


def _start(ctx: ScoringContext, target: Target) -> tuple[Tensor, Tensor | None, Tensor]:
    theta_T, _ = ctx.checkpoint(ctx.run.n_steps)
    A = target.grads(ctx.fm, theta_T)  # (Q, P)
    Bv = torch.zeros_like(A) if ctx.run.optimizer.momentum else None
    scores = torch.zeros(ctx.n_train, A.shape[0], dtype=torch.float64, device=A.device)
    return A, Bv, scores


class DiffInExact(_Sweep):
    """Backward sweep with θ_t replayed from the nearest earlier checkpoint (best, default)."""

    name = "diffin-exact"
    summary = "Diff-In backward sweep, θ_t replayed from checkpoints (needs batch ids)"
    needs_batch_ids = True
    replay = True

    def sweep(self, ctx: ScoringContext, target: Target) -> Tensor:
        cfg = ctx.config
        A, Bv, scores = _start(ctx, target)
        if ctx.groups is not None and target.kind != "self":
            self.group_acc = GroupAccumulator(ctx.groups, ctx.n_train, A.shape[0], cfg.convention)
        with ctx.bar(ctx.run.n_steps, self.name) as bar:
            for c0, c1 in reversed(ctx.run.segments):
                if self.replay:
                    states = ctx.replay_reversed(c0, c1)
                else:
                    theta_c, _ = ctx.checkpoint(c0)
                    states = ((t, theta_c) for t in range(c1 - 1, c0 - 1, -1))
                for t, theta in states:
                    ids, x, y = ctx.batch(t)
                    W = _coefficients(ctx, t, A, Bv)
                    HW, d = ctx.fm.hvp_and_dots(
                        theta, x, y, W, mode=ctx.hvp_mode, eps=cfg.fd_eps, dots=cfg.dots
                    )
                    add_removal_contrib(scores, ids, d, cfg.convention)
                    if self.group_acc is not None:
                        self.group_acc.add(ids, d)
                    A, Bv = _adjoint_update(ctx, t, A, Bv, W, HW)
                    bar.update()
        return scores


class DiffInFrozen(DiffInExact):
    """Backward sweep with θ frozen at the nearest earlier checkpoint (no replay)."""

    name = "diffin-frozen"
    summary = "Diff-In backward sweep, θ frozen at the nearest earlier checkpoint (needs batch ids)"
    replay = False


class DiffInExpected(_Sweep):
    """Backward sweep without batch ids: proxy batches and expected per-step credit.

    Each sample is in B_t with probability |B|/N, so its expected credit at step t is
    ⟨w_t, −G_z⟩/N. With θ frozen at checkpoint c over the segment, the credits sum to
    −⟨Σ_t w_t, G_z(θ_c)⟩/N: one pass of per-sample inner products per checkpoint.
    """

    name = "diffin-expected"
    summary = "Diff-In sweep from checkpoints and learning rates only (proxy batches)"

    def sweep(self, ctx: ScoringContext, target: Target) -> Tensor:
        cfg = ctx.config
        fm = ctx.fm
        N = ctx.n_train
        b = ctx.proxy_batch_size()
        A, Bv, scores = _start(ctx, target)
        rng = np.random.default_rng(cfg.seed)
        with ctx.bar(ctx.run.n_steps, self.name) as bar:
            for c0, c1 in reversed(ctx.run.segments):
                theta, _ = ctx.checkpoint(c0)
                proxies = None
                if cfg.proxy_batches is not None:
                    proxies = [rng.choice(N, size=b, replace=False) for _ in range(cfg.proxy_batches)]
                W_sum = torch.zeros_like(A)
                for t in range(c1 - 1, c0 - 1, -1):
                    ids = (proxies[(t - c0) % len(proxies)] if proxies is not None
                           else rng.choice(N, size=b, replace=False))
                    x, y = ctx.train.get(ids)
                    W = _coefficients(ctx, t, A, Bv)
                    W_sum += W
                    HW = fm.hvp(theta, x, y, W, mode=ctx.hvp_mode, eps=cfg.fd_eps)
                    A, Bv = _adjoint_update(ctx, t, A, Bv, W, HW)
                    bar.update()
                D = torch.cat(
                    [fm.dots(theta, x, y, W_sum).T for _, x, y in ctx.train.chunks(cfg.batch_size)]
                ).to(scores.dtype)  # (N, Q)
                if cfg.convention == "keep":
                    scores -= D / N
                else:
                    bb = ctx.run.batch_size_hint() or b
                    scores -= (bb / max(bb - 1, 1)) * (D - D.mean(dim=0, keepdim=True)) / N
        return scores


class DiffIn(_Estimator):
    """Picks the best Diff-In variant the recording allows (exact, else expected)."""

    name = "diffin"
    summary = "Diff-In, best variant the run allows: diffin-exact, else diffin-expected"
    needs_sgd = True

    def score(self, ctx: ScoringContext) -> EstimatorOutput:
        chosen = DiffInExact if ctx.run.has_batch_ids else DiffInExpected
        log.info("diffin: using variant %s", chosen.name)
        out = chosen().score(ctx)  # group scores come with it when the variant supports them
        out.variant = chosen.name
        return out
