"""The manifest schema of a run folder and the optimizer description it carries."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .._errors import CorruptManifestError, UnsupportedOptimizerError


@dataclass(frozen=True)
class OptimizerSpec:
    """What the recursion of docs/method.md §1 (the SGD step) needs to know about the optimizer.

    PyTorch SGD (``torch.optim.SGD``) is modelled exactly:
    ``g = G_B(θ) + λθ``; ``v' = μv + a·g`` (``a = 1`` on the optimizer's very first step, else
    ``1 − dampening``); ``θ' = θ − η·(g + μv')`` with Nesterov, else ``θ' = θ − η·v'``.
    Other optimizers are recorded by name; estimators that need SGD semantics refuse them.
    """

    kind: str = "SGD"
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    maximize: bool = False
    uniform_groups: bool = True
    assumed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_sgd(self) -> bool:
        return self.kind == "SGD" and not self.maximize and self.uniform_groups

    @classmethod
    def from_optimizer(cls, opt: torch.optim.Optimizer | None) -> OptimizerSpec:
        if opt is None:
            return cls(assumed=True)
        kind = type(opt).__name__
        groups = opt.param_groups
        keys = ("momentum", "dampening", "nesterov", "weight_decay", "maximize")
        g0 = groups[0]
        uniform = all(all(g.get(k) == g0.get(k) for k in (*keys, "lr")) for g in groups)
        if kind == "SGD":
            return cls(
                kind=kind,
                momentum=float(g0.get("momentum", 0.0)),
                dampening=float(g0.get("dampening", 0.0)),
                nesterov=bool(g0.get("nesterov", False)),
                weight_decay=float(g0.get("weight_decay", 0.0)),
                maximize=bool(g0.get("maximize", False)),
                uniform_groups=uniform,
            )
        extra = {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in g0.items()
            if k != "params" and isinstance(v, (int, float, bool, tuple, str))
        }
        return cls(
            kind=kind,
            weight_decay=float(g0.get("weight_decay", 0.0)),
            uniform_groups=uniform,
            extra=extra,
        )

    def hyper_of(self, opt: torch.optim.Optimizer) -> tuple:
        """The hyper-parameters that must stay constant during a recorded run."""
        g0 = opt.param_groups[0]
        return tuple(g0.get(k) for k in ("momentum", "dampening", "nesterov", "weight_decay"))

    def sgd_coefficients(self, first_step: bool) -> tuple[float, float, float]:
        """(a, α, β) of the linear step ``v' = μv + a·g``, ``θ' = θ − η(α·g + β·v)``."""
        if not self.is_sgd:
            raise UnsupportedOptimizerError(
                f"optimizer {self.kind} (maximize={self.maximize}, uniform param groups="
                f"{self.uniform_groups}) is not plain torch.optim.SGD"
            )
        mu = self.momentum
        if mu == 0.0:
            return 1.0, 1.0, 0.0
        a = 1.0 if first_step else 1.0 - self.dampening
        if self.nesterov:  # θ' = θ − η(g + μ v') = θ − η((1 + μa) g + μ² v)
            return a, 1.0 + mu * a, mu * mu
        return a, a, mu  # θ' = θ − η v' = θ − η(a g + μ v)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OptimizerSpec:
        try:
            return cls(**d)
        except TypeError as e:
            raise CorruptManifestError(f"optimizer entry of the manifest is malformed: {e}") from e


REQUIRED_KEYS = ("format_version", "n_steps", "checkpoints", "model", "optimizer", "lrs")
