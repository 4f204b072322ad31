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
        lam = self.hyper.get("weight_decay", 0.0)
        d = g + lam * theta if _nonzero(lam) else g
        if not self.uses_momentum():
            return theta - lr * d, {}
        mu, a, alpha, beta = self._coefficients(state)
        b = state.get("momentum_buffer")
        if b is None:
            return theta - lr * (alpha * d), {"momentum_buffer": a * d}
        return theta - lr * (alpha * d + beta * b), {"momentum_buffer": mu * b + a * d}

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


def _nonzero(x: Scalar) -> bool:
    return bool(x.any()) if isinstance(x, Tensor) else x != 0.0
