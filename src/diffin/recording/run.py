"""Load and validate a recorded run folder. Nothing is unpickled: JSON, raw little-endian
logs (format 2), ``.npy`` with ``allow_pickle=False`` (format 1) and safetensors only.

A run folder is valid up to its last checkpoint at all times while it is being recorded: the
manifest lists the checkpoints written so far and how many entries of each append-only log they
cover (with a sha256 of those bytes). A run that was not closed (``status`` other than
``"complete"``) loads up to that checkpoint with a :class:`PartialRunWarning`; log entries past it
are ignored."""

# Long file: one reader of a run folder from someone else: the manifest, the logs, the checkpoints and
# their checks (sha256 of covered bytes, paths confined to the folder, frozen-weight fingerprints) are
# validated together, so that a damaged folder raises one named error before anything is used.

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from .. import _constants as C
from .._errors import (
    CorruptManifestError,
    DataMismatchError,
    FormatVersionError,
    FrozenWeightsMismatchError,
    IncompleteRunError,
    InvalidIdsError,
    MissingFileError,
    NonFiniteCheckpointError,
    ParameterMismatchError,
    PartialRunWarning,
    RunNotFoundError,
    TruncatedFileError,
    UnsupportedMethodError,
)
from .._paths import inside
from .manifest import REQUIRED_KEYS, OptimizerSpec, check_manifest, frozen_fingerprint


@dataclass
class Checkpoint:
    """θ and optimizer state at one recorded step.

    ``params``: every model parameter (trainable and frozen) by name; ``buffers``: module
    buffers. ``optimizer_state``: state name → {trainable parameter name → tensor shaped like the
    parameter}, e.g. ``{"momentum_buffer": ...}`` (SGD) or ``{"exp_avg": ..., "exp_avg_sq": ...}``
    (Adam, AdamW); a state name (or a parameter under it) is absent when the optimizer had not
    created it yet. ``optimizer_step``: the optimizer's step count k at this checkpoint (Adam's
    ``state["step"]``; the checkpoint's step index for optimizers that keep no count, e.g. SGD, and
    before the first step), ``None`` for a non-SGD run recorded before optimizer state was stored.
    ``param_steps``: the step count of each parameter that has one (they differ only when some
    parameters got no gradient on some steps). ``momentum``: ``optimizer_state["momentum_buffer"]``,
    or ``None`` when the optimizer had none yet (its next step then starts the buffer from the
    gradient).
    """

    step: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    optimizer_step: int | None = None
    param_steps: dict[str, int] = field(default_factory=dict)


