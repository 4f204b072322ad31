"""``torch.optim.SGD``: plain, momentum, dampening, Nesterov and (coupled) weight decay.

PyTorch's step, with g the batch gradient, λ the weight decay, μ the momentum, τ the dampening:

    d = g + λθ
    b' = d                   on the buffer's first step (no buffer yet)
    b' = μ·b + (1 − τ)·d     afterwards
    θ' = θ − η·(d + μ·b')    Nesterov,   θ' = θ − η·b'  otherwise (θ' = θ − η·d without momentum)

Written as b' = μb + a·d, θ' = θ − η(α·d + β·b) with (a, α, β) = (1 or 1 − τ, a, μ), or for
Nesterov (a, 1 + μa, μ²). Adjoint (docs/method.md §4.1), from (θ̄', b̄'):

    w = a·b̄' − η·α·θ̄'       (the coefficient of d, hence of g)
    θ̄ = θ̄' + λ·w  (+ H_B·w by the caller)
    b̄ = μ·b̄' − η·β·θ̄'
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..._errors import UnsupportedOptimizerError
from .base import OptimizerRule, Scalar, State


class SGDRule(OptimizerRule):
    kinds = ("SGD",)
    state_keys = ("momentum_buffer",)

    @classmethod
    def check(cls, hyper: dict[str, Any]) -> None:
        if hyper.get("maximize"):
            raise UnsupportedOptimizerError("SGD with maximize=True is not supported; minimise the negated loss")

    def _coefficients(self, state: State) -> tuple[Any, Any, Any, Any]:
        h = self.hyper
        mu, damp = h.get("momentum", 0.0), h.get("dampening", 0.0)
        a = 1.0 if "momentum_buffer" not in state else 1.0 - damp
        if h.get("nesterov", False):
            return mu, a, 1.0 + mu * a, mu * mu
        return mu, a, a, mu

    def uses_momentum(self) -> bool:
        mu = self.hyper.get("momentum", 0.0)
        return bool(mu.any()) if isinstance(mu, Tensor) else mu != 0.0

    def step(self, theta: Tensor, state: State, g: Tensor, lr: Scalar, k: int) -> tuple[Tensor, State]:
        """θ' and the buffer, in ``torch.optim.SGD``'s order of operations (``add`` with ``alpha``
        where the coefficient is a float), so a replayed step rounds as the recorded one did and
        makes one pass over θ where ``θ − η·d`` made two."""
        lam = self.hyper.get("weight_decay", 0.0)
        d = _axpy(g, theta, lam) if _nonzero(lam) else g
        if not self.uses_momentum():
            return _axpy(theta, d, -lr), {}
        mu, a, _, _ = self._coefficients(state)
        b = state.get("momentum_buffer")
        nesterov = self.hyper.get("nesterov", False)
        if b is None:  # the buffer starts as d (torch clones d; no dampening on the first step)
            new_b = d.clone()
        else:
            new_b = _axpy(mu * b, d, a)
        direction = _axpy(d, new_b, mu) if nesterov else new_b
        return _axpy(theta, direction, -lr), {"momentum_buffer": new_b}

    def adjoint(
        self, theta: Tensor, state: State, g: Tensor, lr: Scalar, k: int, theta_bar: Tensor,
        state_bar: State, after: State | None = None,
    ) -> tuple[Tensor, Tensor, State]:
        lam = self.hyper.get("weight_decay", 0.0)
        if not self.uses_momentum():
            w = -lr * theta_bar
            return w, (theta_bar + lam * w if _nonzero(lam) else theta_bar), {}
        mu, a, alpha, beta = self._coefficients(state)
        b_bar = state_bar.get("momentum_buffer")
        w = -lr * alpha * theta_bar
        if b_bar is not None:
            w = w + a * b_bar
        th = theta_bar + lam * w if _nonzero(lam) else theta_bar
        if "momentum_buffer" not in state:  # the buffer started from d: nothing flows further back
            return w, th, {}
        new_b = -lr * beta * theta_bar
        if b_bar is not None:
            new_b = new_b + mu * b_bar
        return w, th, {"momentum_buffer": new_b}


def _axpy(x: Tensor, y: Tensor, a: Scalar) -> Tensor:
    """x + a·y: one fused pass (``torch.add(..., alpha=a)``) when a is a float, else elementwise
    with a's (P,) vector (per-group hyperparameters)."""
    if isinstance(a, Tensor):
        return x + a * y
    return torch.add(x, y, alpha=a)


def _nonzero(x: Scalar) -> bool:
    return bool(x.any()) if isinstance(x, Tensor) else x != 0.0
