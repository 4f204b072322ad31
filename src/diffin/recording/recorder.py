"""Record a training run from a plain PyTorch loop.

    rec = diffin.Recorder("runs/mnist", model, optimizer=opt, checkpoint_every=50)  # saves θ_0
    for ids, x, y in loader:
        loss = criterion(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        rec.step(ids)            # after opt.step(): every group's lr is read from the optimizer
    rec.close()                  # saves θ_T and the final manifest

With gradient clipping, pass the threshold to the recorder too; with gradient accumulation, pass
the ids of every micro-batch of the step (see :class:`Recorder`).
Models with BatchNorm or dropout need nothing more: the recorder notes their training modes and,
with dropout, the RNG state of each step's training forward (see :class:`Recorder`).

The folder is a valid run up to its last checkpoint at all times: per-step learning rates, batch
ids and batch offsets go to append-only logs as they come, and at every checkpoint the manifest is
rewritten atomically to say how far they are valid. If the process is killed, the run loads (with
a :class:`~diffin._errors.PartialRunWarning`) up to that checkpoint, and a restarted loop continues
it:

    start = diffin.recording.restore_checkpoint("runs/mnist", model, opt)  # 0: nothing to resume
    rec = diffin.Recorder("runs/mnist", model, optimizer=opt, checkpoint_every=50, resume=True)
    for t in range(rec.steps, T): ...          # the batches of steps rec.steps, rec.steps + 1, …
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import uuid
import warnings
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _constants as C
from .._errors import (
    InvalidIdsError,
    PartialRunWarning,
    RecordingError,
    ResumeError,
    RunExistsError,
    TrainModeError,
    UnsupportedOptimizerError,
    UnsupportedOptimizerWarning,
)
from .._io import write_json, write_safetensors
from .._train_mode import DROPOUT_TYPES, train_mode_modules
from .._version import __version__
from .manifest import OptimizerSpec, group_hypers
from .run import Checkpoint, Run, sha256_prefix

_OURS = (C.MANIFEST, C.CHECKPOINT_DIR, C.GROUP_LRS_LOG, C.LRS_LOG, C.BATCH_IDS_LOG, C.BATCH_OFFSETS_LOG,
         C.V1_LRS, C.V1_BATCH_IDS, C.V1_BATCH_OFFSETS, C.V1_BATCH_IDS + C.V1_PARTIAL_SUFFIX, C.RNG_LOG)
"""Every name a run folder (format 1, 2 or 3) may hold; an ``overwrite=True`` removes them."""

_SWEEP_KINDS = "SGD, Adam or AdamW"
_CLIP_SLACK = 1e-3
"""Relative slack of the clipping check: ``clip_grad_norm_`` leaves a norm of at most
``max_norm·‖g‖/(‖g‖ + 1e-6)``; a gradient norm above ``max_norm·(1 + _CLIP_SLACK)`` at
``optimizer.step()`` was not clipped."""


class Recorder:
    """Writes θ_0, checkpoints, per-step learning rates and batch ids of a training run.

    Args:
        path: run folder to create (or, with ``resume=True``, to continue).
        model: the module being trained. Its parameters are read at construction (θ_0), at
            every checkpoint and at :meth:`close` (θ_T).
        optimizer: the optimizer. Every param group (its parameters and hyper-parameters) is
            recorded, every group's learning rate at every step is read from it, and checkpoints
            hold its per-parameter state (momentum buffers, Adam's moments and step count, …).
            ``SGD``, ``Adam`` and ``AdamW`` support every Diff-In variant; other optimizers (and
            Adam's ``amsgrad``) record with an :class:`~diffin._errors.UnsupportedOptimizerWarning`:
            'tracin', 'if-cg' and 'grad-dot' score them. Without an optimizer, plain SGD with the
            ``lr`` passed to :meth:`step` is assumed.
        checkpoint_every: save θ every this many steps (θ_0 and θ_T are always saved).
        seed: the training seed, stored for reference.
        n_train: size of the training set, if known (ids are checked against it).
        overwrite: replace an existing recording at ``path``.
        clip_grad_norm: the ``max_norm`` the training loop passes to
            ``torch.nn.utils.clip_grad_norm_`` (over all trainable parameters, L2 norm) before every
            ``optimizer.step()``, or ``None`` when it does not clip. Recorded so that scoring
            replays the clipped steps; at every ``optimizer.step()`` the recorder checks that the
            gradient norm is within it (:class:`~diffin._errors.RecordingError` otherwise).
        resume: continue the unfinished recording at ``path`` (killed, or interrupted by an
            exception) from its last checkpoint S: the logs are cut back to S and recording goes
            on at step S (:attr:`steps`). The model and the optimizer's state (momentum
            buffers, Adam's moments and step counts) must hold the checkpoint's values already —
            load them with :func:`restore_checkpoint` first — and the optimizer, ``checkpoint_every``,
            ``clip_grad_norm``, ``seed`` and ``n_train`` must be those of the recording (``seed`` /
            ``n_train`` left ``None`` take the recorded ones); otherwise
            :class:`~diffin._errors.ResumeError`. A folder without a recording is simply started;
            a complete run is refused.

    Call :meth:`step` once after every ``optimizer.step()``; call :meth:`close` at the end
    (or use the recorder as a context manager). The usual AdamW loop, with two param groups
    (weight decay on weights only), a schedule, clipping and gradient accumulation::

        decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
        rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                 {"params": rest, "weight_decay": 0.0}], lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / T)))
        with diffin.Recorder("runs/x", model, opt, checkpoint_every=50, clip_grad_norm=1.0) as rec:
            for micro in steps:                          # micro: [(ids, x, y), …] of equal sizes
                opt.zero_grad()
                for ids, x, y in micro:
                    (criterion(model(x), y) / len(micro)).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                rec.step([ids for ids, _, _ in micro])   # the step's batch: the union of its micro-batches
                sched.step()

    The learning rates recorded for a step are those the optimizer held when its ``step()`` ran
    (the recorder registers a step pre-hook), so calling ``sched.step()`` before or after
    :meth:`step` records the same. Hyper-parameters other than the learning rate (momentum,
    betas, weight decay, …) must stay constant: changing one raises
    :class:`~diffin._errors.UnsupportedOptimizerError`.

    Crash safety: the per-step logs are append-only raw files written at every step, and the
    manifest is rewritten atomically at every checkpoint with ``status: "recording"``, the
    checkpoints so far and how many log entries they cover. A killed process leaves a run that
    loads up to its last checkpoint. An exception inside ``with Recorder(...)`` closes the run at
    its **last checkpoint** (``status: "interrupted"``, with the exception's type and the step it
    hit): the exception may come between ``optimizer.step()`` and :meth:`step`, where the model's
    θ belongs to no recorded step, so θ is not saved then and the steps after the last checkpoint
    (at most ``checkpoint_every − 1``) are dropped. The exception propagates.

    BatchNorm and dropout (modules that train differently than they predict: BatchNorm1d/2d/3d,
    Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout). The recorder hooks the model's
    forward (a forward pre-hook) and notes, at each step's **training forward** — the first call of
    ``model(...)`` with ``model.training`` True since the previous :meth:`step` — the mode of every such
    module (``Run.train_modes``; when a step has no training forward, the modes of its last forward,
    else the modes at :meth:`step`); evaluation forwards in eval mode between steps are ignored.
    Checkpoints (θ_0, every checkpoint, θ_T) hold every buffer, running statistics and
    ``num_batches_tracked`` included. When some dropout module is in training mode, the RNG state
    at the start of each step's training forward is logged (``torch.get_rng_state()``, and the CUDA
    generator's state of the model's device when the model is on a GPU; ``Run.rng_state(t)``,
    ``Run.cuda_rng_state(t)``), so that the step's masks can be drawn again. A loop with dropout
    needs nothing beyond ``model.train()`` and one ``model(x)`` per step::

        for ids, x, y in loader:
            model.train()                     # BatchNorm uses batch statistics, dropout draws masks
            loss = criterion(model(x), y)     # the step's one training forward
            opt.zero_grad(); loss.backward(); opt.step()
            rec.step(ids)
            model.eval()                      # evaluation forwards (if any) in eval mode: ignored

    What breaks the replay of a step: several training forwards per step while a BatchNorm or
    dropout module is in training mode (gradient accumulation, an extra train-mode forward), since a
    step is replayed as one forward over its batch; changing a module's mode during training; both
    raise :class:`~diffin._errors.TrainModeError` at :meth:`step`. Not detectable, and also breaking
    the replay of dropout masks: random numbers drawn inside the forward other than by those modules
    (``torch.nn.functional.dropout`` called directly, noise injection, random augmentation inside
    ``forward``), a dropout module called twice in one forward, or the forward run on another
    device than the model's parameters.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        checkpoint_every: int = 50,
        *,
        seed: int | None = None,
        n_train: int | None = None,
        overwrite: bool = False,
        resume: bool = False,
        clip_grad_norm: float | None = None,
    ) -> None:
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise RecordingError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
        if overwrite and resume:
            raise RecordingError("pass overwrite=True (start a new run) or resume=True (continue it), not both")
        self.path = Path(path)
        self.model = model
        self.optimizer = optimizer
        self.checkpoint_every = checkpoint_every
        self.seed = seed
        self.n_train = n_train
        self.clip_grad_norm = _check_clip(clip_grad_norm)

        params = dict(model.named_parameters())
        if not params:
            raise RecordingError("the model has no parameters to record")
        if optimizer is not None:
            in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
            unknown = in_opt - {id(p) for p in params.values()}
            if unknown:
                raise UnsupportedOptimizerError(
                    f"the optimizer holds {len(unknown)} tensors that are not parameters of the "
                    "model; pass the model whose parameters the optimizer trains"
                )
            self.trainable = [n for n, p in params.items() if id(p) in in_opt]
        else:
            self.trainable = [n for n, p in params.items() if p.requires_grad]
        if not self.trainable:
            raise RecordingError("no trainable parameters (none in the optimizer / requires_grad)")
        self.opt_spec = OptimizerSpec.from_optimizer(optimizer, model)
        self._n_groups = len(self.opt_spec.groups)
        self._trainable_params = [params[n] for n in self.trainable]
        self._stepped: list[dict[str, Any]] = []  # what the optimizer's pre-hook saw since the last step()
        self._n_stepped = 0
        self._hook: Any = None
        first = params[self.trainable[0]]
        self.dtype = first.dtype
        self.device = first.device
        self._model_entry = {
            "class": type(model).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "parameters": [
                {"name": n, "shape": list(p.shape), "trainable": n in set(self.trainable)}
                for n, p in params.items()
            ],
            "buffers": [{"name": n, "shape": list(b.shape)} for n, b in model.named_buffers()],
            "trainable": list(self.trainable),
        }

        self._t = 0
        self._n_ids = 0
        self._ids_recorded: bool | None = None
        self._max_id = -1
        self._batch_sizes: set[int] = set()
        self._checkpoints: list[dict[str, Any]] = []
        self._created = _now()
        self._recording_id = uuid.uuid4().hex  # tells apart runs re-recorded into one folder
        self._resumed_at: list[int] = []
        self._ids_log: _Log | None = None
        self._offsets_log: _Log | None = None
        self._snap: dict[str, Any] = {}
        self._closed = False
        # training-mode layers (BatchNorm, dropout): their modes and, with dropout, per-step RNG states
        self._tm_modules = train_mode_modules(model)
        self._dropouts = [n for n, m in self._tm_modules.items() if isinstance(m, DROPOUT_TYPES)]
        self._record_modes = True  # False: resuming a run recorded before modes were
        self._modes: dict[str, bool] | None = None  # the run's modes, fixed by its first step
        self._fwd_modes: dict[str, bool] | None = None  # the current step's training forward
        self._fwd_rng: tuple[np.ndarray, tuple[int, int]] | None = None
        self._eval_modes: dict[str, bool] | None = None  # the current step's last eval-mode forward
        self._n_train_fwd = 0
        self._rng_log: _Log | None = None
        self._rng_bytes: tuple[int, int] = (0, 0)  # (cpu, cuda) bytes per step
        self._fwd_hook: Any = None
        resumed = self._prepare_folder(overwrite, resume)
        if resumed:
            self._resume()
        else:
            (self.path / C.CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
            self._lrs_log = _Log(self.path / C.GROUP_LRS_LOG, C.LRS_DTYPE)
            self._checkpoint()
        if optimizer is not None:
            if not resumed:  # warned when the recording started
                _warn_without_rule(self.opt_spec)
            self._hook = optimizer.register_step_pre_hook(_weak_hook(self))
        if self._tm_modules and self._record_modes:
            self._fwd_hook = model.register_forward_pre_hook(_weak_forward_hook(self))

    # ------------------------------------------------------------------ public
    @property
    def steps(self) -> int:
        """Number of optimizer steps recorded so far: after ``resume=True``, the step the
        training loop restarts from (the run's last checkpoint)."""
        return self._t

    def step(self, ids: Any = None, lr: float | None = None) -> None:
        """Record one optimizer step (call it after ``optimizer.step()``).

        Args:
            ids: dataset indices of the samples in this step's batch (1-D ints), or ``None``
                if the loop does not know them (then only checkpoint-based methods work).
                Pass them on every step or on none. With gradient accumulation, a list or
                tuple of the micro-batches' id arrays: the step's batch is their union
                (concatenation). Scoring assumes the loop divides each micro-batch's mean loss
                by the number of micro-batches, all of one size, so that the step's gradient
                is the mean over the union.
            lr: without an optimizer, the learning rate η_t of this step (required). With one,
                leave it out: every group's rate is read from the optimizer as its ``step()``
                used it; a value given must equal group 0's rate.
        """
        if self._closed:
            raise RecordingError("Recorder.step() called after close()")
        lrs = self._step_lrs(lr)
        if self.optimizer is not None:
            self._check_optimizer()
        has_ids = ids is not None
        if self._ids_recorded is not None and self._ids_recorded != has_ids:
            raise RecordingError(
                "batch ids were passed on some steps and not on others; pass them on every step"
            )
        arr = None
        if has_ids:
            arr = _as_step_ids(ids)
            if self.n_train is not None and arr.size and int(arr.max()) >= self.n_train:
                raise InvalidIdsError(
                    f"step {self._t}: id {int(arr.max())} is out of range for n_train={self.n_train}"
                )
        try:
            modes, rng = self._step_modes()
        finally:
            self._fwd_modes = self._eval_modes = self._fwd_rng = None
            self._n_train_fwd = 0
        self._stepped.clear()
        self._n_stepped = 0
        # every check passed: append to the logs (ids first, the learning rate last)
        self._modes = modes
        if rng is not None:
            if self._rng_log is None:
                self._rng_log = _Log(self.path / C.RNG_LOG, C.RNG_DTYPE)
            self._rng_log.append(rng)
        self._ids_recorded = has_ids
        if arr is not None:
            if self._ids_log is None or self._offsets_log is None:
                self._ids_log = _Log(self.path / C.BATCH_IDS_LOG, C.IDS_DTYPE)
                self._offsets_log = _Log(self.path / C.BATCH_OFFSETS_LOG, C.IDS_DTYPE)
                self._offsets_log.append(np.zeros(1, dtype=np.int64))
            self._ids_log.append(arr)
            self._n_ids += int(arr.size)
            if arr.size:
                self._max_id = max(self._max_id, int(arr.max()))
            self._batch_sizes.add(int(arr.size))
            self._offsets_log.append(np.array([self._n_ids], dtype=np.int64))
        self._lrs_log.append(lrs)
        self._t += 1
        if self._t % self.checkpoint_every == 0:
            self._checkpoint()

    def _pre_forward(self) -> None:
        """Forward pre-hook on the model: the modes (and, with dropout in training mode, the RNG
        state) at the step's first training-mode forward; eval-mode forwards only count when the
        step has no training forward."""
        modes = {n: bool(m.training) for n, m in self._tm_modules.items()}
        if not self.model.training:
            if self._n_train_fwd == 0:
                self._eval_modes = modes
            return
        self._n_train_fwd += 1
        if self._n_train_fwd == 1:
            self._fwd_modes = modes
            if any(modes[n] for n in self._dropouts):
                self._fwd_rng = self._rng_state()

    def _rng_state(self) -> tuple[np.ndarray, tuple[int, int]]:
        """torch's CPU RNG state, then the CUDA one of the model's device (uint8 bytes), and the
        two parts' sizes."""
        parts = [torch.get_rng_state().numpy()]
        if self.device.type == "cuda":
            parts.append(torch.cuda.get_rng_state(self.device).numpy())
        sizes = (int(parts[0].size), int(parts[1].size) if len(parts) > 1 else 0)
        return np.concatenate(parts).astype(np.uint8, copy=False), sizes

    def _step_modes(self) -> tuple[dict[str, bool] | None, np.ndarray | None]:
        """The step's modes and RNG state (None: nothing to record), checked: one training forward
        per step when a module trains differently, the same modes at every step, the RNG state
        captured when dropout was in training mode."""
        if not self._tm_modules or not self._record_modes:
            return None, None
        modes = self._fwd_modes or self._eval_modes or {n: bool(m.training) for n, m in self._tm_modules.items()}
        active = [n for n, v in modes.items() if v]
        if self._n_train_fwd > 1 and active:
            raise TrainModeError(
                f"step {self._t}: the model ran {self._n_train_fwd} forwards in training mode since the "
                f"last Recorder.step(), with {', '.join(active[:3])} in training mode: diffin replays a "
                "step as one forward over its batch, so the batch statistics and dropout masks of several "
                "forwards (gradient accumulation, an extra forward in training mode) cannot be replayed. "
                "Do one training forward per step, run other forwards after model.eval(), or put those "
                "modules in eval mode for the whole training"
            )
        if self._modes is not None and modes != self._modes:
            diff = [f"{n}: {'train' if self._modes.get(n) else 'eval'} -> {'train' if v else 'eval'}"
                    for n, v in modes.items() if self._modes.get(n) != v]
            raise TrainModeError(
                f"step {self._t}: the training modes of BatchNorm/dropout modules changed during training "
                f"({', '.join(diff[:3])}); diffin records one mode per module for a run. Keep them fixed "
                "(e.g. call model.train() / freeze the same modules before every step) or start a new recording"
            )
        rng = None
        if any(modes[n] for n in self._dropouts):
            if self._fwd_rng is None:
                raise TrainModeError(
                    f"step {self._t}: dropout is in training mode but no training-mode forward of the "
                    "recorded model was seen since the last Recorder.step(), so its masks cannot be "
                    "replayed; call the model given to the Recorder (model(x)) in the step, not its "
                    "forward() directly"
                )
            rng, sizes = self._fwd_rng
            if self._rng_log is not None and sizes != self._rng_bytes:
                raise TrainModeError(
                    f"step {self._t}: the RNG state has {sizes} (CPU, CUDA) bytes but the recording's "
                    f"earlier steps have {self._rng_bytes}: the model moved between the CPU and a GPU "
                    "(e.g. on resume); record on the device the recording started on"
                )
            self._rng_bytes = sizes
        return modes, rng

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Step pre-hook: the learning rates, hyper-parameters and gradient norm the step uses (the
        norm is not checked for ``step(closure)``: the closure computes the gradient after this hook,
        as Lightning's steps do)."""
        seen: dict[str, Any] = {
            "lrs": [float(g["lr"]) for g in optimizer.param_groups],
            "hyper": group_hypers(optimizer),
        }
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0]: the optimizer
        if self.clip_grad_norm is not None and closure is None:  # a closure computes the step's gradient later
            grads = [p.grad.detach() for p in self._trainable_params if p.grad is not None and not p.grad.is_sparse]
            if grads:
                norms = torch.stack([torch.linalg.vector_norm(g, 2).to(torch.float64) for g in grads])
                seen["grad_norm"] = float(torch.linalg.vector_norm(norms, 2))
        if len(self._stepped) < 2:  # two are enough to refuse "stepped twice"
            self._stepped.append(seen)
        else:
            self._stepped[-1] = seen
        self._n_stepped += 1

    def _step_lrs(self, lr: float | None) -> np.ndarray:
        """Every group's learning rate of the step being recorded, (G,) float64, checked."""
        if self.optimizer is None:
            if lr is None:
                raise RecordingError("pass lr= to step() when the Recorder has no optimizer")
            lrs = np.array([float(lr)] * self._n_groups, dtype=np.float64)
        else:
            if self._n_stepped > 1:
                n = self._n_stepped
                self._stepped.clear()
                self._n_stepped = 0
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
                    f"step {self._t}: lr={float(lr)!r} was passed but the optimizer stepped with "
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
                    f"step {self._t}: the gradient norm at optimizer.step() was {norm:.6g}, above "
                    f"clip_grad_norm={c:g}: the loop did not clip. Call "
                    f"torch.nn.utils.clip_grad_norm_(model.parameters(), {c:g}) after backward() and "
                    "before optimizer.step(), or record without clip_grad_norm"
                )
        return lrs

    def _check_optimizer(self) -> None:
        """Refuse a change of the param groups or of a hyper-parameter other than the lr."""
        assert self.optimizer is not None
        seen = [h["hyper"] for h in self._stepped] + [group_hypers(self.optimizer)]
        want = [g["hyper"] for g in self.opt_spec.groups]
        names = {id(p): n for n, p in self.model.named_parameters()}
        now = [[names.get(id(p), "?") for p in g["params"]] for g in self.optimizer.param_groups]
        if now != [g["params"] for g in self.opt_spec.groups]:
            raise UnsupportedOptimizerError(
                f"step {self._t}: the optimizer's param groups changed during training (e.g. "
                "add_param_group); diffin records them once. Keep them fixed or start a new recording"
            )
        for hypers in seen:
            for j, (h, w) in enumerate(zip(hypers, want)):
                if h != w:
                    diff = sorted(k for k in set(h) | set(w) if h.get(k) != w.get(k))
                    raise UnsupportedOptimizerError(
                        f"step {self._t}: {', '.join(diff)} of param group {j} changed during training "
                        f"({', '.join(f'{k}: {w.get(k)!r} -> {h.get(k)!r}' for k in diff)}); diffin "
                        "records hyper-parameters other than the learning rate once. Keep them "
                        "constant or start a new recording"
                    )

    def close(self) -> Path:
        """Save θ_T (if not saved already) and the final manifest (``status: "complete"``).
        Returns the folder."""
        if self._closed:
            return self.path
        if self._checkpoints[-1]["step"] != self._t:
            self._save_theta()
        self._write_manifest(C.STATUS_COMPLETE)
        self._close_logs()
        self._closed = True
        self._remove_hook()
        return self.path

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._fwd_hook is not None:
            self._fwd_hook.remove()
            self._fwd_hook = None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            try:
                self._close_interrupted(exc_type, exc)
            except (OSError, RecordingError) as e:  # keep the training loop's exception the one raised
                warnings.warn(
                    f"could not close the interrupted run at {self.path} ({e!r}); it stays loadable up "
                    "to its last checkpoint", PartialRunWarning, stacklevel=2,
                )

    # ------------------------------------------------------------------ folder
    def _prepare_folder(self, overwrite: bool, resume: bool) -> bool:
        """Check (and with ``overwrite`` clear) the folder; True when a run is to be resumed."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunExistsError(f"{p} exists and is not a folder")
        present = [n for n in _OURS if (p / n).exists()]
        if not present:
            p.mkdir(parents=True, exist_ok=True)
            return False
        if overwrite:
            for n in present:
                target = p / n
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            for f in p.glob(".*.tmp"):
                f.unlink()  # an atomic write of the old run cut short
            return False
        manifest = _read_json(p / C.MANIFEST)
        status = manifest.get("status", C.STATUS_COMPLETE) if manifest is not None else None
        stopped = manifest.get("n_steps") if manifest is not None else None
        if resume:
            if manifest is None and (p / C.MANIFEST).exists():
                Run(p)  # raises the named error of the damaged manifest
            if manifest is None:
                raise ResumeError(
                    f"{p} holds an unfinished recording without a manifest ({', '.join(present)}): it "
                    "stopped before its first checkpoint was written, so there is nothing to resume. "
                    "Pass overwrite=True to record it again"
                )
            if status == C.STATUS_COMPLETE:
                raise ResumeError(
                    f"{p} holds a complete recording ({stopped} steps); a closed run cannot be "
                    "resumed. Choose another folder, or pass overwrite=True to replace it"
                )
            if manifest.get("format_version") != C.FORMAT_VERSION:
                raise ResumeError(
                    f"{p} was written in run format {manifest.get('format_version')}; only format "
                    f"{C.FORMAT_VERSION} runs can be resumed. Pass overwrite=True to record it again"
                )
            return True
        if manifest is not None and status == C.STATUS_COMPLETE:
            raise RunExistsError(
                f"{p} already holds a recording ({', '.join(present)}); choose another folder or pass "
                "overwrite=True to replace it"
            )
        where = f" (status {status!r}, valid up to step {stopped})" if manifest is not None else ""
        raise RunExistsError(
            f"{p} already holds an unfinished recording{where}; pass resume=True to continue it from "
            "its last checkpoint (after diffin.recording.restore_checkpoint), overwrite=True to "
            "replace it, or choose another folder"
        )

    def _resume(self) -> None:
        run = Run(self.path)
        self._check_resumable(run)
        last = run.load_checkpoint(run.n_steps)
        differ = _state_differences(self.model, self.optimizer, self.trainable, last)
        if differ:
            raise ResumeError(
                f"the model/optimizer state differs from the last checkpoint of {self.path} (step "
                f"{run.n_steps}): {', '.join(differ[:5])}{' …' if len(differ) > 5 else ''}. Load it "
                "first with diffin.recording.restore_checkpoint(path, model, optimizer), which returns "
                "the step to restart the training loop from, then create the Recorder with resume=True"
            )
        m, s = run.manifest, run.n_steps
        del run, last  # release the memory map of the ids log before cutting it
        listed = {c["file"] for c in m["checkpoints"]}
        for f in (self.path / C.CHECKPOINT_DIR).iterdir():
            if f"{C.CHECKPOINT_DIR}/{f.name}" not in listed:
                f.unlink()  # written after the last manifest (the process died before listing it)
        for f in self.path.glob(".*.tmp"):
            f.unlink()  # an atomic write cut short by the kill
        self._t = s
        self._checkpoints = [dict(c) for c in m["checkpoints"]]
        self._created = m.get("created", self._created)
        self._recording_id = m.get("recording_id", self._recording_id)
        self._resumed_at = [*(int(x) for x in m.get("resumed_at", [])), s]
        self._lrs_log = _Log(self.path / C.GROUP_LRS_LOG, C.LRS_DTYPE, keep=s * self._n_groups)
        bi = m.get("batch_ids", {"recorded": False})
        if bi.get("recorded"):
            self._ids_recorded = True
            self._n_ids = int(bi["ids"]["count"])
            self._ids_log = _Log(self.path / C.BATCH_IDS_LOG, C.IDS_DTYPE, keep=self._n_ids)
            self._offsets_log = _Log(self.path / C.BATCH_OFFSETS_LOG, C.IDS_DTYPE, keep=s + 1)
            self._max_id = int(bi["max_id"])
            self._batch_sizes = {int(b) for b in bi["batch_sizes"]}
        else:
            self._ids_recorded = False if s > 0 else None
            for name in (C.BATCH_IDS_LOG, C.BATCH_OFFSETS_LOG):
                (self.path / name).unlink(missing_ok=True)
        if s > 0 and "train_modes" not in m:
            self._record_modes = False  # recorded before modes were: stays so
        elif s > 0 and m.get("train_modes") is not None:
            self._modes = {str(k): bool(v) for k, v in m["train_modes"].items()}
        rng = m.get("rng_states", {"recorded": False})
        if rng.get("recorded") and s > 0:
            self._rng_bytes = (int(rng["cpu_bytes"]), int(rng["cuda_bytes"]))
            self._rng_log = _Log(self.path / C.RNG_LOG, C.RNG_DTYPE, keep=int(rng["log"]["count"]))
        else:
            (self.path / C.RNG_LOG).unlink(missing_ok=True)
        self._snapshot()
        self._write_manifest(C.STATUS_RECORDING)

    def _check_resumable(self, run: Run) -> None:
        run.check_model(self.model)
        problems = []
        mine, theirs = self.opt_spec, run.optimizer
        if not mine.same_optimizer(theirs):
            if (mine.kind, mine.assumed) != (theirs.kind, theirs.assumed):
                problems.append(f"optimizer {_kind(mine)} vs recorded {_kind(theirs)}")
            else:
                problems.append(f"optimizer param groups {mine.groups} vs recorded {theirs.groups}")
        if self.clip_grad_norm != run.clip_grad_norm:
            problems.append(f"clip_grad_norm={self.clip_grad_norm} vs recorded {run.clip_grad_norm}")
        if self.trainable != run.trainable:
            problems.append(f"trainable parameters {self.trainable} vs recorded {run.trainable}")
        if self.dtype != run.dtype:
            problems.append(f"dtype {self.dtype} vs recorded {run.dtype}")
        m = run.manifest
        if self.checkpoint_every != m.get("checkpoint_every"):
            problems.append(f"checkpoint_every={self.checkpoint_every} vs recorded {m.get('checkpoint_every')}")
        for key in ("seed", "n_train"):
            mine, theirs = getattr(self, key), m.get(key)
            if mine is None:
                setattr(self, key, theirs)
            elif mine != theirs:
                problems.append(f"{key}={mine} vs recorded {theirs}")
        if problems:
            raise ResumeError(
                f"cannot resume {self.path}: " + "; ".join(problems) + ". Resume with the model, "
                "optimizer and settings of the recording, or pass overwrite=True to record a new run"
            )

    # ------------------------------------------------------------------ writing
    def _save_theta(self) -> None:
        """Write the checkpoint of the current step and remember the logs' state there."""
        step = self._t
        tensors: dict[str, torch.Tensor] = {}
        for n, prm in self.model.named_parameters():
            tensors[C.PARAM_PREFIX + n] = prm.detach()
        for n, b in self.model.named_buffers():
            tensors[C.BUFFER_PREFIX + n] = b.detach()
        entry: dict[str, Any] = {"step": step, "has_momentum": False, "optimizer_step": step}
        if self.optimizer is not None:
            state, steps, missing = _optimizer_state(self.optimizer, self.model, self.trainable)
            for name, per_param in state.items():
                for n, t in per_param.items():
                    tensors[f"{C.OPTIM_PREFIX}{name}.{n}"] = t
            for n, k in steps.items():
                tensors[C.OPTIM_STEP_PREFIX + n] = torch.tensor(float(k), dtype=torch.float64)
            entry["has_momentum"] = "momentum_buffer" in state
            entry["optimizer_state"] = sorted(state)
            if steps:
                entry["optimizer_step"] = max(steps.values())
            if missing:
                entry["optimizer_state_missing"] = missing
        rel = f"{C.CHECKPOINT_DIR}/{C.CHECKPOINT_PATTERN.format(step=step)}"
        write_safetensors(self.path / rel, tensors, metadata={"step": str(step)})
        self._checkpoints.append({"file": rel, "bytes": (self.path / rel).stat().st_size, **entry})
        self._snapshot()

    def _checkpoint(self) -> None:
        """θ of this step, then the manifest that makes the run valid up to it."""
        self._save_theta()
        self._write_manifest(C.STATUS_RECORDING)

    def _snapshot(self) -> None:
        """The logs' extent at the current step (a checkpoint): what the manifest lists as valid."""
        ids_entry: dict[str, Any] = {"recorded": False}
        if self._ids_recorded and self._ids_log is not None and self._offsets_log is not None:
            ids_entry = {
                "recorded": True,
                "ids": self._ids_log.entry(),
                "offsets": self._offsets_log.entry(),
                "max_id": self._max_id,
                "batch_sizes": sorted(self._batch_sizes),
            }
        rng_entry: dict[str, Any] = {"recorded": False}
        if self._rng_log is not None:
            rng_entry = {"recorded": True, "log": self._rng_log.entry(), "cpu_bytes": self._rng_bytes[0],
                         "cuda_bytes": self._rng_bytes[1]}
        modes = self._modes
        if modes is None and self._record_modes:  # before the first step: the modes now
            modes = {n: bool(m.training) for n, m in self._tm_modules.items()}
        self._snap = {"n_steps": self._t, "lrs": self._lrs_log.entry(), "batch_ids": ids_entry,
                      "train_modes": modes, "rng_states": rng_entry}

    def _write_manifest(self, status: str, interrupted: dict[str, Any] | None = None) -> None:
        manifest: dict[str, Any] = {
            "format_version": C.FORMAT_VERSION,
            "diffin_version": __version__,
            "created": self._created,
            "recording_id": self._recording_id,
            "status": status,
        }
        if interrupted is not None:
            manifest["interrupted"] = interrupted
        if self._resumed_at:
            manifest["resumed_at"] = list(self._resumed_at)
        manifest.update({
            "n_steps": self._snap["n_steps"],
            "checkpoint_every": self.checkpoint_every,
            "checkpoints": list(self._checkpoints),
            "model": self._model_entry,
            "optimizer": self.opt_spec.to_json(),
            "clip_grad_norm": self.clip_grad_norm,
            "seed": self.seed,
            "n_train": self.n_train,
            "lrs": self._snap["lrs"],
            "batch_ids": self._snap["batch_ids"],
        })
        if self._record_modes:
            manifest["train_modes"] = self._snap["train_modes"]
            manifest["rng_states"] = self._snap["rng_states"]
        write_json(self.path / C.MANIFEST, manifest)

    def _close_interrupted(self, exc_type: type[BaseException], exc: BaseException | None) -> None:
        """Close the run at its last checkpoint after an exception (see the class docstring)."""
        self._closed = True
        self._remove_hook()
        self._close_logs()
        snap = self._snap
        self._lrs_log.cut(snap["lrs"]["count"])
        if snap["batch_ids"]["recorded"] and self._ids_log is not None and self._offsets_log is not None:
            self._ids_log.cut(snap["batch_ids"]["ids"]["count"])
            self._offsets_log.cut(snap["batch_ids"]["offsets"]["count"])
        else:
            for name in (C.BATCH_IDS_LOG, C.BATCH_OFFSETS_LOG):
                (self.path / name).unlink(missing_ok=True)
        if snap["rng_states"]["recorded"] and self._rng_log is not None:
            self._rng_log.cut(snap["rng_states"]["log"]["count"])
        else:
            (self.path / C.RNG_LOG).unlink(missing_ok=True)
        name = exc_type.__qualname__
        if exc_type.__module__ not in ("builtins", None):
            name = f"{exc_type.__module__}.{name}"
        self._write_manifest(
            C.STATUS_INTERRUPTED,
            {"exception": name, "message": str(exc)[:500] if exc is not None else "", "at_step": self._t},
        )

    def _close_logs(self) -> None:
        for log in (self._lrs_log, self._ids_log, self._offsets_log, self._rng_log):
            if log is not None:
                log.close()