class Run:
    """A validated, read-only view of a run folder written by :class:`diffin.Recorder`.

    Steps are numbered t = 0 … T−1; step t moves θ_t to θ_{t+1} on the batch ``batch(t)`` with
    learning rate ``group_lrs[t, j]`` for the parameters of param group j (``optimizer.groups``);
    ``lrs`` is group 0's column. Checkpoint steps are in 0 … T (0 and T always). For a run that was
    not closed (``complete`` is False), T is its last checkpoint.

    Attributes set from the manifest: ``optimizer`` (:class:`OptimizerSpec`, with ``groups``),
    ``group_lrs`` ((T, G) float64), ``lrs`` ((T,) float64), ``clip_grad_norm`` (the ``max_norm`` the
    loop clipped the whole gradient to with ``torch.nn.utils.clip_grad_norm_``, or ``None``),
    ``trainable``, ``param_shapes``, ``dtype``, ``checkpoint_steps``, ``n_steps``, ``train_modes``
    ({qualified name: trained in training mode} of every BatchNorm / dropout module, ``{}`` for a
    model without them, ``None`` for a run recorded before modes were), ``has_rng`` (the RNG state of
    every step's training forward was recorded: :meth:`rng_state`, :meth:`cuda_rng_state`).
    Checkpoints hold the model's buffers (running statistics, ``num_batches_tracked``).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        m = self.manifest
        self.format_version: int = int(m["format_version"])
        self.status: str = m.get("status", C.STATUS_COMPLETE)
        if self.status not in (C.STATUS_COMPLETE, C.STATUS_RECORDING, C.STATUS_INTERRUPTED):
            raise CorruptManifestError(f"{self.path / C.MANIFEST}: unknown status {self.status!r}")
        self.interrupted: dict[str, Any] | None = m.get("interrupted")
        try:
            self.n_steps: int = int(m["n_steps"])
            self.trainable: list[str] = list(m["model"]["trainable"])
            self.frozen_sha256: str | None = m["model"].get("frozen_sha256")
            """Set when checkpoints hold the trained parameters only: the fingerprint of the frozen ones
            (:func:`frozen_fingerprint`), which the model given for scoring must match."""
            self.optimizer = OptimizerSpec.from_json(m["optimizer"], self.trainable)
            self.param_shapes: dict[str, tuple[int, ...]] = {
                p["name"]: tuple(p["shape"]) for p in m["model"]["parameters"]
            }
            self.dtype: torch.dtype = getattr(torch, m["model"]["dtype"])
            self._ckpt_entries: dict[int, dict[str, Any]] = {
                int(c["step"]): c for c in m["checkpoints"]
            }
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptManifestError(f"{self.path / C.MANIFEST}: malformed entry ({e!r})") from e
        self.checkpoint_steps: list[int] = sorted(self._ckpt_entries)
        if not self.checkpoint_steps or self.checkpoint_steps[0] != 0:
            raise CorruptManifestError(f"{self.path}: the manifest lists no checkpoint at step 0")
        if self.checkpoint_steps[-1] != self.n_steps:
            raise CorruptManifestError(
                f"{self.path}: the last checkpoint is at step {self.checkpoint_steps[-1]} "
                f"but the run has {self.n_steps} steps"
            )
        for entry in self._ckpt_entries.values():
            self._check_file(entry)
            self._check_safetensors_header(entry)
        read = self._read_log_v1 if self.format_version == 1 else self._read_log
        self.clip_grad_norm: float | None = _clip_entry(m.get("clip_grad_norm"), self.path)
        n_groups = len(self.optimizer.groups) or 1
        if self.format_version >= 3 and self.optimizer.groups:
            named = [n for g in self.optimizer.groups for n in g["params"]]
            if sorted(named) != sorted(self.trainable):
                raise CorruptManifestError(
                    f"{self.path / C.MANIFEST}: the optimizer's groups hold {sorted(named)[:5]} but the "
                    f"trainable parameters are {self.trainable[:5]}; the manifest is damaged"
                )
        lrs = read(m["lrs"], C.LRS_DTYPE).astype(np.float64)
        if self.format_version < 3:
            n_groups = 1
        if lrs.shape != (self.n_steps * n_groups,) or not np.all(np.isfinite(lrs)):
            raise TruncatedFileError(
                f"{self.path / m['lrs']['file']}: expected {self.n_steps} finite learning rates for each "
                f"of {n_groups} param group(s), found {lrs.size} values"
            )
        group_lrs = lrs.reshape(self.n_steps, n_groups)
        if n_groups != len(self.optimizer.groups):  # format 1/2: one rate for every group
            group_lrs = np.repeat(group_lrs[:, :1], max(len(self.optimizer.groups), 1), axis=1)
        self.group_lrs: np.ndarray = np.ascontiguousarray(group_lrs)
        self.lrs: np.ndarray = np.ascontiguousarray(self.group_lrs[:, 0])
        gs = m.get("grad_scales")
        self.grad_scales: np.ndarray | None = (
            np.asarray(read(gs, C.LRS_DTYPE), dtype=np.float64) if gs is not None else None)
        if self.grad_scales is not None and self.grad_scales.shape != (self.n_steps,):
            raise TruncatedFileError(f"{self.path / C.GRAD_SCALE_LOG}: not one gradient scale per step; the recording "
                                     "is damaged")
        bi = m.get("batch_ids", {"recorded": False})
        self.has_batch_ids: bool = bool(bi.get("recorded", False))
        self._ids: np.ndarray | None = None
        self._offsets: np.ndarray | None = None
        self.max_id: int = -1
        self.batch_sizes: list[int] = []
        if self.has_batch_ids:
            try:
                ids_entry, offsets_entry = bi["ids"], bi["offsets"]
            except (KeyError, TypeError) as e:
                raise CorruptManifestError(
                    f"{self.path / C.MANIFEST}: malformed batch_ids entry ({e!r}); the file is damaged"
                ) from e
            self._offsets = read(offsets_entry, C.IDS_DTYPE).astype(np.int64)
            self._ids = read(ids_entry, C.IDS_DTYPE, mmap=True)
            if (
                self._offsets.shape != (self.n_steps + 1,)
                or self._offsets[0] != 0
                or int(self._offsets[-1]) != self._ids.shape[0]
                or np.any(np.diff(self._offsets) < 0)
            ):
                raise TruncatedFileError(
                    f"{self.path}: batch_ids.npy and batch_offsets.npy do not agree with "
                    f"{self.n_steps} steps; the recording is damaged"
                )
            if self._ids.dtype.kind not in "iu":
                raise CorruptManifestError(f"{self.path}: batch ids are not integers")
            self.max_id = int(bi.get("max_id", -1))
            self.batch_sizes = [int(b) for b in bi.get("batch_sizes", [])]
        self.n_train_recorded: int | None = m.get("n_train")
        self.train_modes: dict[str, bool] | None = _train_modes_entry(m.get("train_modes"), self.path)
        self._rng: np.ndarray | None = None
        self._rng_bytes = (0, 0)
        self._fwd_rows: np.ndarray | None = None  # (F, 3): step, rows, sequence length of each forward
        self._fwd_start: np.ndarray | None = None  # (T + 1,): the first forward of each step
        rng = m.get("rng_states", {"recorded": False})
        if isinstance(rng, dict) and rng.get("recorded"):
            try:
                cpu, cuda, log = int(rng["cpu_bytes"]), int(rng["cuda_bytes"]), rng["log"]
            except (KeyError, TypeError, ValueError) as e:
                raise CorruptManifestError(f"{self.path / C.MANIFEST}: malformed rng_states entry ({e!r})") from e
            self._rng = read(log, C.RNG_DTYPE, mmap=True)
            n_states = self.n_steps
            if rng.get("forwards") is not None:  # one state per training forward (micro-batch)
                rows = np.asarray(read(rng["forwards"], C.IDS_DTYPE), dtype=np.int64).reshape(-1, 3)
                n_states = rows.shape[0]
                self._fwd_rows = rows
                self._fwd_start = np.searchsorted(rows[:, 0], np.arange(self.n_steps + 1), side="left")
                if np.any(np.diff(rows[:, 0]) < 0) or np.any(np.diff(self._fwd_start) < 1):
                    raise TruncatedFileError(f"{self.path / C.FORWARDS_LOG}: not one or more forwards per step; "
                                             "the recording is damaged")
            if cpu <= 0 or cuda < 0 or self._rng.shape != (n_states * (cpu + cuda),):
                raise TruncatedFileError(
                    f"{self.path / C.RNG_LOG}: expected {n_states} RNG states of {cpu} + {cuda} bytes, "
                    f"found {self._rng.size} bytes; the recording is damaged"
                )
            self._rng_bytes = (cpu, cuda)

    # ------------------------------------------------------------------ reading logs
    def _read_log_v1(self, entry: dict[str, Any], dtype: str, mmap: bool = False) -> np.ndarray:
        """A format-1 log: an ``.npy`` file whose byte count the manifest lists."""
        self._check_file(entry)
        return _load_npy(self._file(entry["file"]), mmap=mmap)

    def _read_log(self, entry: dict[str, Any], dtype: str, mmap: bool = False) -> np.ndarray:
        """The valid prefix of a format-2 append-only log: ``count`` entries of ``dtype`` whose
        bytes hash to ``sha256``. A complete run's log holds exactly those bytes; a run that was
        not closed may hold more (steps past its last checkpoint), which are ignored."""
        try:
            rel, count, digest = entry["file"], int(entry["count"]), str(entry["sha256"])
            ok_dtype = entry["dtype"] == dtype
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptManifestError(f"{self.path}: malformed log entry {entry!r}") from e
        if not ok_dtype or count < 0:
            raise CorruptManifestError(f"{self.path}: log entry {entry!r} should hold {dtype}, count >= 0")
        p = self._file(rel)
        if not p.is_file():
            raise MissingFileError(f"{p} is listed in the manifest but missing; copy the whole run folder")
        itemsize = np.dtype(dtype).itemsize
        need, actual = count * itemsize, p.stat().st_size
        if actual < need or (self.complete and actual != need):
            raise TruncatedFileError(
                f"{p} has {actual} bytes but the manifest lists {count} entries ({need} bytes): the "
                "file is truncated or was replaced; re-copy the run folder or record the run again"
            )
        if sha256_prefix(p, need).hexdigest() != digest:
            raise TruncatedFileError(
                f"{p}: its first {need} bytes do not match the sha256 in the manifest: the file is "
                "damaged or was replaced; re-copy the run folder or record the run again"
            )
        if count == 0:
            return np.zeros(0, dtype=dtype)
        if mmap:
            return np.memmap(p, dtype=dtype, mode="r", shape=(count,))
        return np.fromfile(p, dtype=dtype, count=count)

    # ------------------------------------------------------------------ queries
    @property
    def has_rng(self) -> bool:
        """True when the run recorded the RNG state of every step (dropout in training mode)."""
        return self._rng is not None

    def rng_state(self, t: int) -> torch.Tensor:
        """torch's CPU RNG state at the start of step t's training forward: a uint8 CPU tensor for
        ``torch.set_rng_state`` (the step's dropout masks follow from it; see :class:`Recorder`)."""
        return self._rng_part(t, 0)

    def cuda_rng_state(self, t: int) -> torch.Tensor | None:
        """The CUDA generator's state (of the model's device) at the start of step t's training
        forward, a uint8 CPU tensor for ``torch.cuda.set_rng_state``; ``None`` when the model was
        trained on the CPU."""
        return self._rng_part(t, 1) if self._rng_bytes[1] else None

    def forwards(self, t: int) -> list[tuple[torch.Tensor, torch.Tensor | None, int, int]]:
        """Step t's training forwards with dropout, in order (several under gradient accumulation,
        one per micro-batch): ``(cpu_rng_state, cuda_rng_state or None, rows, sequence length)``;
        rows and length are 0 for a run recorded before they were (one forward over the whole batch)."""
        if self._fwd_rows is None or self._fwd_start is None:
            return [(self._rng_part(t, 0), self.cuda_rng_state(t), 0, 0)]
        if not 0 <= t < self.n_steps:
            raise IndexError(f"step {t} is out of range for a run of {self.n_steps} steps")
        out = []
        for f in range(int(self._fwd_start[t]), int(self._fwd_start[t + 1])):
            cuda = self._rng_part(f, 1, raw=True) if self._rng_bytes[1] else None
            out.append((self._rng_part(f, 0, raw=True), cuda, int(self._fwd_rows[f, 1]), int(self._fwd_rows[f, 2])))
        return out

    def _rng_part(self, t: int, part: int, raw: bool = False) -> torch.Tensor:
        if self._rng is None:
            raise UnsupportedMethodError(
                f"the run at {self.path} recorded no RNG states (no dropout in training mode, or recorded "
                "before diffin recorded them): its dropout masks cannot be replayed"
            )
        if not raw and self._fwd_start is not None:  # a step's state: that of its first forward
            if not 0 <= t < self.n_steps:
                raise IndexError(f"step {t} is out of range for a run of {self.n_steps} steps")
            t = int(self._fwd_start[t])
        elif not raw and not 0 <= t < self.n_steps:
            raise IndexError(f"step {t} is out of range for a run of {self.n_steps} steps")
        cpu, cuda = self._rng_bytes
        start = t * (cpu + cuda) + (cpu if part else 0)
        return torch.from_numpy(np.array(self._rng[start : start + (cuda if part else cpu)], dtype=np.uint8))

    @property
    def complete(self) -> bool:
        """True when the recorder closed the run; False for a killed or interrupted recording
        (then only steps 0 … ``n_steps``, up to its last checkpoint, are loaded)."""
        return self.status == C.STATUS_COMPLETE

    @property
    def steps_logged(self) -> int:
        """How many steps the training loop had recorded (``Recorder.step`` calls) when the run
        stopped, counting those past the last checkpoint that are ignored; ``n_steps`` for a
        complete run."""
        if self.complete or self.format_version == 1:
            return self.n_steps
        p = self._file(self.manifest["lrs"]["file"])
        per_step = self.group_lrs.shape[1] if self.format_version >= 3 else 1
        logged = p.stat().st_size // (np.dtype(C.LRS_DTYPE).itemsize * per_step)
        at = self.interrupted.get("at_step") if isinstance(self.interrupted, dict) else None
        return max(self.n_steps, logged, at if isinstance(at, int) else 0)

    def partial_note(self) -> str:
        """Why a run that was not closed is loaded only up to its last checkpoint ('' if complete)."""
        if self.complete:
            return ""
        s = self.n_steps
        if self.status == C.STATUS_INTERRUPTED and isinstance(self.interrupted, dict):
            how = (
                f"was interrupted by {self.interrupted.get('exception', 'an exception')} at step "
                f"{self.interrupted.get('at_step', '?')} and closed at its last checkpoint"
            )
        else:
            how = "was not closed (the training process was killed or died)"
        return (
            f"the run at {self.path} {how}: it stopped at step {s} of the {self.steps_logged} "
            f"steps recorded, and scores cover steps 0..{s} only. To continue training it, load its "
            "last checkpoint with diffin.recording.restore_checkpoint(path, model, optimizer) and "
            "record on with diffin.Recorder(path, model, optimizer, ..., resume=True)"
        )

    @property
    def fingerprint(self) -> str:
        """Content hash (sha256 hex) of the manifest: the run's identity for cache keys.

        The manifest lists every file of the run with its size (and the logs' sha256), the
        steps, optimizer and model, and a random ``recording_id`` drawn when the recording
        started: a run re-recorded into the same folder gets a new fingerprint even when
        nothing else differs."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    def until(self, step: int) -> Run:
        """This run as it stood at its checkpoint ``step``: steps 0 … step−1, checkpoints up to
        ``step`` (for scores of what training had done by then, e.g. before memorisation). The
        view's :attr:`fingerprint` differs from the whole run's."""
        if step not in self._ckpt_entries:
            raise MissingFileError(f"{self.path} has no checkpoint at step {step}; checkpoints: "
                                  f"{self.checkpoint_steps[:8]}{' ...' if len(self.checkpoint_steps) > 8 else ''}")
        if step == self.n_steps:
            return self
        view = copy.copy(self)
        view.manifest = {**self.manifest, "until_step": step}
        view.n_steps = step
        view.checkpoint_steps = [c for c in self.checkpoint_steps if c <= step]
        view._ckpt_entries = {c: e for c, e in self._ckpt_entries.items() if c <= step}
        view.group_lrs = self.group_lrs[:step]
        view.lrs = self.lrs[:step]
        view.batch_sizes = self.batch_sizes[:step]
        if self._offsets is not None:
            view._offsets = self._offsets[: step + 1]
        return view

    @property
    def segments(self) -> list[tuple[int, int]]:
        """Consecutive checkpoint pairs (c_k, c_{k+1}); steps c_k … c_{k+1}−1 lie between."""
        s = self.checkpoint_steps
        return list(zip(s[:-1], s[1:]))

    def batch(self, t: int) -> np.ndarray:
        """Dataset ids of the batch of step t (int64, shape (|B_t|,))."""
        if self._ids is None or self._offsets is None:
            raise InvalidIdsError("this run recorded no batch ids")
        return np.array(self._ids[self._offsets[t] : self._offsets[t + 1]], dtype=np.int64)

    def batch_size_hint(self) -> int | None:
        """The most common batch size (if ids were recorded)."""
        if self._offsets is None or self.n_steps == 0:
            return None
        sizes = np.diff(self._offsets)
        vals, counts = np.unique(sizes, return_counts=True)
        return int(vals[np.argmax(counts)])

    def load_checkpoint(self, step: int, device: torch.device | str = "cpu") -> Checkpoint:
        """Read one checkpoint; raises if it is damaged or holds NaN/Inf."""
        if step not in self._ckpt_entries:
            raise MissingFileError(f"{self.path}: no checkpoint at step {step}")
        entry = self._ckpt_entries[step]
        path = self._file(entry["file"])
        params: dict[str, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        state: dict[str, dict[str, torch.Tensor]] = {}
        steps: dict[str, int] = {}
        old_momentum = self.format_version < 3
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                    t = fh.get_tensor(key)
                    if key.startswith(C.PARAM_PREFIX):
                        params[key[len(C.PARAM_PREFIX) :]] = t
                    elif key.startswith(C.BUFFER_PREFIX):
                        buffers[key[len(C.BUFFER_PREFIX) :]] = t
                    elif key.startswith(C.OPTIM_STEP_PREFIX):
                        steps[key[len(C.OPTIM_STEP_PREFIX) :]] = int(t.item())
                    elif key.startswith(C.OPTIM_PREFIX):
                        name, _, pname = key[len(C.OPTIM_PREFIX) :].partition(".")
                        state.setdefault(name, {})[pname] = t
                    elif old_momentum and key.startswith(C.MOMENTUM_PREFIX):
                        state.setdefault("momentum_buffer", {})[key[len(C.MOMENTUM_PREFIX) :]] = t
        except Exception as e:  # safetensors raises its own error types
            raise TruncatedFileError(f"{path}: cannot be read ({e})") from e
        for name, t in [*params.items(), *((f"{s}.{n}", t) for s, d in state.items() for n, t in d.items())]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteCheckpointError(
                    f"{path}: tensor {name!r} holds NaN or Inf (training diverged before step "
                    f"{step}?); score a run that stayed finite"
                )
        saved = self.trainable if self.frozen_sha256 else self.param_shapes  # frozen ones: fingerprinted only
        missing = [n for n in saved if n not in params]
        if missing:
            raise TruncatedFileError(f"{path}: parameters missing from the checkpoint: {missing}")
        if old_momentum and not entry.get("has_momentum", False):
            state.pop("momentum_buffer", None)
        opt = self.optimizer
        if steps:
            k: int | None = max(steps.values())
        elif self.format_version >= 3 or opt.kind == "SGD" or opt.assumed:
            k = int(entry.get("optimizer_step", step))
        else:
            k = None  # a non-SGD run of format 1/2: its optimizer state was not recorded
        return Checkpoint(step, params, buffers, state.get("momentum_buffer"), state, k, steps)

    def _file(self, rel: Any) -> Path:
        """The file ``rel`` named by the manifest, confined to the run folder."""
        return inside(self.path, rel, str(self.path / C.MANIFEST))

    def _check_file(self, entry: dict[str, Any]) -> None:
        _check_entry(self.path, entry)

    def _check_safetensors_header(self, entry: dict[str, Any]) -> None:
        _check_header(self._file(entry["file"]))

    def verify(self) -> None:
        """Read every checkpoint fully (finiteness included)."""
        for s in self.checkpoint_steps:
            self.load_checkpoint(s)

    # ------------------------------------------------------------------ validation
    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`ParameterMismatchError` unless ``model`` has the recorded parameters."""
        have = {n: tuple(p.shape) for n, p in model.named_parameters()}
        want = self.param_shapes
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        wrong = sorted(n for n in set(want) & set(have) if want[n] != have[n])
        if missing or extra or wrong:
            parts = []
            if missing:
                parts.append(f"missing in the model: {missing[:5]}")
            if extra:
                parts.append(f"not in the recording: {extra[:5]}")
            if wrong:
                parts.append(
                    "shape differs: "
                    + ", ".join(f"{n} recorded {want[n]} vs model {have[n]}" for n in wrong[:5])
                )
            raise ParameterMismatchError(
                f"the model does not match the run at {self.path} ("
                + "; ".join(parts)
                + "); pass a model built like the one that was trained"
            )
        if self.frozen_sha256 and frozen_fingerprint(model, self.trainable) != self.frozen_sha256:
            raise FrozenWeightsMismatchError(
                f"the frozen (untrained) parameters of the model differ from those the run at {self.path} trained "
                "with: its checkpoints hold the trained parameters only, so the frozen ones come from the model you "
                "pass. Load the same base weights (e.g. the same pretrained checkpoint, before adding the adapters)"
            )

    def check_ids(self, n_train: int) -> None:
        """Raise :class:`InvalidIdsError` if recorded ids do not fit a training set of n_train."""
        if self.n_train_recorded is not None and self.n_train_recorded != n_train:
            raise DataMismatchError(
                f"the run was recorded with n_train={self.n_train_recorded} but the training data "
                f"given has {n_train} samples; pass the same training set"
            )
        if self.has_batch_ids and self.max_id >= n_train:
            raise InvalidIdsError(
                f"the run's batch ids go up to {self.max_id} but the training data has only "
                f"{n_train} samples; pass the full training set, indexed by the recorded ids"
            )


def load_run(path: str | os.PathLike[str], model: nn.Module | None = None,
             n_train: int | None = None) -> Run:
    """Open a run folder, validate it, and (optionally) check it against a model and data size.

    A run that was not closed (its training process was killed, or an exception left
    ``with Recorder(...)``) loads up to its last checkpoint and emits a :class:`PartialRunWarning`
    that names the step it stopped at; everything past that checkpoint is ignored.
    """
    run = Run(path)
    if not run.complete:
        warnings.warn(run.partial_note(), PartialRunWarning, stacklevel=2)
    if model is not None:
        run.check_model(model)
    if n_train is not None:
        run.check_ids(n_train)
    return run


# ---------------------------------------------------------------------- helpers
def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / C.MANIFEST
    if not path.is_dir():
        raise RunNotFoundError(f"no run folder at {path}; record one with diffin.Recorder")
    if not mpath.exists():
        if (path / C.CHECKPOINT_DIR).exists():
            raise IncompleteRunError(
                f"{path} holds checkpoints but no manifest: the recording stopped before its first "
                "checkpoint was complete (or it was written in run format 1, which wrote the manifest "
                "only at Recorder.close()). Nothing in it can be scored: record the run again "
                "(diffin.Recorder(..., overwrite=True))"
            )
        raise RunNotFoundError(f"{path} has no {C.MANIFEST}; it is not a diffin run folder")
    mpath = inside(path, C.MANIFEST, str(path))  # not a link out of the folder
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CorruptManifestError(f"{mpath} is not valid JSON or cannot be read ({e}); the file is damaged") from e
    if not isinstance(m, dict):
        raise CorruptManifestError(f"{mpath} does not hold a JSON object")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptManifestError(f"{mpath} has no integer format_version >= 1")
    if version > C.FORMAT_VERSION:
        raise FormatVersionError(
            f"{path} was written in run format {version} by diffin {m.get('diffin_version')}; "
            f"this diffin reads format <= {C.FORMAT_VERSION}. Upgrade diffin to read it."
        )
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise CorruptManifestError(f"{mpath} lacks required keys {missing}")
    check_manifest(m, str(mpath))
    return m


def _train_modes_entry(value: Any, path: Path) -> dict[str, bool] | None:
    """The manifest's ``train_modes`` ({module name: trained in training mode}), None when absent."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, bool) for k, v in value.items()):
        raise CorruptManifestError(
            f"{path / C.MANIFEST}: train_modes must map module names to true/false, got {value!r:.200}; "
            "the manifest is damaged"
        )
    return dict(value)


def _clip_entry(value: Any, path: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CorruptManifestError(
            f"{path / C.MANIFEST}: clip_grad_norm must be null or a finite number > 0, got {value!r}; "
            "the manifest is damaged"
        )
    return float(value)


def sha256_prefix(path: Path, nbytes: int, chunk: int = 1 << 20) -> Any:
    """A ``hashlib.sha256`` object fed the first ``nbytes`` bytes of ``path`` (read in 1 MiB
    chunks); ``.hexdigest()`` for the digest, ``.update`` to go on hashing appended bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        left = nbytes
        while left > 0:
            buf = fh.read(min(chunk, left))
            if not buf:
                break
            h.update(buf)
            left -= len(buf)
    return h


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:
        raise TruncatedFileError(f"{path}: cannot be read as .npy ({e})") from e


def _check_header(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as e:
        raise TruncatedFileError(f"{path}: not a readable safetensors file ({e})") from e


def _check_entry(root: Path, entry: dict[str, Any]) -> None:
    try:
        rel, size = entry["file"], int(entry["bytes"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptManifestError(f"{root}: malformed file entry {entry!r}") from e
    p = inside(root, rel, str(root / C.MANIFEST))
    if not p.is_file():
        raise MissingFileError(f"{p} is listed in the manifest but missing; copy the whole run folder")
    actual = p.stat().st_size
    if actual != size:
        raise TruncatedFileError(
            f"{p} has {actual} bytes but the manifest says {size}: the file is truncated or was "
            "replaced; re-copy the run folder or record the run again"
        )

