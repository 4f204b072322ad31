"""Record a training run from a plain PyTorch loop.

    rec = diffin.Recorder("runs/mnist", model, optimizer=opt, checkpoint_every=50)  # saves θ_0
    for ids, x, y in loader:
        loss = criterion(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        rec.step(ids, lr=opt.param_groups[0]["lr"])   # after opt.step()
    rec.close()                                        # saves θ_T and the final manifest

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
import os
import shutil
import uuid
import warnings
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
    UnsupportedOptimizerError,
)
from .._io import write_json, write_safetensors
from .._version import __version__
from .manifest import OptimizerSpec
from .run import Checkpoint, Run, sha256_prefix

_OURS = (C.MANIFEST, C.CHECKPOINT_DIR, C.LRS_LOG, C.BATCH_IDS_LOG, C.BATCH_OFFSETS_LOG,
         C.V1_LRS, C.V1_BATCH_IDS, C.V1_BATCH_OFFSETS, C.V1_BATCH_IDS + C.V1_PARTIAL_SUFFIX)
"""Every name a run folder (format 1 or 2) may hold; an ``overwrite=True`` removes them."""


class Recorder:
    """Writes θ_0, checkpoints, per-step learning rates and batch ids of a training run.

    Args:
        path: run folder to create (or, with ``resume=True``, to continue).
        model: the module being trained. Its parameters are read at construction (θ_0), at
            every checkpoint and at :meth:`close` (θ_T).
        optimizer: the optimizer (``torch.optim.SGD`` supports every Diff-In variant; others
            are recorded by name). Without one, plain SGD with the per-step ``lr`` is assumed.
        checkpoint_every: save θ every this many steps (θ_0 and θ_T are always saved).
        seed: the training seed, stored for reference.
        n_train: size of the training set, if known (ids are checked against it).
        overwrite: replace an existing recording at ``path``.
        resume: continue the unfinished recording at ``path`` (killed, or interrupted by an
            exception) from its last checkpoint S: the logs are cut back to S and recording goes
            on at step S (:attr:`steps`). The model (and the optimizer's SGD momentum buffers)
            must hold the checkpoint's values already — load them with
            :func:`restore_checkpoint` first — and the optimizer, ``checkpoint_every``, ``seed``
            and ``n_train`` must be those of the recording (``seed`` / ``n_train`` left ``None``
            take the recorded ones); otherwise :class:`~diffin._errors.ResumeError`. Only SGD
            runs (or runs without an optimizer) can be resumed: other optimizers' state is not in
            the checkpoints. A folder without a recording is simply started; a complete run is
            refused.

    Call :meth:`step` once after every ``optimizer.step()``; call :meth:`close` at the end
    (or use the recorder as a context manager).

    Crash safety: the per-step logs are append-only raw files written at every step, and the
    manifest is rewritten atomically at every checkpoint with ``status: "recording"``, the
    checkpoints so far and how many log entries they cover. A killed process leaves a run that
    loads up to its last checkpoint. An exception inside ``with Recorder(...)`` closes the run at
    its **last checkpoint** (``status: "interrupted"``, with the exception's type and the step it
    hit): the exception may come between ``optimizer.step()`` and :meth:`step`, where the model's
    θ belongs to no recorded step, so θ is not saved then and the steps after the last checkpoint
    (at most ``checkpoint_every − 1``) are dropped. The exception propagates.
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
        self.opt_spec = OptimizerSpec.from_optimizer(optimizer)
        self._hyper0 = self.opt_spec.hyper_of(optimizer) if optimizer is not None else None
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
        if self._prepare_folder(overwrite, resume):
            self._resume()
        else:
            (self.path / C.CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
            self._lrs_log = _Log(self.path / C.LRS_LOG, C.LRS_DTYPE)
            self._checkpoint()

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
                Pass them on every step or on none.
            lr: the learning rate η_t used by this step. Default: the optimizer's current lr.
        """
        if self._closed:
            raise RecordingError("Recorder.step() called after close()")
        if lr is None:
            if self.optimizer is None:
                raise RecordingError("pass lr= to step() when the Recorder has no optimizer")
            lr = self.optimizer.param_groups[0]["lr"]
        lr = float(lr)
        if not np.isfinite(lr) or lr < 0:
            raise RecordingError(f"learning rate must be finite and >= 0, got {lr}")
        if self.optimizer is not None:
            if len({g["lr"] for g in self.optimizer.param_groups}) > 1:
                raise UnsupportedOptimizerError(
                    "param groups have different learning rates; diffin records one η_t per step"
                )
            if self.opt_spec.hyper_of(self.optimizer) != self._hyper0:
                raise RecordingError(
                    "momentum / dampening / nesterov / weight decay changed during training; "
                    "diffin records them once. Keep them constant or start a new recording."
                )
        has_ids = ids is not None
        if self._ids_recorded is not None and self._ids_recorded != has_ids:
            raise RecordingError(
                "batch ids were passed on some steps and not on others; pass them on every step"
            )
        arr = None
        if has_ids:
            arr = _as_ids(ids)
            if self.n_train is not None and arr.size and int(arr.max()) >= self.n_train:
                raise InvalidIdsError(
                    f"step {self._t}: id {int(arr.max())} is out of range for n_train={self.n_train}"
                )
        # every check passed: append to the logs (ids first, the learning rate last)
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
        self._lrs_log.append(np.array([lr], dtype=np.float64))
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
        return self.path

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
        self._lrs_log = _Log(self.path / C.LRS_LOG, C.LRS_DTYPE, keep=s)
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
        self._snapshot()
        self._write_manifest(C.STATUS_RECORDING)

    def _check_resumable(self, run: Run) -> None:
        run.check_model(self.model)
        problems = []
        if not (self.opt_spec.assumed or self.opt_spec.kind == "SGD"):
            problems.append(
                f"the optimizer is {self.opt_spec.kind}, whose state the checkpoints do not hold "
                "(only SGD runs can be resumed)"
            )
        elif self.opt_spec.to_json() != run.optimizer.to_json():
            problems.append(f"optimizer {self.opt_spec.to_json()} vs recorded {run.optimizer.to_json()}")
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
        has_momentum = False
        if self.optimizer is not None and self.opt_spec.kind == "SGD":
            named = dict(self.model.named_parameters())
            for n in self.trainable:
                buf = self.optimizer.state.get(named[n], {}).get("momentum_buffer")
                if buf is not None:
                    tensors[C.MOMENTUM_PREFIX + n] = buf.detach()
                    has_momentum = True
        rel = f"{C.CHECKPOINT_DIR}/{C.CHECKPOINT_PATTERN.format(step=step)}"
        write_safetensors(self.path / rel, tensors, metadata={"step": str(step)})
        self._checkpoints.append(
            {"file": rel, "bytes": (self.path / rel).stat().st_size, "step": step, "has_momentum": has_momentum}
        )
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
        self._snap = {"n_steps": self._t, "lrs": self._lrs_log.entry(), "batch_ids": ids_entry}

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
            "seed": self.seed,
            "n_train": self.n_train,
            "lrs": self._snap["lrs"],
            "batch_ids": self._snap["batch_ids"],
        })
        write_json(self.path / C.MANIFEST, manifest)

    def _close_interrupted(self, exc_type: type[BaseException], exc: BaseException | None) -> None:
        """Close the run at its last checkpoint after an exception (see the class docstring)."""
        self._closed = True
        self._close_logs()
        snap = self._snap
        self._lrs_log.cut(snap["n_steps"])
        if snap["batch_ids"]["recorded"] and self._ids_log is not None and self._offsets_log is not None:
            self._ids_log.cut(snap["batch_ids"]["ids"]["count"])
            self._offsets_log.cut(snap["batch_ids"]["offsets"]["count"])
        else:
            for name in (C.BATCH_IDS_LOG, C.BATCH_OFFSETS_LOG):
                (self.path / name).unlink(missing_ok=True)
        name = exc_type.__qualname__
        if exc_type.__module__ not in ("builtins", None):
            name = f"{exc_type.__module__}.{name}"
        self._write_manifest(
            C.STATUS_INTERRUPTED,
            {"exception": name, "message": str(exc)[:500] if exc is not None else "", "at_step": self._t},
        )

    def _close_logs(self) -> None:
        for log in (self._lrs_log, self._ids_log, self._offsets_log):
            if log is not None:
                log.close()


def restore_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> int:
    """Load the last checkpoint of the run at ``path`` into ``model`` (parameters and buffers) and
    ``optimizer`` (SGD momentum buffers; none when the checkpoint has none), so that a restarted
    training loop continues a killed run exactly. Returns the checkpoint's step S: the loop
    restarts at step S, i.e. with the batch it would have used for step S (seed the data order
    so that it repeats, and skip the first S batches).

    When ``path`` holds no recording yet, nothing is loaded and 0 is returned, so a restartable
    script can call it unconditionally before ``Recorder(path, ..., resume=True)``.
    Raises :class:`~diffin._errors.ResumeError` for a non-SGD optimizer (its state is not in the
    checkpoints) and the loading errors of :func:`diffin.load_run` for a damaged run.
    """
    p = Path(path)
    if not p.is_dir() or not any((p / n).exists() for n in _OURS):
        return 0
    spec = OptimizerSpec.from_optimizer(optimizer)
    if optimizer is not None and spec.kind != "SGD":
        raise ResumeError(
            f"cannot restore the state of {spec.kind}: diffin's checkpoints hold SGD momentum only; "
            "only SGD runs (or runs without an optimizer) can be resumed"
        )
    run = Run(p)
    run.check_model(model)
    last = run.load_checkpoint(run.n_steps)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, prm in named.items():
            prm.copy_(last.params[n])
        for n, b in model.named_buffers():
            if n in last.buffers:
                b.copy_(last.buffers[n])
    if optimizer is not None:
        for n in run.trainable:
            prm = named[n]
            state = optimizer.state[prm]
            if last.momentum is not None and n in last.momentum:
                state["momentum_buffer"] = last.momentum[n].to(device=prm.device, dtype=prm.dtype).clone()
            else:
                state.pop("momentum_buffer", None)
    return run.n_steps


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
    """Names of the parameters, buffers and SGD momentum buffers whose current values are not
    exactly the checkpoint's."""
    out = []
    named = dict(model.named_parameters())
    for n, prm in named.items():
        if not torch.equal(prm.detach().to("cpu"), ck.params[n]):
            out.append(f"parameter {n}")
    for n, b in model.named_buffers():
        if n in ck.buffers and not torch.equal(b.detach().to("cpu"), ck.buffers[n]):
            out.append(f"buffer {n}")
    if optimizer is not None:
        for n in trainable:
            buf = optimizer.state.get(named[n], {}).get("momentum_buffer")
            want = ck.momentum.get(n) if ck.momentum is not None else None
            if (buf is None) != (want is None) or (
                buf is not None and want is not None and not torch.equal(buf.detach().to("cpu"), want)
            ):
                out.append(f"momentum buffer of {n}")
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
