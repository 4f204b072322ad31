"""The step log of a recording: per-step learning rates, batch ids and batch offsets, and the RNG
states of steps with dropout, in append-only raw files (:class:`StepLog`).

Each log is written at every step and reaches the operating system at once; the manifest says, at
every checkpoint, how many entries are valid (:meth:`StepLog.snapshot`), so whatever lies past the
last checkpoint of a killed run is ignored by readers and cut off on resume.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import _constants as C
from .._errors import InvalidIdsError, RecordingError
from .run import sha256_prefix


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


class StepLog:
    """The per-step logs of one run folder: learning rates (G per step), batch ids with their
    offsets (when the loop passes ids), RNG states (when dropout trains).

    ``rng_bytes``: the (CPU, CUDA) bytes of each logged RNG state, None while none is logged."""

    def __init__(self, path: Path) -> None:
        """Start the logs of a new recording in ``path`` (the learning-rate log is created now,
        the others at their first entry)."""
        self.path = path
        self.lrs = _Log(path / C.GROUP_LRS_LOG, C.LRS_DTYPE)
        self.ids: _Log | None = None
        self.offsets: _Log | None = None
        self.rng: _Log | None = None
        self.ids_recorded: bool | None = None  # None: no step yet
        self.n_ids = 0
        self.max_id = -1
        self.batch_sizes: set[int] = set()
        self.rng_bytes: tuple[int, int] | None = None

    @classmethod
    def resume(cls, path: Path, manifest: dict[str, Any], steps: int, n_groups: int) -> StepLog:
        """The logs of an unfinished recording reopened at its last checkpoint (``steps`` steps, as
        listed in ``manifest``); entries past it are cut off, logs it does not list are removed."""
        log = cls.__new__(cls)
        log.path = path
        log.lrs = _Log(path / C.GROUP_LRS_LOG, C.LRS_DTYPE, keep=steps * n_groups)
        log.ids = log.offsets = log.rng = None
        log.n_ids, log.max_id, log.batch_sizes, log.rng_bytes = 0, -1, set(), None
        bi = manifest.get("batch_ids", {"recorded": False})
        if bi.get("recorded"):
            log.ids_recorded = True
            log.n_ids = int(bi["ids"]["count"])
            log.ids = _Log(path / C.BATCH_IDS_LOG, C.IDS_DTYPE, keep=log.n_ids)
            log.offsets = _Log(path / C.BATCH_OFFSETS_LOG, C.IDS_DTYPE, keep=steps + 1)
            log.max_id = int(bi["max_id"])
            log.batch_sizes = {int(b) for b in bi["batch_sizes"]}
        else:
            log.ids_recorded = False if steps > 0 else None
            for name in (C.BATCH_IDS_LOG, C.BATCH_OFFSETS_LOG):
                (path / name).unlink(missing_ok=True)
        rng = manifest.get("rng_states", {"recorded": False})
        if rng.get("recorded") and steps > 0:
            log.rng_bytes = (int(rng["cpu_bytes"]), int(rng["cuda_bytes"]))
            log.rng = _Log(path / C.RNG_LOG, C.RNG_DTYPE, keep=int(rng["log"]["count"]))
        else:
            (path / C.RNG_LOG).unlink(missing_ok=True)
        return log

    def check_ids(self, ids: Any, t: int, n_train: int | None) -> np.ndarray | None:
        """The ids of step ``t`` as a 1-D int64 array (None when not passed), checked: passed on
        every step or on none, integers in ``[0, n_train)``."""
        has_ids = ids is not None
        if self.ids_recorded is not None and self.ids_recorded != has_ids:
            raise RecordingError(
                "batch ids were passed on some steps and not on others; pass them on every step"
            )
        if not has_ids:
            return None
        arr = _as_step_ids(ids)
        if n_train is not None and arr.size and int(arr.max()) >= n_train:
            raise InvalidIdsError(f"step {t}: id {int(arr.max())} is out of range for n_train={n_train}")
        return arr

    def append(self, lrs: np.ndarray, ids: np.ndarray | None,
               rng: tuple[np.ndarray, tuple[int, int]] | None) -> None:
        """Log one step (every check passed): the RNG state and the ids first, the learning rates
        (G,) last."""
        if rng is not None:
            if self.rng is None:
                self.rng = _Log(self.path / C.RNG_LOG, C.RNG_DTYPE)
            self.rng.append(rng[0])
            self.rng_bytes = rng[1]
        self.ids_recorded = ids is not None
        if ids is not None:
            if self.ids is None or self.offsets is None:
                self.ids = _Log(self.path / C.BATCH_IDS_LOG, C.IDS_DTYPE)
                self.offsets = _Log(self.path / C.BATCH_OFFSETS_LOG, C.IDS_DTYPE)
                self.offsets.append(np.zeros(1, dtype=np.int64))
            self.ids.append(ids)
            self.n_ids += int(ids.size)
            if ids.size:
                self.max_id = max(self.max_id, int(ids.max()))
            self.batch_sizes.add(int(ids.size))
            self.offsets.append(np.array([self.n_ids], dtype=np.int64))
        self.lrs.append(lrs)

    def snapshot(self) -> dict[str, Any]:
        """The manifest entries of the logs as written so far (``lrs``, ``batch_ids``,
        ``rng_states``): what a checkpoint lists as valid."""
        ids_entry: dict[str, Any] = {"recorded": False}
        if self.ids_recorded and self.ids is not None and self.offsets is not None:
            ids_entry = {
                "recorded": True,
                "ids": self.ids.entry(),
                "offsets": self.offsets.entry(),
                "max_id": self.max_id,
                "batch_sizes": sorted(self.batch_sizes),
            }
        rng_entry: dict[str, Any] = {"recorded": False}
        if self.rng is not None and self.rng_bytes is not None:
            rng_entry = {"recorded": True, "log": self.rng.entry(), "cpu_bytes": self.rng_bytes[0],
                         "cuda_bytes": self.rng_bytes[1]}
        return {"lrs": self.lrs.entry(), "batch_ids": ids_entry, "rng_states": rng_entry}

    def cut_to(self, snap: dict[str, Any]) -> None:
        """Cut the (closed) logs back to a :meth:`snapshot`; remove those it does not list."""
        self.lrs.cut(snap["lrs"]["count"])
        if snap["batch_ids"]["recorded"] and self.ids is not None and self.offsets is not None:
            self.ids.cut(snap["batch_ids"]["ids"]["count"])
            self.offsets.cut(snap["batch_ids"]["offsets"]["count"])
        else:
            for name in (C.BATCH_IDS_LOG, C.BATCH_OFFSETS_LOG):
                (self.path / name).unlink(missing_ok=True)
        if snap["rng_states"]["recorded"] and self.rng is not None:
            self.rng.cut(snap["rng_states"]["log"]["count"])
        else:
            (self.path / C.RNG_LOG).unlink(missing_ok=True)

    def close(self) -> None:
        for log in (self.lrs, self.ids, self.offsets, self.rng):
            if log is not None:
                log.close()


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
