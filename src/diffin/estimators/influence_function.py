"""Influence functions at the final parameters (Koh & Liang 2017), METHOD.md section 5.

With H the Hessian of the training objective at θ_T (the mean training loss plus the recorded
weight decay's λ_wd·I) and damping λ, removing z moves θ_T by
about +(1/N)(H + λI)⁻¹G_z, so in diffin's removal sign and loss units

    score(z) = ⟨∇f(θ_T), (H + λI)⁻¹ G_z(θ_T)⟩ / N

(the classic up-weighting influence −⟨∇f, H⁻¹G_z⟩ is its negation times N). The inverse-HVP
s = (H + λI)⁻¹∇f is solved once per target by

* ``if-cg`` — conjugate gradients with full-data HVPs (streamed over the training set);
* ``if-lissa`` — the LiSSA recursion s ← ∇f + s − (H_b + λI)s/scale on random mini-batches,
  scale defaulting to twice the largest eigenvalue of H + λI. The recursion converges only for a
  positive definite H + λI: when Lanczos (scipy ``eigsh``) finds a negative eigenvalue λ_min,
  the damping is raised by 1.1·|λ_min| (the value used is ``damping`` in the diagnostics).

then ⟨s, G_z⟩ for all samples is one JVP pass. H need not be positive definite in a non-convex
model: CG then reports negative curvature (and stops along it); damping is the remedy, as in
the literature. Self-influence needs one solve per sample (N solves): only for small N.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .._errors import ConfigError
from .base import Estimator, EstimatorOutput, ScoringContext

Apply = Callable[[Tensor], Tensor]


def _full_hvp(ctx: ScoringContext, theta: Tensor) -> Apply:
    """V (Q, P) ↦ (H + λI)V with H the Hessian of the training objective at θ: the mean
    training-loss Hessian (streamed) plus the recorded weight decay, and λ the damping."""
    cfg = ctx.config
    N = ctx.n_train
    shift = cfg.damping + ctx.run.optimizer.weight_decay

    def apply(V: Tensor) -> Tensor:
        out = shift * V
        for ids, x, y in ctx.train.chunks(cfg.batch_size):
            out = out + (len(ids) / N) * ctx.fm.hvp(theta, x, y, V, mode=ctx.hvp_mode, eps=cfg.fd_eps)
        return out

    return apply


def conjugate_gradient(apply: Apply, b: Tensor, iters: int, tol: float) -> tuple[Tensor, dict]:
    """Solve A x = b for each row of b (Q, P) by CG; returns x and diagnostics.

    A column stops when its residual falls below ``tol``·‖b‖ or when it meets non-positive
    curvature pᵀAp ≤ 0 (A not positive definite along p).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    bnorm = b.norm(dim=1).clamp(min=torch.finfo(b.dtype).tiny)
    active = torch.ones(len(b), dtype=torch.bool)
    negative = torch.zeros(len(b), dtype=torch.bool)
    it = 0
    for it in range(1, iters + 1):  # noqa: B007 - reported below
        Ap = apply(p)
        curv = (p * Ap).sum(1)
        bad = active & (curv <= 0)
        negative |= bad
        active &= ~bad
        alpha = torch.where(active, rs / torch.where(active, curv, 1), 0)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * Ap
        rs_new = (r * r).sum(1)
        active &= rs_new.sqrt() > tol * bnorm
        if not active.any():
            break
        beta = torch.where(active, rs_new / rs.clamp(min=torch.finfo(b.dtype).tiny), 0)
        p = r + beta[:, None] * p
        rs = rs_new
    rel = (r.norm(dim=1) / bnorm).tolist()
    return x, {"iterations": it, "relative_residual": rel, "negative_curvature": negative.tolist()}


