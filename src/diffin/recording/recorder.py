"""Record a training run from a plain PyTorch loop.

    rec = diffin.Recorder("runs/mnist", model, optimizer=opt, checkpoint_every=50)  # saves θ_0
    for ids, x, y in loader:
        loss = criterion(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        rec.step(ids, lr=opt.param_groups[0]["lr"])   # after opt.step()
    rec.close()                                        # saves θ_T and the manifest
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _constants as C
from .._errors import InvalidIdsError, RecordingError, RunExistsError, UnsupportedOptimizerError
from .._io import write_json, write_npy, write_safetensors
from .._version import __version__
from .manifest import OptimizerSpec


class Recorder:
    """Writes θ_0, checkpoints, per-step learning rates and batch ids of a training run.

    Args:
        path: run folder to create.
        model: the module being trained. Its parameters are read at construction (θ_0), at
            every checkpoint and at :meth:`close` (θ_T).
        optimizer: the optimizer (``torch.optim.SGD`` supports every Diff-In variant; others
            are recorded by name). Without one, plain SGD with the per-step ``lr`` is assumed.
        checkpoint_every: save θ every this many steps (θ_0 and θ_T are always saved).
        seed: the training seed, stored for reference.
        n_train: size of the training set, if known (ids are checked against it).
        overwrite: replace an existing recording at ``path``.

    Call :meth:`step` once after every ``optimizer.step()``; call :meth:`close` at the end
    (or use the recorder as a context manager).
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
    ) -> None:
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise RecordingError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
        self.path = Path(path)
        self.model = model
        self.optimizer = optimizer
        self.checkpoint_every = checkpoint_every
        self.seed = seed
        self.n_train = n_train
        self._prepare_folder(overwrite)

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

        self._t = 0
        self._lrs: list[float] = []
        self._offsets: list[int] = [0]
        self._ids_recorded: bool | None = None
        self._max_id = -1
        self._batch_sizes: set[int] = set()
        self._checkpoints: list[dict[str, Any]] = []
        self._closed = False
        (self.path / C.CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        self._ids_part = self.path / (C.BATCH_IDS + C.PARTIAL_SUFFIX)
        self._ids_fh = open(self._ids_part, "wb")  # noqa: SIM115 - closed in close()
        self._save_checkpoint()

    # ------------------------------------------------------------------ public
    @property
    def steps(self) -> int:
        """Number of optimizer steps recorded so far."""
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
        if self._ids_recorded is None:
            self._ids_recorded = has_ids
        elif self._ids_recorded != has_ids:
            raise RecordingError(
                "batch ids were passed on some steps and not on others; pass them on every step"
            )
        n = 0
        if has_ids:
            arr = _as_ids(ids)
            if self.n_train is not None and arr.size and int(arr.max()) >= self.n_train:
                raise InvalidIdsError(
                    f"step {self._t}: id {int(arr.max())} is out of range for n_train={self.n_train}"
                )
            self._ids_fh.write(arr.tobytes())
            n = int(arr.size)
            if n:
                self._max_id = max(self._max_id, int(arr.max()))
            self._batch_sizes.add(n)
        self._offsets.append(self._offsets[-1] + n)
        self._lrs.append(lr)
        self._t += 1
        if self._t % self.checkpoint_every == 0:
            self._save_checkpoint()

    def close(self) -> Path:
        """Save θ_T (if not saved already), the arrays and the manifest. Returns the folder."""
        if self._closed:
            return self.path
        if not self._checkpoints or self._checkpoints[-1]["step"] != self._t:
            self._save_checkpoint()
        self._ids_fh.close()
        write_npy(self.path / C.LRS, np.asarray(self._lrs, dtype=np.float64))
        ids_recorded = bool(self._ids_recorded)
        if ids_recorded:
            raw = np.memmap(self._ids_part, dtype=np.int64, mode="r") if self._offsets[-1] else None
            ids = np.asarray(raw) if raw is not None else np.zeros(0, dtype=np.int64)
            write_npy(self.path / C.BATCH_IDS, ids)
            write_npy(self.path / C.BATCH_OFFSETS, np.asarray(self._offsets, dtype=np.int64))
            del raw
        self._ids_part.unlink(missing_ok=True)
        named = dict(self.model.named_parameters())
        manifest: dict[str, Any] = {
            "format_version": C.FORMAT_VERSION,
            "diffin_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "status": "complete",
            "n_steps": self._t,
            "checkpoint_every": self.checkpoint_every,
            "checkpoints": self._checkpoints,
            "model": {
                "class": type(self.model).__name__,
                "dtype": str(self.dtype).removeprefix("torch."),
                "device": str(self.device),
                "parameters": [
                    {"name": n, "shape": list(p.shape), "trainable": n in set(self.trainable)}
                    for n, p in named.items()
                ],
                "buffers": [
                    {"name": n, "shape": list(b.shape)} for n, b in self.model.named_buffers()
                ],
                "trainable": list(self.trainable),
            },
            "optimizer": self.opt_spec.to_json(),
            "seed": self.seed,
            "n_train": self.n_train,
            "lrs": _file_entry(self.path, C.LRS),
            "batch_ids": (
                {
                    "recorded": True,
                    "ids": _file_entry(self.path, C.BATCH_IDS),
                    "offsets": _file_entry(self.path, C.BATCH_OFFSETS),
                    "max_id": self._max_id,
                    "batch_sizes": sorted(self._batch_sizes),
                }
                if ids_recorded
                else {"recorded": False}
            ),
        }
        write_json(self.path / C.MANIFEST, manifest)
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
        # On an exception the run is left unclosed (no manifest): loading it raises
        # IncompleteRunError instead of silently scoring a half-finished step.
        if exc_type is None:
            self.close()
        elif not self._ids_fh.closed:
            self._ids_fh.close()

    # ------------------------------------------------------------------ internals
    def _prepare_folder(self, overwrite: bool) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunExistsError(f"{p} exists and is not a folder")
        ours = [C.MANIFEST, C.CHECKPOINT_DIR, C.LRS, C.BATCH_IDS, C.BATCH_OFFSETS,
                C.BATCH_IDS + C.PARTIAL_SUFFIX]
        present = [n for n in ours if (p / n).exists()]
        if present and not overwrite:
            what = "a recording" if (p / C.MANIFEST).exists() else "an unfinished recording"
            raise RunExistsError(
                f"{p} already holds {what} ({', '.join(present)}); choose another folder or pass "
                "overwrite=True to replace it"
            )
        for n in present:
            target = p / n
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        p.mkdir(parents=True, exist_ok=True)

    def _save_checkpoint(self) -> None:
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
        entry = _file_entry(self.path, rel)
        entry.update({"step": step, "has_momentum": has_momentum})
        self._checkpoints.append(entry)


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


def _file_entry(root: Path, rel: str) -> dict[str, Any]:
    return {"file": rel, "bytes": (root / rel).stat().st_size}

