"""Gradient-norm clipping as ``torch.nn.utils.clip_grad_norm_`` does it (docs/method.md §4.3).

    g_c = g · min(1, c / (‖g‖ + δ)),   δ = 1e-6 (PyTorch's constant)

When it clips, the transpose of its Jacobian maps the coefficient w of g_c to that of g:

    (∂g_c/∂g)ᵀ w = s · (w − g·⟨g, w⟩ / ((‖g‖ + δ)·‖g‖)),   s = c / (‖g‖ + δ)

and it is the identity when it does not. Rows of (K, P) inputs are clipped separately.
"""

from __future__ import annotations

import torch
from torch import Tensor

DELTA = 1e-6


def clip_scale(g: Tensor, max_norm: float) -> Tensor:
    """The factor min(1, c/(‖g‖+δ)) per row: shape g.shape[:-1] + (1,)."""
    n = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    return torch.clamp(max_norm / (n + DELTA), max=1.0)


def clip(g: Tensor, max_norm: float) -> Tensor:
    """The clipped gradient (P,) or (K, P)."""
    return g * clip_scale(g, max_norm)


def clip_transpose(w: Tensor, g: Tensor, max_norm: float) -> Tensor:
    """(∂g_c/∂g)ᵀ w at the unclipped gradient g; w and g of the same shape."""
    n = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    s = max_norm / (n + DELTA)
    if g.ndim == 1 and not bool(s < 1.0):  # one gradient that was not clipped: the identity
        return w
    proj = g * (g * w).sum(dim=-1, keepdim=True) / ((n + DELTA) * n.clamp(min=torch.finfo(g.dtype).tiny))
    if g.ndim == 1:
        return s * (w - proj)
    return torch.where(s < 1.0, s * (w - proj), w)


def clipped_fraction(norms: Tensor, max_norm: float) -> float:
    """Share of steps whose gradient norm exceeded the threshold."""
    return float((max_norm / (norms + DELTA) < 1.0).double().mean()) if norms.numel() else 0.0