def extreme_eigenvalues(apply: Apply, P: int, dtype: torch.dtype, device: torch.device,
                       tol: float = 1e-2, seed: int = 0) -> tuple[float, float]:
    """Smallest and largest eigenvalue of the symmetric operator ``apply`` by Lanczos
    (scipy's ARPACK ``eigsh``; a few dozen operator applications each)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    def mv(v: np.ndarray) -> np.ndarray:
        V = torch.as_tensor(np.asarray(v).reshape(1, -1), dtype=dtype, device=device)
        return apply(V)[0].detach().cpu().double().numpy()

    op = LinearOperator((P, P), matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(P)
    if P <= 2:  # ARPACK needs k < P; tiny operators are formed densely
        M = np.stack([mv(e) for e in np.eye(P)])
        w = np.linalg.eigvalsh((M + M.T) / 2)
        return float(w[0]), float(w[-1])
    lo = eigsh(op, k=1, which="SA", tol=tol, v0=v0, return_eigenvectors=False, maxiter=20 * P)
    hi = eigsh(op, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False, maxiter=20 * P)
    return float(lo[0]), float(hi[0])


class _InfluenceFunction(Estimator):
    """Shared scoring: one inverse-HVP per target vector, then ⟨s, G_z⟩/N for all z."""

    def solve(self, ctx: ScoringContext, theta: Tensor, b: Tensor) -> tuple[Tensor, dict]:
        raise NotImplementedError  # pragma: no cover

    def score(self, ctx: ScoringContext) -> EstimatorOutput:
        fm, cfg = ctx.fm, ctx.config
        N = ctx.n_train
        theta, _ = ctx.checkpoint(ctx.run.n_steps)
        tgt = ctx.target
        if tgt.kind == "self":
            scores = torch.zeros(N, dtype=torch.float64)
            diags = []
            for ids, x, y in ctx.train.chunks(64):
                G = fm.per_sample_grads(theta, x, y)
                s, d = self.solve(ctx, theta, G)
                scores[ids] = ((s * G).sum(1) / N).double()
                diags.append(d)
            return EstimatorOutput(scores, self.name, {"solves": len(diags)})
        g = tgt.grads(fm, theta)
        s, diag = self.solve(ctx, theta, g)
        out = torch.cat([fm.dots(theta, x, y, s).T for _, x, y in ctx.train.chunks(cfg.batch_size)])
        out = out.double() / N
        return EstimatorOutput(out[:, 0] if tgt.kind == "mean" else out, self.name, diag)


class InfluenceCG(_InfluenceFunction):
    name = "if-cg"
    summary = "influence function at θ_T, (H + λI)⁻¹ by conjugate gradients"

    def solve(self, ctx: ScoringContext, theta: Tensor, b: Tensor) -> tuple[Tensor, dict]:
        cfg = ctx.config
        return conjugate_gradient(_full_hvp(ctx, theta), b, cfg.cg_iters, cfg.cg_tol)


class InfluenceLiSSA(_InfluenceFunction):
    name = "if-lissa"
    summary = "influence function at θ_T, (H + λI)⁻¹ by the LiSSA recursion"

    def solve(self, ctx: ScoringContext, theta: Tensor, b: Tensor) -> tuple[Tensor, dict]:
        cfg, fm = ctx.config, ctx.fm
        full = _full_hvp(ctx, theta)  # H + (λ_wd + λ)I
        wd = ctx.run.optimizer.weight_decay
        low, top = extreme_eigenvalues(full, fm.num_params, theta.dtype, theta.device, seed=cfg.seed)
        extra = max(0.0, -low) * 1.1  # the recursion needs H + λI positive definite
        damping = cfg.damping + extra
        scale = cfg.lissa_scale if cfg.lissa_scale is not None else 2.0 * (top + extra)
        if not scale > 0:
            raise ConfigError("LiSSA scale must be > 0")
        rng = np.random.default_rng(cfg.seed)
        bs = min(cfg.lissa_batch_size, ctx.n_train)
        s = b.clone()
        for _ in range(cfg.lissa_depth):
            x, y = ctx.train.get(rng.choice(ctx.n_train, size=bs, replace=False))
            hs = fm.hvp(theta, x, y, s, mode=ctx.hvp_mode, eps=cfg.fd_eps) + (damping + wd) * s
            s = b + s - hs / scale
        return s / scale, {"scale": scale, "depth": cfg.lissa_depth, "damping": damping,
                           "eig_max": top, "eig_min": low, "finite": bool(torch.isfinite(s).all())}
