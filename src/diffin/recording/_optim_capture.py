"""Optimizer capture of a recording: what each ``optimizer.step()`` used (every group's learning
rate, the hyper-parameters, the gradient norm under clipping; :class:`OptimizerWatch`, a step
pre-hook) and the optimizer's per-parameter state for checkpoints (:func:`optimizer_state`)."""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

from .._errors import RecordingError, UnsupportedOptimizerError, UnsupportedOptimizerWarning
from .manifest import OptimizerSpec, group_hypers

_SWEEP_KINDS = "SGD, Adam or AdamW"
_CLIP_SLACK = 1e-3
"""Relative slack of the clipping check: ``clip_grad_norm_`` leaves a norm of at most
``max_norm·‖g‖/(‖g‖ + 1e-6)``; a gradient norm above ``max_norm·(1 + _CLIP_SLACK)`` at
``optimizer.step()`` was not clipped."""


class OptimizerWatch:
    """What the optimizer's steps used since the last ``Recorder.step()``, seen by a step
    pre-hook, and the checks of one recorded step against the recording's optimizer ``spec``.
    Without an optimizer: plain SGD with the ``lr`` passed to each step."""

    def __init__(self, optimizer: torch.optim.Optimizer | None, spec: OptimizerSpec, model: nn.Module,
                 trainable_params: list[torch.Tensor], clip_grad_norm: float | None) -> None:
        self.optimizer = optimizer
        self.spec = spec
        self.model = model
        self.clip_grad_norm = clip_grad_norm
        self._params = trainable_params
        self._n_groups = len(spec.groups)
        self._stepped: list[dict[str, Any]] = []  # what the pre-hook saw since the last step()
        self._n_stepped = 0
        self._hook: Any = None

    def start(self) -> None:
        """Register the step pre-hook (holding the watch weakly) when there is an optimizer."""
        if self.optimizer is not None:
            self._hook = self.optimizer.register_step_pre_hook(_weak_hook(self))

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Step pre-hook: the learning rates, hyper-parameters and gradient norm the step uses (the
        norm is not checked for ``step(closure)``: the closure computes the gradient after this hook,
        as Lightning's steps do)."""
        seen: dict[str, Any] = {
            "lrs": [float(g["lr"]) for g in optimizer.param_groups],
            "hyper": group_hypers(optimizer),
        }
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0]: the optimizer
        if self.clip_grad_norm is not None and closure is None:  # a closure computes the step's gradient later
            grads = [p.grad.detach() for p in self._params if p.grad is not None and not p.grad.is_sparse]
            if grads:
                norms = torch.stack([torch.linalg.vector_norm(g, 2).to(torch.float64) for g in grads])
                seen["grad_norm"] = float(torch.linalg.vector_norm(norms, 2))
        if len(self._stepped) < 2:  # two are enough to refuse "stepped twice"
            self._stepped.append(seen)
        else:
            self._stepped[-1] = seen
        self._n_stepped += 1

    def reset(self) -> None:
        """Forget what the steps since the last ``Recorder.step()`` used (it is recorded)."""
        self._stepped.clear()
        self._n_stepped = 0

    def step_lrs(self, lr: float | None, t: int) -> np.ndarray:
        """Every group's learning rate of step ``t``, (G,) float64, checked."""
        if self.optimizer is None:
            if lr is None:
                raise RecordingError("pass lr= to step() when the Recorder has no optimizer")
            lrs = np.array([float(lr)] * self._n_groups, dtype=np.float64)
        else:
            if self._n_stepped > 1:
                n = self._n_stepped
                self.reset()
                raise RecordingError(
                    f"optimizer.step() ran {n} times since the last "
                    "Recorder.step(); call rec.step(ids) once after every optimizer.step()"
                )
            if self._stepped:
                used = self._stepped[0]["lrs"]
            else:  # the optimizer did not step through torch's hooks: read its current rates
                used = [float(g["lr"]) for g in self.optimizer.param_groups]
            lrs = np.array(used, dtype=np.float64)
            if lr is not None and not np.isclose(float(lr), lrs[0], rtol=1e-12, atol=0.0):
                raise RecordingError(
                    f"step {t}: lr={float(lr)!r} was passed but the optimizer stepped with "
                    f"lr={float(lrs[0])!r} (param group 0); leave lr= out, diffin reads every group's rate "
                    "from the optimizer"
                )
        bad = lrs[~np.isfinite(lrs) | (lrs < 0)]
        if bad.size:
            raise RecordingError(f"learning rate must be finite and >= 0, got {float(bad[0])}")
        if self._stepped and "grad_norm" in self._stepped[0]:
            norm, c = self._stepped[0]["grad_norm"], self.clip_grad_norm
            if c is not None and norm > c * (1 + _CLIP_SLACK):
                raise RecordingError(
                    f"step {t}: the gradient norm at optimizer.step() was {norm:.6g}, above "
                    f"clip_grad_norm={c:g}: the loop did not clip. Call "
                    f"torch.nn.utils.clip_grad_norm_(model.parameters(), {c:g}) after backward() and "
                    "before optimizer.step(), or record without clip_grad_norm"
                )
        return lrs

    def check(self, t: int) -> None:
        """Refuse a change of the param groups or of a hyper-parameter other than the lr."""
        if self.optimizer is None:
            return
        seen = [h["hyper"] for h in self._stepped] + [group_hypers(self.optimizer)]
        want = [g["hyper"] for g in self.spec.groups]
        names = {id(p): n for n, p in self.model.named_parameters()}
        now = [[names.get(id(p), "?") for p in g["params"]] for g in self.optimizer.param_groups]
        if now != [g["params"] for g in self.spec.groups]:
            raise UnsupportedOptimizerError(
                f"step {t}: the optimizer's param groups changed during training (e.g. "
                "add_param_group); diffin records them once. Keep them fixed or start a new recording"
            )
        for hypers in seen:
            for j, (h, w) in enumerate(zip(hypers, want)):
                if h != w:
                    diff = sorted(k for k in set(h) | set(w) if h.get(k) != w.get(k))
                    raise UnsupportedOptimizerError(
                        f"step {t}: {', '.join(diff)} of param group {j} changed during training "
                        f"({', '.join(f'{k}: {w.get(k)!r} -> {h.get(k)!r}' for k in diff)}); diffin "
                        "records hyper-parameters other than the learning rate once. Keep them "
                        "constant or start a new recording"
                    )


def optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, trainable: list[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int], list[str]]:
    """The optimizer's per-parameter state: (state name → {parameter name → tensor shaped like the
    parameter}, {parameter name → step count}, the "parameter: key" entries left out because they
    are neither such a tensor nor ``step``)."""
    named = dict(model.named_parameters())
    state: dict[str, dict[str, torch.Tensor]] = {}
    steps: dict[str, int] = {}
    missing: list[str] = []
    for n in trainable:
        prm = named[n]
        for key, val in optimizer.state.get(prm, {}).items():
            if key == "step" and (isinstance(val, (int, float)) or (torch.is_tensor(val) and val.numel() == 1)):
                steps[n] = int(float(val))
            elif torch.is_tensor(val) and val.shape == prm.shape and isinstance(key, str) and "." not in key:
                state.setdefault(key, {})[n] = val.detach()
            else:
                missing.append(f"{n}: {key}")
    return state, steps, missing


def step_dtype(fused: bool) -> torch.dtype:
    """The dtype torch's own optimizers give ``state["step"]``."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def check_clip(value: Any) -> float | None:
    """``clip_grad_norm`` of a Recorder, checked: None or a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise RecordingError(
            f"clip_grad_norm must be None (the loop does not clip) or the finite max_norm > 0 the loop "
            f"passes to torch.nn.utils.clip_grad_norm_, got {value!r}"
        )
    return float(value)


def warn_without_rule(spec: OptimizerSpec) -> None:
    """Warn when the sweep variants will not be able to score the run (no rule, or a setting the
    rule refuses, e.g. amsgrad)."""
    from ..trajectory.optim import get_rule  # noqa: PLC0415 - the trajectory layer imports recording

    try:
        rule = get_rule(spec.kind)
        for g in spec.groups:
            rule.check(g["hyper"])
    except UnsupportedOptimizerError as e:
        warnings.warn(
            f"{e} — the run is recorded; 'tracin', 'if-cg' and 'grad-dot' will score it, but the "
            f"Diff-In sweep variants (diffin, diffin-exact, diffin-frozen, diffin-expected) need "
            f"{_SWEEP_KINDS} (without amsgrad or maximize).",
            UnsupportedOptimizerWarning, stacklevel=3,
        )


def _weak_hook(watch: OptimizerWatch) -> Any:
    """The watch's step pre-hook holding it weakly (an abandoned recorder is not kept alive)."""
    ref = weakref.ref(watch)

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        w = ref()
        if w is not None:
            w.pre_step(optimizer, args, kwargs)

    return hook
