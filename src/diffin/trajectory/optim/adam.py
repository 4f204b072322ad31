"""``torch.optim.Adam`` and ``torch.optim.AdamW``, exactly (docs/method.md §4.3).

PyTorch's step k (1-based, k = steps taken before + 1), c1 = 1 − β1^k, c2 = 1 − β2^k:

    Adam:   d = g + λθ,  κ = 1          AdamW (decoupled):  d = g,  κ = 1 − ηλ
    m' = β1·m + (1 − β1)·d,   v' = β2·v + (1 − β2)·d²
    r = √v' / √c2,   D = r + ε
    θ' = κ·θ − (η/c1)·m'/D

Adjoint from (θ̄', m̄', v̄'), everything elementwise:

    m̃ = m̄' − θ̄'·(η/c1)/D
    ṽ = v̄' + θ̄'·(η/c1)·m'/D² · 1/(2·c2·r)          (0 where r = 0)
    w = (1 − β1)·m̃ + 2(1 − β2)·d·ṽ                  (the coefficient of d, hence of g)
    θ̄ = κ·θ̄' (+ λ·w for Adam's coupled decay)  (+ H_B·w by the caller)
    m̄ = β1·m̃,   v̄ = β2·ṽ

``amsgrad`` and ``maximize`` are refused by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..._errors import UnsupportedOptimizerError
from .base import OptimizerRule, Scalar, State, zeros_like_state


class AdamRule(OptimizerRule):
    kinds = ("Adam", "AdamW")
    state_keys = ("exp_avg", "exp_avg_sq")

    @classmethod
    def check(cls, hyper: dict[str, Any]) -> None:
        if _any(hyper.get("amsgrad", False)):
            raise UnsupportedOptimizerError(
                "Adam/AdamW with amsgrad=True has no Diff-In rule (its running maximum is not "
                "differentiable where it switches); train with amsgrad=False or score with 'tracin'"
            )
        if _any(hyper.get("maximize", False)):
            raise UnsupportedOptimizerError("Adam with maximize=True is not supported; minimise the negated loss")

    def _parts(self, theta: Tensor, state: State, g: Tensor, lr: Scalar, k: int) -> dict[str, Any]:
        h = self.hyper
        b1, b2, eps = h["beta1"], h["beta2"], h["eps"]
        lam = h.get("weight_decay", 0.0)
        decoupled = h.get("decoupled", False)
        s = zeros_like_state(state, self.state_keys, theta)
        d = g + lam * theta if (not decoupled and _any(lam)) else g
        m1 = b1 * s["exp_avg"] + (1 - b1) * d
        v1 = b2 * s["exp_avg_sq"] + (1 - b2) * d * d
        step = k + 1
        c1 = 1 - b1 ** step
        c2 = 1 - b2 ** step
        r = torch.sqrt(v1) / _sqrt(c2)
        D = r + eps
        kappa = 1 - lr * lam if decoupled else 1.0
        return {"b1": b1, "b2": b2, "lam": lam, "decoupled": decoupled, "d": d, "m1": m1, "v1": v1,
                "c1": c1, "c2": c2, "r": r, "D": D, "kappa": kappa}

    def step(self, theta: Tensor, state: State, g: Tensor, lr: Scalar, k: int) -> tuple[Tensor, State]:
        p = self._parts(theta, state, g, lr, k)
        new = p["kappa"] * theta - (lr / p["c1"]) * p["m1"] / p["D"]
        return new, {"exp_avg": p["m1"], "exp_avg_sq": p["v1"]}

    def adjoint(
        self, theta: Tensor, state: State, g: Tensor, lr: Scalar, k: int, theta_bar: Tensor,
        state_bar: State,
    ) -> tuple[Tensor, Tensor, State]:
        p = self._parts(theta, state, g, lr, k)
        sb = zeros_like_state(state_bar, self.state_keys, theta)
        step_size = lr / p["c1"]
        m_t = sb["exp_avg"] - theta_bar * step_size / p["D"]
        r = p["r"]
        safe_r = torch.where(r > 0, r, torch.ones_like(r))
        dv = theta_bar * step_size * p["m1"] / (p["D"] * p["D"]) / (2 * p["c2"] * safe_r)
        v_t = sb["exp_avg_sq"] + torch.where(r > 0, dv, torch.zeros_like(dv))
        w = (1 - p["b1"]) * m_t + 2 * (1 - p["b2"]) * p["d"] * v_t
        th = p["kappa"] * theta_bar
        if not p["decoupled"] and _any(p["lam"]):
            th = th + p["lam"] * w
        return w, th, {"exp_avg": p["b1"] * m_t, "exp_avg_sq": p["b2"] * v_t}


def _any(x: Any) -> bool:
    return bool(x.any()) if isinstance(x, Tensor) else bool(x)


def _sqrt(x: Scalar) -> Scalar:
    return torch.sqrt(x) if isinstance(x, Tensor) else x ** 0.5