def restore_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> int:
    """Load the last checkpoint of the run at ``path`` into ``model`` (parameters and buffers) and
    ``optimizer`` (its whole per-parameter state: SGD momentum buffers, Adam's ``exp_avg``,
    ``exp_avg_sq`` and ``step``, …; a state the checkpoint does not hold is cleared), so that a
    restarted training loop continues a killed run exactly. Returns the checkpoint's step S: the
    loop restarts at step S, i.e. with the batch it would have used for step S (seed the data
    order so that it repeats, skip the first S batches, and step a learning-rate scheduler S times).

    When ``path`` holds no recording yet, nothing is loaded and 0 is returned, so a restartable
    script can call it unconditionally before ``Recorder(path, ..., resume=True)``.
    Raises :class:`~diffin._errors.ResumeError` when the optimizer is not the recorded one or the
    checkpoint lacks part of its state (a run of an older format with another optimizer than SGD,
    or an optimizer keeping state that is not per-parameter), and the loading errors of
    :func:`diffin.load_run` for a damaged run.
    """
    p = Path(path)
    if not p.is_dir() or not any((p / n).exists() for n in _OURS):
        return 0
    run = Run(p)
    run.check_model(model)
    last = run.load_checkpoint(run.n_steps)
    if optimizer is not None:
        _check_restorable(run, last, optimizer)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, prm in named.items():
            prm.copy_(last.params[n])
        for n, b in model.named_buffers():
            if n in last.buffers:
                b.copy_(last.buffers[n])
    if optimizer is not None:
        group_of = {id(prm): g for g in optimizer.param_groups for prm in g["params"]}
        for n in run.trainable:
            prm = named[n]
            state: dict[str, Any] = {}
            for name, per_param in last.optimizer_state.items():
                if n in per_param:
                    state[name] = per_param[n].to(device=prm.device).clone()
            if n in last.param_steps:
                g = group_of.get(id(prm), {})
                on_device = bool(g.get("capturable", False) or g.get("fused", False))
                state["step"] = torch.tensor(
                    float(last.param_steps[n]), dtype=_step_dtype(bool(g.get("fused", False))),
                    device=prm.device if on_device else "cpu",
                )
            optimizer.state.pop(prm, None)
            if state:
                optimizer.state[prm] = state
    return run.n_steps


