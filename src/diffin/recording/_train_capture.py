"""Train-mode capture of a recording (BatchNorm, dropout): the modes of the modules that train
differently than they predict, seen at each step's training forward, and, with dropout in
training mode, the RNG state that draws the step's masks (:class:`TrainModeWatch`)."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

from .._errors import TrainModeError
from .._train_mode import DROPOUT_TYPES, train_mode_modules


class TrainModeWatch:
    """A forward pre-hook on the model noting, per step, the modes at its first training-mode
    forward (and the RNG state then, when dropout trains); eval-mode forwards count only when the
    step has no training forward. ``record``: False for a resumed run recorded before modes were."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.modules = train_mode_modules(model)
        self.dropouts = [n for n, m in self.modules.items() if isinstance(m, DROPOUT_TYPES)]
        self.record = True
        self.modes: dict[str, bool] | None = None  # the run's modes, fixed by its first step
        self._fwd_modes: dict[str, bool] | None = None  # the current step's training forward
        self._fwd_rng: tuple[np.ndarray, tuple[int, int]] | None = None
        self._eval_modes: dict[str, bool] | None = None  # the current step's last eval-mode forward
        self._n_train_fwd = 0
        self._hook: Any = None

    @property
    def active(self) -> bool:
        """Whether the model has such modules and their modes are recorded."""
        return bool(self.modules) and self.record

    def start(self) -> None:
        """Register the forward pre-hook (when :attr:`active`); it holds the watch weakly (an
        abandoned recorder is not kept alive by its model)."""
        if self.active:
            self._hook = self.model.register_forward_pre_hook(_weak_forward_hook(self))

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def resume(self, manifest: dict[str, Any], steps: int) -> None:
        """Take the modes of a recording resumed after ``steps`` steps."""
        if steps > 0 and "train_modes" not in manifest:
            self.record = False  # recorded before modes were: stays so
        elif steps > 0 and manifest.get("train_modes") is not None:
            self.modes = {str(k): bool(v) for k, v in manifest["train_modes"].items()}

    def current(self) -> dict[str, bool] | None:
        """The run's modes for the manifest (before the first step: the modes now)."""
        if self.modes is None and self.record:
            return {n: bool(m.training) for n, m in self.modules.items()}
        return self.modes

    def pre_forward(self) -> None:
        """Forward pre-hook on the model: the modes (and, with dropout in training mode, the RNG
        state) at the step's first training-mode forward; eval-mode forwards only count when the
        step has no training forward."""
        modes = {n: bool(m.training) for n, m in self.modules.items()}
        if not self.model.training:
            if self._n_train_fwd == 0:
                self._eval_modes = modes
            return
        self._n_train_fwd += 1
        if self._n_train_fwd == 1:
            self._fwd_modes = modes
            if any(modes[n] for n in self.dropouts):
                self._fwd_rng = self._rng_state()

    def _rng_state(self) -> tuple[np.ndarray, tuple[int, int]]:
        """torch's CPU RNG state, then the CUDA one of the model's device (uint8 bytes), and the
        two parts' sizes."""
        parts = [torch.get_rng_state().numpy()]
        if self.device.type == "cuda":
            parts.append(torch.cuda.get_rng_state(self.device).numpy())
        sizes = (int(parts[0].size), int(parts[1].size) if len(parts) > 1 else 0)
        return np.concatenate(parts).astype(np.uint8, copy=False), sizes

    def end_step(
        self, t: int, rng_bytes: tuple[int, int] | None
    ) -> tuple[dict[str, bool] | None, tuple[np.ndarray, tuple[int, int]] | None]:
        """The modes and the RNG state (with its (CPU, CUDA) sizes) of step ``t`` (None: nothing to
        record), checked: one training forward per step when a module trains differently, the same
        modes at every step, the RNG state captured when dropout was in training mode and of the
        recording's ``rng_bytes``. What was seen during the step is forgotten either way."""
        try:
            return self._step_modes(t, rng_bytes)
        finally:
            self._fwd_modes = self._eval_modes = self._fwd_rng = None
            self._n_train_fwd = 0

    def _step_modes(
        self, t: int, rng_bytes: tuple[int, int] | None
    ) -> tuple[dict[str, bool] | None, tuple[np.ndarray, tuple[int, int]] | None]:
        if not self.active:
            return None, None
        modes = self._fwd_modes or self._eval_modes or {n: bool(m.training) for n, m in self.modules.items()}
        active = [n for n, v in modes.items() if v]
        if self._n_train_fwd > 1 and active:
            raise TrainModeError(
                f"step {t}: the model ran {self._n_train_fwd} forwards in training mode since the "
                f"last Recorder.step(), with {', '.join(active[:3])} in training mode: diffin replays a "
                "step as one forward over its batch, so the batch statistics and dropout masks of several "
                "forwards (gradient accumulation, an extra forward in training mode) cannot be replayed. "
                "Do one training forward per step, run other forwards after model.eval(), or put those "
                "modules in eval mode for the whole training"
            )
        if self.modes is not None and modes != self.modes:
            diff = [f"{n}: {'train' if self.modes.get(n) else 'eval'} -> {'train' if v else 'eval'}"
                    for n, v in modes.items() if self.modes.get(n) != v]
            raise TrainModeError(
                f"step {t}: the training modes of BatchNorm/dropout modules changed during training "
                f"({', '.join(diff[:3])}); diffin records one mode per module for a run. Keep them fixed "
                "(e.g. call model.train() / freeze the same modules before every step) or start a new recording"
            )
        rng = None
        if any(modes[n] for n in self.dropouts):
            if self._fwd_rng is None:
                raise TrainModeError(
                    f"step {t}: dropout is in training mode but no training-mode forward of the "
                    "recorded model was seen since the last Recorder.step(), so its masks cannot be "
                    "replayed; call the model given to the Recorder (model(x)) in the step, not its "
                    "forward() directly"
                )
            rng = self._fwd_rng
            if rng_bytes is not None and rng[1] != rng_bytes:
                raise TrainModeError(
                    f"step {t}: the RNG state has {rng[1]} (CPU, CUDA) bytes but the recording's "
                    f"earlier steps have {rng_bytes}: the model moved between the CPU and a GPU "
                    "(e.g. on resume); record on the device the recording started on"
                )
        return modes, rng


def _weak_forward_hook(watch: TrainModeWatch) -> Any:
    """The watch's forward pre-hook on the model, holding it weakly."""
    ref = weakref.ref(watch)

    def hook(module: nn.Module, args: Any) -> None:
        w = ref()
        if w is not None:
            w.pre_forward()

    return hook
