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
from .base import OptimizerRule, Scalar, State


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

    def _parts(self, theta: Tensor, state: State, g: Tensor, lr: Scalar, k: int,
               after: State | None = None) -> dict[str, Any]:
        """The forward quantities of the step (d, m', v', r, D, ...), with as few passes over P as
        the hyper-parameters allow (a step is a handful of elementwise ops on P numbers); m', v'
        taken from ``after`` (the state the replayed step produced) when given."""
        h = self.hyper
        b1, b2, eps = h["beta1"], h["beta2"], h["eps"]
        lam = h.get("weight_decay", 0.0)
        decoupled = h.get("decoupled", False)
        d = g + lam * theta if (not decoupled and _any(lam)) else g
        m0, v0 = state.get("exp_avg"), state.get("exp_avg_sq")
        if after is not None and "exp_avg" in after and "exp_avg_sq" in after:
            m1, v1 = after["exp_avg"], after["exp_avg_sq"]  # what the replay's step computed
        else:
            m1 = (1 - b1) * d if m0 is None else torch.lerp(m0, d, 1 - b1)  # β1·m + (1 − β1)·d, as torch does
            if isinstance(b2, float):
                v1 = (1 - b2) * d * d if v0 is None else torch.addcmul(v0 * b2, d, d, value=1 - b2)
            else:
                v1 = (1 - b2) * d * d if v0 is None else b2 * v0 + (1 - b2) * d * d
        step = k + 1
        c1 = 1 - b1 ** step
        c2 = 1 - b2 ** step
        r = torch.sqrt(v1 / c2)
        D = r + eps
        kappa = 1 - lr * lam if decoupled else 1.0
        return {"b1": b1, "b2": b2, "lam": lam, "decoupled": decoupled, "d": d, "m1": m1, "v1": v1,
                "c1": c1, "c2": c2, "r": r, "D": D, "kappa": kappa}

    def step(self, theta: Tensor, state: State, g: Tensor, lr: Scalar, k: int) -> tuple[Tensor, State]:
        p = self._parts(theta, state, g, lr, k)
        kappa = p["kappa"]
        base = theta if isinstance(kappa, float) and kappa == 1.0 else kappa * theta
        new = base - (lr / p["c1"]) * p["m1"] / p["D"]
        return new, {"exp_avg": p["m1"], "exp_avg_sq": p["v1"]}

    def adjoint(
        self, theta: Tensor, state: State, g: Tensor, lr: Scalar, k: int, theta_bar: Tensor,
        state_bar: State, after: State | None = None,
    ) -> tuple[Tensor, Tensor, State]:
        p = self._parts(theta, state, g, lr, k, after)
        # θ̄'·(η/c1)/D, shared by m̃ and ṽ
        common = theta_bar * ((lr / p["c1"]) / p["D"])
        m_t = -common if "exp_avg" not in state_bar else state_bar["exp_avg"] - common
        # (η/c1)·m'/D² / (2·c2·r): where r = 0 every gradient so far was 0, so m' = 0 too and the
        # term is 0 (r is floored only to avoid 0/0). m'/r first: it stays O(1) for tiny r, where
        # D·c2·r would underflow to 0 in float32
        tiny = torch.finfo(p["r"].dtype).tiny
        coef_v = (p["m1"] / p["r"].clamp_min(tiny)) / (p["D"] * (2 * p["c2"]))
        dv = common * coef_v
        v_t = dv if "exp_avg_sq" not in state_bar else state_bar["exp_avg_sq"] + dv
        b2 = p["b2"]
        if isinstance(b2, float):
            w = torch.addcmul((1 - p["b1"]) * m_t, p["d"], v_t, value=2 * (1 - b2))
        else:
            w = (1 - p["b1"]) * m_t + (2 * (1 - b2)) * p["d"] * v_t
        kappa = p["kappa"]
        th = theta_bar if isinstance(kappa, float) and kappa == 1.0 else kappa * theta_bar
        if not p["decoupled"] and _any(p["lam"]):
            th = th + p["lam"] * w
        return w, th, {"exp_avg": p["b1"] * m_t, "exp_avg_sq": p["b2"] * v_t}


def _any(x: Any) -> bool:
    return bool(x.any()) if isinstance(x, Tensor) else bool(x)