def _check_restorable(run: Run, last: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    kind = type(optimizer).__name__
    recorded = run.optimizer.kind if not run.optimizer.assumed else None
    if recorded is not None and kind != recorded:
        raise ResumeError(
            f"cannot restore {kind}: the run at {run.path} was recorded with {recorded}; pass the "
            "optimizer of the recording"
        )
    if last.optimizer_step is None:
        raise ResumeError(
            f"cannot restore the state of {kind}: the run at {run.path} was written in run format "
            f"{run.format_version}, whose checkpoints hold SGD momentum only; record it again to "
            "resume it"
        )
    missing = run._ckpt_entries[last.step].get("optimizer_state_missing")
    if missing:
        raise ResumeError(
            f"cannot restore the state of {kind}: its checkpoint at step {last.step} lacks state "
            f"that is not a tensor shaped like its parameter ({', '.join(missing[:5])}); such a run "
            "cannot be resumed exactly. Record it again (overwrite=True)"
        )


def _step_dtype(fused: bool) -> torch.dtype:
    """The dtype torch's own optimizers give ``state["step"]``."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _optimizer_state(
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


class _Log:
    """An append-only raw little-endian array file with a running sha256 of its bytes.

    Unbuffered: each :meth:`append` reaches the operating system at once, so a killed process
    loses nothing it had recorded (what lies past the last checkpoint is ignored by readers).
    """

    def __init__(self, path: Path, dtype: str, keep: int = 0) -> None:
        """Open ``path`` for appending after its first ``keep`` entries; the rest is cut off."""
        self.path = path
        self.dtype = np.dtype(dtype)
        self.count = keep
        nbytes = keep * self.dtype.itemsize
        self._hash = sha256_prefix(path, nbytes) if keep else hashlib.sha256()
        self._fh = open(path, "r+b" if keep else "wb", buffering=0)  # noqa: SIM115 - closed by close()
        self._fh.truncate(nbytes)
        self._fh.seek(nbytes)

    def append(self, arr: np.ndarray) -> None:
        data = np.ascontiguousarray(arr, dtype=self.dtype).tobytes()
        view = memoryview(data)
        while view:
            written = self._fh.write(view)
            view = view[written or 0 :]
        self._hash.update(data)
        self.count += int(np.asarray(arr).size)

    def entry(self) -> dict[str, Any]:
        """The manifest entry of the log as written so far."""
        return {"file": self.path.name, "dtype": self.dtype.str, "count": self.count,
                "sha256": self._hash.copy().hexdigest()}

    def cut(self, count: int) -> None:
        """Truncate the (closed) file to its first ``count`` entries."""
        os.truncate(self.path, count * self.dtype.itemsize)

    def close(self) -> None:
        self._fh.close()


def _state_differences(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, trainable: list[str], ck: Checkpoint
) -> list[str]:
    """Names of the parameters, buffers and optimizer states whose current values are not exactly
    the checkpoint's."""
    out = []
    named = dict(model.named_parameters())
    for n, prm in named.items():
        if not torch.equal(prm.detach().to("cpu"), ck.params[n]):
            out.append(f"parameter {n}")
    for n, b in model.named_buffers():
        if n in ck.buffers and not torch.equal(b.detach().to("cpu"), ck.buffers[n]):
            out.append(f"buffer {n}")
    if optimizer is not None:
        state, steps, _ = _optimizer_state(optimizer, model, trainable)
        for name in sorted(set(state) | set(ck.optimizer_state)):
            have, want = state.get(name, {}), ck.optimizer_state.get(name, {})
            for n in trainable:
                a, b = have.get(n), want.get(n)
                if (a is None) != (b is None) or (
                    a is not None and b is not None and not torch.equal(a.to("cpu"), b)
                ):
                    out.append(f"optimizer state {name} of {n}")
        for n in trainable:
            if steps.get(n) != ck.param_steps.get(n):
                out.append(f"optimizer step count of {n}")
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    """The manifest as a dict, or None when it is missing or unreadable."""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _kind(spec: OptimizerSpec) -> str:
    return "none (plain SGD assumed)" if spec.assumed else spec.kind


def _weak_hook(rec: Recorder) -> Any:
    """The recorder's step pre-hook holding it weakly (an abandoned recorder is not kept alive)."""
    ref = weakref.ref(rec)

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        r = ref()
        if r is not None and not r._closed:
            r._pre_step(optimizer, args, kwargs)

    return hook


def _weak_forward_hook(rec: Recorder) -> Any:
    """The recorder's forward pre-hook on the model, holding it weakly."""
    ref = weakref.ref(rec)

    def hook(module: nn.Module, args: Any) -> None:
        r = ref()
        if r is not None and not r._closed:
            r._pre_forward()

    return hook


def _check_clip(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise RecordingError(
            f"clip_grad_norm must be None (the loop does not clip) or the finite max_norm > 0 the loop "
            f"passes to torch.nn.utils.clip_grad_norm_, got {value!r}"
        )
    return float(value)


def _warn_without_rule(spec: OptimizerSpec) -> None:
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


def _as_step_ids(ids: Any) -> np.ndarray:
    """The ids of one step: one 1-D array, or (gradient accumulation) a list / tuple of the
    micro-batches' arrays, concatenated."""
    if isinstance(ids, (list, tuple)) and ids and all(
        isinstance(b, (list, tuple, np.ndarray, torch.Tensor)) for b in ids
    ):
        parts = [_as_ids(b) for b in ids]
        return np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    return _as_ids(ids)


def _as_ids(ids: Any) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InvalidIdsError(f"batch ids must be integers, got a {ids.dtype} tensor")
        arr = ids.detach().to("cpu").numpy()
    else:
        arr = np.asarray(ids)
        if arr.size == 0 and arr.ndim == 1:
            arr = arr.astype(np.int64)  # [] is float64 to numpy; an empty batch has no ids
        if arr.dtype.kind not in "iu":
            raise InvalidIdsError(f"batch ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False).reshape(-1) if arr.ndim <= 1 else None
    if arr is None:
        raise InvalidIdsError("batch ids must be a 1-D sequence of dataset indices")
    if arr.size and int(arr.min()) < 0:
        raise InvalidIdsError(f"batch ids must be >= 0, got {int(arr.min())}")
    return np.ascontiguousarray(arr)
