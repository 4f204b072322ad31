"""Influence functions at the final parameters (Koh & Liang 2017), docs/method.md §5.

With H the Hessian of the training objective at θ_T (the mean training loss plus the recorded
weight decay's λ_wd·I) and damping λ, removing z moves θ_T by
about +(1/N)(H + λI)⁻¹G_z, so in diffin's removal sign and loss units

    score(z) = ⟨∇f(θ_T), (H + λI)⁻¹ G_z(θ_T)⟩ / N

(the classic up-weighting influence −⟨∇f, H⁻¹G_z⟩ is its negation times N). The inverse-HVP
s = (H + λI)⁻¹∇f is solved once per target by

* ``if-cg`` — conjugate gradients with full-data HVPs (streamed over the training set);
* ``if-lissa`` — the LiSSA recursion s ← ∇f + s − (H_b + λI)s/scale on random mini-batches,
  scale defaulting to twice the largest eigenvalue of H + λI;

then ⟨s, G_z⟩ for all samples is one JVP pass. Self-influence needs one solve per sample (N
solves): only for small N.

**Indefinite Hessians** (docs/method.md §5, "Damping on an indefinite Hessian"). At the end of a
non-convex run H is often indefinite; then CG's answer depends on the right-hand side (the mean
target is no longer the mean of the pairwise columns) and LiSSA diverges. Both methods therefore
estimate the smallest and largest eigenvalue of H + (λ_wd + λ)I by Lanczos
(:func:`extreme_eigenvalues`, a few dozen full-data HVPs, once per scoring call); when the
smallest, λ_min, is negative the damping is raised to λ + 1.1·|λ_min|, so both solvers see the
same positive definite H + λ_eff·I (smallest eigenvalue about 0.1·|λ_min|). The diagnostics say
which Hessian was used (``hessian``), the damping asked for (``damping_requested``), the one
used (``damping``), whether it was raised (``damping_raised``), and λ_min, λ_max of
H + (λ_wd + λ)I (``eig_min``, ``eig_max``). The scores then describe the
damped problem, not the raw Hessian.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._errors import ConfigError
from .base import Estimator, EstimatorOutput, ScoringContext

log = logging.getLogger("diffin")

Apply = Callable[[Tensor], Tensor]

DAMPING_MARGIN = 0.1
"""An indefinite H + (λ_wd + λ)I gets (1 + margin)·|λ_min| more damping: the margin keeps the
damped matrix positive definite (smallest eigenvalue margin·|λ_min|) despite Lanczos's
estimate, which is accurate to about 1 % (``tol`` of :func:`extreme_eigenvalues`)."""


def _full_hvp(ctx: ScoringContext, theta: Tensor, damping: float) -> Apply:
    """V (Q, P) ↦ (H + (λ_wd + damping)I)V with H the mean training-loss Hessian at θ (streamed
    over the training set) and λ_wd the recorded weight decay."""
    cfg = ctx.config
    N = ctx.n_train
    shift = damping + ctx.run.optimizer.weight_decay

    def apply(V: Tensor) -> Tensor:
        out = shift * V
        for ids, x, y in ctx.train.chunks(ctx.product_chunk()):
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
    active = torch.ones(len(b), dtype=torch.bool, device=b.device)
    negative = torch.zeros(len(b), dtype=torch.bool, device=b.device)
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
    """Smallest and largest eigenvalue of the symmetric (P, P) operator ``apply`` by Lanczos
    (scipy's ARPACK ``eigsh``; a few dozen operator applications each), accurate to about
    ``tol`` relative. Should ARPACK not converge for the smallest one, −(the largest magnitude)
    is returned instead: a lower bound, so damping raised from it is safe but larger."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    def mv(v: np.ndarray) -> np.ndarray:
        V = torch.as_tensor(np.asarray(v).reshape(1, -1), dtype=dtype, device=device)
        return apply(V)[0].detach().cpu().double().numpy()

    if P <= 2:  # ARPACK needs k < P; tiny operators are formed densely
        M = np.stack([mv(e) for e in np.eye(P)])
        w = np.linalg.eigvalsh((M + M.T) / 2)
        return float(w[0]), float(w[-1])
    op = LinearOperator((P, P), matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(P)
    kw: dict[str, Any] = {"k": 1, "tol": tol, "v0": v0, "return_eigenvectors": False, "maxiter": 20 * P}
    hi = float(eigsh(op, which="LA", **kw)[0])
    try:
        lo = float(eigsh(op, which="SA", **kw)[0])
    except ArpackNoConvergence:
        big = float(np.abs(eigsh(op, which="LM", **kw)[0]))
        log.warning("Lanczos did not converge for the smallest Hessian eigenvalue; using the "
                    "lower bound -%.3g (larger damping than needed)", big)
        lo = -big
    return lo, hi


class _InfluenceFunction(Estimator):
    """Shared scoring: one inverse-HVP per target vector, then ⟨s, G_z⟩/N for all z."""

    def solve(self, ctx: ScoringContext, theta: Tensor, b: Tensor, curv: dict[str, Any]) -> tuple[Tensor, dict]:
        """s = (H + (λ_wd + curv["damping"])I)⁻¹ b for b (Q, P); returns s and diagnostics."""
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def curvature(ctx: ScoringContext, theta: Tensor) -> dict[str, Any]:
        """The damping both solvers use at θ_T: the config's, raised when H + (λ_wd + λ)I is
        indefinite (see the module docstring); with the Lanczos eigenvalue estimates."""
        cfg = ctx.config
        asked = float(cfg.damping)
        low, top = extreme_eigenvalues(_full_hvp(ctx, theta, asked), ctx.fm.num_params, theta.dtype,
                                       theta.device, seed=cfg.seed)
        extra = (1.0 + DAMPING_MARGIN) * -low if low < 0 else 0.0
        if extra:
            log.info("Hessian at θ_T is indefinite (λ_min %.3g): damping raised from %.3g to %.3g",
                     low, asked, asked + extra)
        return {"hessian": "exact, damped", "damping": asked + extra, "damping_requested": asked,
                "damping_raised": bool(extra), "weight_decay": float(ctx.run.optimizer.weight_decay),
                "eig_min": low, "eig_max": top}

    def score(self, ctx: ScoringContext) -> EstimatorOutput:
        fm = ctx.fm
        N = ctx.n_train
        theta = ctx.trajectory.theta(ctx.run.n_steps)
        tgt = ctx.target
        curv = self.curvature(ctx, theta)
        if tgt.kind == "self":
            scores = torch.zeros(N, dtype=torch.float64, device=ctx.fm.device)
            solves = []
            for ids, x, y in ctx.train.chunks(64):
                G = fm.per_sample_grads(theta, x, y)
                s, d = self.solve(ctx, theta, G, curv)
                scores[ids] = ((s * G).sum(1) / N).double()
                solves.append(d)
            return EstimatorOutput(scores, self.name, {**curv, **_merge(solves)})
        g = tgt.grads(fm, theta)
        s, diag = self.solve(ctx, theta, g, curv)
        out = torch.cat([fm.dots(theta, x, y, s).T for _, x, y in ctx.train.chunks(ctx.product_chunk())])
        out = out.double() / N
        return EstimatorOutput(out[:, 0] if tgt.kind == "mean" else out, self.name, {**curv, **diag})


def _merge(diags: list[dict[str, Any]]) -> dict[str, Any]:
    """Diagnostics of several solves (self-influence chunks) as one: per-column lists joined,
    the largest iteration count, ``finite`` only if every solve was."""
    out: dict[str, Any] = {"solves": len(diags)}
    for d in diags:
        for k, v in d.items():
            if isinstance(v, list):
                out[k] = out.get(k, []) + v
            elif k == "iterations":
                out[k] = max(out.get(k, 0), v)
            elif k == "finite":
                out[k] = out.get(k, True) and v
            else:
                out[k] = v
    return out


class InfluenceCG(_InfluenceFunction):
    name = "if-cg"
    summary = "influence function at θ_T, (H + λI)⁻¹ by conjugate gradients (λ raised if H is indefinite)"

    def solve(self, ctx: ScoringContext, theta: Tensor, b: Tensor, curv: dict[str, Any]) -> tuple[Tensor, dict]:
        cfg = ctx.config
        return conjugate_gradient(_full_hvp(ctx, theta, curv["damping"]), b, cfg.cg_iters, cfg.cg_tol)


class InfluenceLiSSA(_InfluenceFunction):
    name = "if-lissa"
    summary = "influence function at θ_T, (H + λI)⁻¹ by the LiSSA recursion (λ raised if H is indefinite)"

    def solve(self, ctx: ScoringContext, theta: Tensor, b: Tensor, curv: dict[str, Any]) -> tuple[Tensor, dict]:
        cfg, fm = ctx.config, ctx.fm
        shift = curv["damping"] + curv["weight_decay"]
        # largest eigenvalue of the damped matrix H + shift·I
        top = curv["eig_max"] + curv["damping"] - curv["damping_requested"]
        scale = cfg.lissa_scale if cfg.lissa_scale is not None else 2.0 * top
        if not scale > 0:
            raise ConfigError(f"LiSSA scale must be > 0 (got {scale:.3g}); pass lissa_scale > 0")
        rng = np.random.default_rng(cfg.seed)
        bs = min(cfg.lissa_batch_size, ctx.n_train)
        s = b.clone()
        for _ in range(cfg.lissa_depth):
            x, y = ctx.train.get(rng.choice(ctx.n_train, size=bs, replace=False))
            hs = fm.hvp(theta, x, y, s, mode=ctx.hvp_mode, eps=cfg.fd_eps) + shift * s
            s = b + s - hs / scale
        return s / scale, {"scale": scale, "depth": cfg.lissa_depth, "finite": bool(torch.isfinite(s).all())}
