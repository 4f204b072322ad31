"""Synthetic data sets written once by a fixed generator as ``.npy`` files and read memory-mapped
(``scale-1m``, ``scale-1m-pairs``): the folder's JSON says what was generated, a folder whose JSON
and row counts match is reused, and anything else is rewritten chunk by chunk (each file under a
temporary name, renamed when complete; the JSON last, so an interrupted write is never reused)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..._io import write_json

Rows = Callable[[int, int], Mapping[str, np.ndarray]]
"""``rows(start, stop)`` → {file name: rows [start, stop) of that file}."""


def is_current(folder: Path, meta_json: str, meta: dict[str, Any], rows: Mapping[str, int]) -> bool:
    """Whether ``folder/meta_json`` holds ``meta`` and every ``folder/<name>.npy`` has ``rows[name]`` rows."""
    try:
        if json.loads((folder / meta_json).read_text(encoding="utf-8")) != meta:
            return False
        return all(np.load(folder / f"{f}.npy", mmap_mode="r").shape[0] == n for f, n in rows.items())
    except (OSError, ValueError, json.JSONDecodeError):
        return False


def write(folder: Path, meta_json: str, meta: dict[str, Any],
          parts: Sequence[tuple[int, Mapping[str, tuple[Any, tuple[int, ...]]], Rows]], chunk: int) -> None:
    """Write each part ``(n, {file name: (dtype, row shape)}, rows)`` of ``n`` rows into
    ``folder/<file name>.npy``, ``chunk`` rows at a time (memory independent of ``n``), then ``meta``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / meta_json).unlink(missing_ok=True)  # the folder is not current until the end
    for n, specs, rows in parts:
        tmp = {f: folder / f".{f}.tmp.npy" for f in specs}
        arrays = {f: np.lib.format.open_memmap(tmp[f], mode="w+", dtype=dt, shape=(n, *shape))
                  for f, (dt, shape) in specs.items()}
        for s in range(0, n, chunk):
            for f, block in rows(s, min(s + chunk, n)).items():
                arrays[f][s : s + len(block)] = block
        for a in arrays.values():
            a.flush()
        del arrays
        for f, p in tmp.items():
            os.replace(p, folder / f"{f}.npy")
    write_json(folder / meta_json, meta)
