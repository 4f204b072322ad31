"""A data-dependent projection: the dominant subspace of the training gradients at θ_T.

Targets are losses of examples like the training data, evaluated at θ_T, so their gradients lie
mostly in the span of the training samples' gradients there. A randomized range finder (Halko,
Martinsson and Tropp 2011) finds that span's dominant K directions without forming the N × P
Jacobian J (rows ∇ℓ_i(θ_T), with the running statistics' part for train-mode BatchNorm):

    Y = Jᵀ Ω                    K random combinations of per-sample gradients (Ω: N × K Gaussian)
    Y ← Jᵀ (J Y)                ``power_iters`` times (each: K JVPs and K weighted gradients)
    U = orth(Y)                 K × P' with orthonormal rows (UUᵀ = I)

Jᵀ ω for K weight vectors at once is one forward pass per data chunk and one batched backward
(``is_grads_batched``); J u is K forward-mode JVPs. With U as R the embedding stores U e_z and a
query returns ⟨UUᵀ∇f, e_z⟩: exact for a target gradient inside the subspace (every training
sample's own gradient when K ≥ N, so self-influence is then exact), biased (not noisy) outside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._data import DataSource
from .._functional import FlatModel
from .._tree import batch_len

JVP_BLOCK = 64


def _share_fn(fm: FlatModel, x: Any, y: Any, with_stats: bool):  # noqa: ANN202 - a local closure
    """(θ, r) → the members' losses ℓ_i (B,) in eval mode (for a batch loss, their shares in this chunk)."""
    B = batch_len(x)
    if not with_stats:
        return lambda th, r: fm.losses(th, x, y)
    if not fm.members_coupled:
        return lambda th, r: fm._per_sample(fm.forward(th, x, None, r), y, B)
    ones = torch.ones(B, dtype=fm.dtype, device=fm.device)
    return lambda th, r: B * torch.func.grad(lambda w: fm.batch_loss(th, x, y, w, stats=r))(ones)


def jt_omega(fm: FlatModel, theta: Tensor, stats: Tensor | None, train: DataSource, chunk: int,
             weights: Tensor) -> Tensor:
    """Jᵀ Ω: Σ_i Ω[i, k] ∇ℓ_i(θ_T) for each column k of ``weights`` (N, K) → (K, P')."""
    K = weights.shape[1]
    P = theta.numel()
    R = 0 if stats is None else stats.numel()
    out = torch.zeros(K, P + R, dtype=fm.dtype, device=fm.device)
    for ids, x, y in train.chunks(chunk):
        f = _share_fn(fm, x, y, stats is not None)
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            r = None if stats is None else stats.detach().requires_grad_(True)
            losses = f(th, r)
            W = weights[torch.as_tensor(ids)].T.to(fm.dtype).contiguous()  # (K, B)
            inputs = (th,) if r is None else (th, r)
            for s in range(0, K, JVP_BLOCK):
                parts = torch.autograd.grad(losses, inputs, grad_outputs=W[s: s + JVP_BLOCK], retain_graph=True,
                                            is_grads_batched=True, allow_unused=True)
                out[s: s + JVP_BLOCK, :P] += parts[0].detach() if parts[0] is not None else 0
                if r is not None and parts[1] is not None:
                    out[s: s + JVP_BLOCK, P:] += parts[1].detach()
    return out


def shares_along(fm: FlatModel, theta: Tensor, stats: Tensor | None, x: Any, y: Any, U: Tensor) -> Tensor:
    """⟨∇ℓ_i(θ_T), U_k⟩ for the samples of one batch and the rows of U (K, P') → (B, K): vmapped
    forward-mode JVPs of the members' losses, in blocks of :data:`JVP_BLOCK` rows."""
    from torch.func import jvp, vmap

    P = theta.numel()
    r0 = stats if stats is not None else torch.zeros(0, dtype=fm.dtype, device=fm.device)
    f = _share_fn(fm, x, y, stats is not None)
    cols = [vmap(lambda a, b: jvp(f, (theta, r0), (a, b))[1])(U[s: s + JVP_BLOCK, :P], U[s: s + JVP_BLOCK, P:])
            for s in range(0, len(U), JVP_BLOCK)]
    return torch.cat(cols).T


def j_u(fm: FlatModel, theta: Tensor, stats: Tensor | None, train: DataSource, chunk: int, U: Tensor) -> Tensor:
    """J Uᵀ: ⟨∇ℓ_i(θ_T), U_k⟩ for every sample and row of U (K, P') → (N, K)."""
    return torch.cat([shares_along(fm, theta, stats, x, y, U) for _, x, y in train.chunks(chunk)])


def gradient_basis(fm: FlatModel, theta: Tensor, stats: Tensor | None, train: DataSource, chunk: int, dim: int,
                   seed: int, power_iters: int = 1) -> Tensor:
    """U (dim, P') float64 with orthonormal rows spanning the dominant subspace of the training
    gradients at θ_T (randomized range finder with ``power_iters`` power iterations). ``dim`` is
    capped at N (the Jacobian's rank is at most N): then the rows span every sample's gradient."""
    N = len(train)
    K = min(dim, N)
    g = np.random.default_rng([seed, 0x6A7])
    omega = torch.as_tensor(g.standard_normal((N, K)))
    Y = jt_omega(fm, theta, stats, train, chunk, omega)
    for _ in range(power_iters):
        Q = torch.linalg.qr(Y.to(torch.float64).T).Q.T.to(fm.dtype)
        Y = jt_omega(fm, theta, stats, train, chunk, j_u(fm, theta, stats, train, chunk, Q))
    return torch.linalg.qr(Y.to(torch.float64).T).Q.T.contiguous()
