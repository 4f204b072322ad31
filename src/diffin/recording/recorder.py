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
import os
import uuid
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from .. import _constants as C
from .._errors import PartialRunWarning, RecordingError, UnsupportedOptimizerError
from .._io import write_json
from .._version import __version__
from ._checkpoints import prepare_folder, reopen, restore_checkpoint, write_checkpoint
from ._optim_capture import OptimizerWatch, check_clip, warn_without_rule
from ._steplog import StepLog
from ._train_capture import TrainModeWatch
from .manifest import OptimizerSpec

__all__ = ["Recorder", "restore_checkpoint"]


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
        self.clip_grad_norm = check_clip(clip_grad_norm)

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
        self._optim = OptimizerWatch(optimizer, self.opt_spec, model, [params[n] for n in self.trainable],
                                     self.clip_grad_norm)
        self._modes = TrainModeWatch(model, self.device)  # BatchNorm, dropout: modes and RNG states
        self._t = 0
        self._checkpoints: list[dict[str, Any]] = []
        self._created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._recording_id = uuid.uuid4().hex  # tells apart runs re-recorded into one folder
        self._resumed_at: list[int] = []
        self._snap: dict[str, Any] = {}
        self._closed = False
        if prepare_folder(self.path, overwrite, resume):
            self._resume()
        else:
            (self.path / C.CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
            self._log = StepLog(self.path)
            self._checkpoint()
            if optimizer is not None:  # warned when the recording started
                warn_without_rule(self.opt_spec)
        self._optim.start()
        self._modes.start()

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
        lrs = self._optim.step_lrs(lr, self._t)
        self._optim.check(self._t)
        arr = self._log.check_ids(ids, self._t, self.n_train)
        modes, rng = self._modes.end_step(self._t, self._log.rng_bytes)
        self._optim.reset()
        # every check passed: append to the logs
        self._modes.modes = modes
        self._log.append(lrs, arr, rng)
        self._t += 1
        if self._t % self.checkpoint_every == 0:
            self._checkpoint()

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
        self._optim.remove()
        self._modes.remove()

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

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        m, s = reopen(self)
        self._t = s
        self._checkpoints = [dict(c) for c in m["checkpoints"]]
        self._created = m.get("created", self._created)
        self._recording_id = m.get("recording_id", self._recording_id)
        self._resumed_at = [*(int(x) for x in m.get("resumed_at", [])), s]
        self._log = StepLog.resume(self.path, m, s, len(self.opt_spec.groups))
        self._modes.resume(m, s)
        self._snapshot()
        self._write_manifest(C.STATUS_RECORDING)

    # ------------------------------------------------------------------ writing
    def _save_theta(self) -> None:
        """Write the checkpoint of the current step and remember the logs' state there."""
        self._checkpoints.append(write_checkpoint(self.path, self._t, self.model, self.optimizer, self.trainable))
        self._snapshot()

    def _checkpoint(self) -> None:
        """θ of this step, then the manifest that makes the run valid up to it."""
        self._save_theta()
        self._write_manifest(C.STATUS_RECORDING)

    def _snapshot(self) -> None:
        """The logs' extent at the current step (a checkpoint): what the manifest lists as valid."""
        self._snap = {"n_steps": self._t, **self._log.snapshot(), "train_modes": self._modes.current()}

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
        if self._modes.record:
            manifest["train_modes"] = self._snap["train_modes"]
            manifest["rng_states"] = self._snap["rng_states"]
        write_json(self.path / C.MANIFEST, manifest)

    def _close_interrupted(self, exc_type: type[BaseException], exc: BaseException | None) -> None:
        """Close the run at its last checkpoint after an exception (see the class docstring)."""
        self._closed = True
        self._remove_hook()
        self._close_logs()
        self._log.cut_to(self._snap)
        name = exc_type.__qualname__
        if exc_type.__module__ not in ("builtins", None):
            name = f"{exc_type.__module__}.{name}"
        self._write_manifest(
            C.STATUS_INTERRUPTED,
            {"exception": name, "message": str(exc)[:500] if exc is not None else "", "at_step": self._t},
        )

    def _close_logs(self) -> None:
        self._log.close()
