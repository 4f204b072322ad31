"""Resumable sweeps: the state of a backward sweep saved at segment boundaries into ``OUT/.resume``.

A sweep (docs/method.md §4.1, "Resumable sweeps") processes the run segment by segment backwards,
each segment replayed from its checkpoint. Between two segments its whole state is a few tensors
(the adjoint θ̄ (Q, P), the optimizer-state adjoint s̄, the scores so far (N, Q), group values) and a
few numbers (the next segment, the RNG state of the proxy draws, the adjoint growth). Saved there
and restored, the remaining segments do exactly the arithmetic of an uninterrupted sweep, so the
scores are bit-identical.

Layout of ``OUT/.resume``: ``tensors-<n>.safetensors`` (the tensors, written first) and
``state.json`` (written last, atomically: the key, the numbers, the tensor file's name and sha256).
A kill between the two writes leaves the previous ``state.json`` naming the previous tensor file,
which is deleted only after the new ``state.json`` is in place.

Estimators see only :class:`SweepResume` through ``ScoringContext.resume``: :meth:`SweepResume.load`
and :meth:`SweepResume.maybe_save`; the API decides where the folder is and what the key holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from ._errors import OutputExistsError, ResumeMismatchError
from ._io import write_json, write_safetensors
from ._paths import inside

log = logging.getLogger("diffin")

RESUME_DIR = ".resume"
STATE_JSON = "state.json"
TENSORS_PATTERN = "tensors-{n:06d}.safetensors"
STATE_FORMAT = 1
RESUME_FIELDS = ("resume_every_steps", "resume_every_minutes")
"""ScoreConfig fields that say when to save, not what is computed: left out of the key."""


@dataclass
class SweepState:
    """A sweep's state at a segment boundary: ``tensors`` (name → tensor, any device; saved on the
    CPU in their dtype) and ``meta`` (JSON-able numbers: next segment, RNG state, ...)."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class SweepResume:
    """Save and restore a sweep's state in ``folder`` (``None``: do nothing, load nothing).

    ``key``: what the state is valid for (config without :data:`RESUME_FIELDS`, the result key of
    run and data, method, target kind, groups, world size, diffin version); a state written under
    another key is refused by :meth:`check` (:class:`ResumeMismatchError`). ``every_steps`` /
    ``every_minutes``: :meth:`maybe_save` writes once at least that many steps / minutes passed
    since the last save (0 turns a criterion off). ``load_saved``: whether :meth:`load` returns
    the saved state (the caller asked to resume) or nothing.
    """

    def __init__(
        self,
        folder: Path | None,
        key: dict[str, Any] | None = None,
        every_steps: int = 0,
        every_minutes: float = 0.0,
        load_saved: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folder = folder
        self.key = key or {}
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self.load_saved = load_saved
        self._clock = clock
        self._since_steps = 0
        self._since_time = clock()
        self._count = 0
        self.saves = 0
        self.resumed = False

    # ------------------------------------------------------------------ folder
    @property
    def active(self) -> bool:
        return self.folder is not None

    def exists(self) -> bool:
        """Whether the folder holds a saved state (its ``state.json``)."""
        return self.folder is not None and (self.folder / STATE_JSON).exists()

    def _read_json(self) -> dict[str, Any]:
        assert self.folder is not None
        path = self.folder / STATE_JSON
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ResumeMismatchError(
                f"{path} cannot be read ({e}); pass overwrite=True (--overwrite) to discard it and start again"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT or "key" not in meta:
            raise ResumeMismatchError(
                f"{path} is not a resume state this diffin writes; pass overwrite=True (--overwrite) to "
                "discard it and start again"
            )
        return meta

    def check(self) -> None:
        """Raise :class:`ResumeMismatchError` naming what differs when the saved state was written
        under another key (nothing is changed on disk)."""
        if not self.exists():
            return
        old = self._read_json()["key"]
        differs = _differences(old, self.key)
        if differs:
            raise ResumeMismatchError(
                f"{self.folder} holds the state of an interrupted scoring with a different "
                f"{'; '.join(differs)}; resume with the same run, data, method and config, or pass "
                "overwrite=True (--overwrite) to discard the state and start again"
            )

    def discard(self) -> None:
        """Delete the folder (after a finished scoring, or when overwriting)."""
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)

    # ------------------------------------------------------------------ estimators' side
    def load(self) -> SweepState | None:
        """The saved state, on the CPU (once: later calls return None), or None when there is
        none or resuming was not asked for. Raises :class:`ResumeMismatchError` for a state of
        another key or a tensor file that does not match its ``state.json``."""
        if not (self.load_saved and self.exists()) or self.resumed:
            return None
        assert self.folder is not None
        self.check()
        meta = self._read_json()
        rel = meta.get("tensors")
        # a path read from the state's JSON stays inside its folder (UnsafePathError otherwise)
        tensor_path = inside(self.folder, rel, str(self.folder / STATE_JSON)) if isinstance(rel, str) and rel else None
        if tensor_path is None or not tensor_path.is_file() or _sha256(tensor_path) != meta.get("sha256"):
            raise ResumeMismatchError(
                f"the tensor file {rel!r:.100} named by {self.folder / STATE_JSON} is missing or "
                "does not match its hash (the state was damaged); pass overwrite=True (--overwrite) to "
                "discard it and start again"
            )
        self.resumed = True
        self._count = int(meta.get("count", 0))
        log.info("resuming the sweep from %s (%s)", self.folder, meta.get("where", ""))
        return SweepState(load_file(str(tensor_path)), dict(meta["state"]))

    def maybe_save(self, steps: int, state_fn: Callable[[], SweepState]) -> bool:
        """Count ``steps`` more steps done; save ``state_fn()`` when the cadence says so. Returns
        whether it saved."""
        if self.folder is None:
            return False
        self._since_steps += steps
        due_steps = self.every_steps > 0 and self._since_steps >= self.every_steps
        due_time = self.every_minutes > 0 and self._clock() - self._since_time >= 60.0 * self.every_minutes
        if not (due_steps or due_time):
            return False
        if world_rank() != 0:  # several processes hold the same state: rank 0 writes it
            self._since_steps, self._since_time = 0, self._clock()
            return False
        self.save(state_fn())
        return True

    def save(self, state: SweepState) -> None:
        """Write ``state`` atomically: the tensor file, then ``state.json`` naming it and its
        sha256, then remove older tensor files."""
        assert self.folder is not None
        self._count += 1
        name = TENSORS_PATTERN.format(n=self._count)
        path = self.folder / name
        write_safetensors(path, {k: v.detach().to("cpu").clone() for k, v in state.tensors.items()})
        write_json(self.folder / STATE_JSON, {
            "format": STATE_FORMAT, "key": self.key, "count": self._count, "tensors": name,
            "sha256": _sha256(path), "where": state.meta.get("where", ""), "state": state.meta,
        })
        for old in self.folder.glob("tensors-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self._since_steps = 0
        self._since_time = self._clock()
        self.saves += 1


NO_RESUME = SweepResume(None)
"""The hook of a scoring without an output folder: saves nothing, loads nothing."""


def refuse_stale_state(folder: Path) -> None:
    """Raise :class:`OutputExistsError`: ``folder`` holds the state of an interrupted scoring."""
    raise OutputExistsError(
        f"{folder} holds the state of an interrupted scoring; pass resume=True (--resume) to continue "
        "it, or overwrite=True (--overwrite) to discard it and start again"
    )


def resume_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config's JSON without the fields that only say when to save (:data:`RESUME_FIELDS`)."""
    return {k: v for k, v in config.items() if k not in RESUME_FIELDS}


def world_rank() -> int:
    """This process's rank in the initialised ``torch.distributed`` group (0 without one)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes of the initialised ``torch.distributed`` group (1 without one)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    names = {"run": "run (another recording)", "train": "training data", "target": "target data",
             "method": "method", "target_kind": "target kind", "groups": "removal groups",
             "world_size": "world size", "diffin_version": "diffin version"}
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "config" and isinstance(a, dict) and isinstance(b, dict):
            fields = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
            out.append("config (" + ", ".join(f"{f}: {a.get(f)!r} -> {b.get(f)!r}" for f in fields[:4]) + ")")
        elif isinstance(b, str) and b.startswith("unhashable-"):
            out.append(f"{names.get(k, k)} (it cannot be hashed, so a resume cannot be checked against it)")
        elif k in ("method", "target_kind", "world_size", "diffin_version"):
            out.append(f"{names[k]} ({a!r} -> {b!r})")
        else:
            out.append(names.get(k, k))
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
