"""The fixed synthetic generator of the ``scale-1m`` setup: data written once to disk as ``.npy``
files and read memory-mapped, never held whole in memory.

Ten Gaussian classes in 64 features (``x = μ_y + ε``, ε ~ N(0, I), class means μ ~ N(0, 0.3² I)),
5% of the training labels flipped to another class, float32 inputs, int64 labels. Rows are
drawn in granules of :data:`GRANULE` rows, each from its own seeded generator, so a row's
values depend only on the seed and its position: the file of N rows is the first N rows of any
larger one, whatever the chunk size used to write it. The folder holds ``x_train.npy``,
``y_train.npy``, ``x_val.npy``, ``y_val.npy`` (validation labels clean), ``flipped.npy`` (bool,
the flipped training ids), ``y_clean.npy`` (the training labels before flipping) and
``scale_data.json`` (what was generated); a folder whose JSON matches is reused, anything else
is regenerated. It is a data folder for ``diffin score --data DIR --model diffin.builtin.synthetic_scale:scale_model``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._errors import ConfigError
from .._io import write_json

N_FEATURES = 64
N_CLASSES = 10
NOISE = 0.05
MEAN_SCALE = 0.3
GRANULE = 1024  # rows per seeded generator: the unit of determinism
GENERATOR = "diffin-scale-v1"
META_JSON = "scale_data.json"
_TRAIN, _VAL = 0, 1  # streams of the seed sequence


def _means(seed: int) -> np.ndarray:
    """Class means μ, (N_CLASSES, N_FEATURES) float64."""
    return np.random.default_rng([seed, 2]).normal(0.0, MEAN_SCALE, (N_CLASSES, N_FEATURES))


def _rows(seed: int, stream: int, start: int, stop: int, noise: float,
          means: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows [start, stop) of a stream: inputs (n, 64) float32, labels (n,) int64 (flipped where
    the mask says), flipped mask (n,) bool, clean labels (n,) int64. ``start`` is a multiple of :data:`GRANULE`."""
    xs, ys, fs, cs = [], [], [], []
    for g in range(start // GRANULE, -(-stop // GRANULE)):
        lo, hi = g * GRANULE, min((g + 1) * GRANULE, stop)
        rng = np.random.default_rng([seed, stream, g])
        y = rng.integers(0, N_CLASSES, GRANULE)
        x = means[y] + rng.standard_normal((GRANULE, N_FEATURES))
        flip = rng.random(GRANULE) < noise
        y_noisy = np.where(flip, (y + rng.integers(1, N_CLASSES, GRANULE)) % N_CLASSES, y)
        keep = slice(0, hi - lo)
        xs.append(x[keep].astype(np.float32))
        ys.append(y_noisy[keep].astype(np.int64))
        fs.append(flip[keep])
        cs.append(y[keep].astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(fs), np.concatenate(cs)


def scale_meta(n_train: int, n_val: int, seed: int) -> dict[str, Any]:
    """What identifies a generated folder (the content of ``scale_data.json``)."""
    return {"generator": GENERATOR, "n_train": int(n_train), "n_val": int(n_val), "n_features": N_FEATURES,
            "n_classes": N_CLASSES, "noise": NOISE, "mean_scale": MEAN_SCALE, "seed": int(seed)}


def _is_current(folder: Path, meta: dict[str, Any]) -> bool:
    try:
        if json.loads((folder / META_JSON).read_text(encoding="utf-8")) != meta:
            return False
        rows = {"x_train.npy": meta["n_train"], "y_train.npy": meta["n_train"], "flipped.npy": meta["n_train"],
                "y_clean.npy": meta["n_train"], "x_val.npy": meta["n_val"], "y_val.npy": meta["n_val"]}
        return all(np.load(folder / f, mmap_mode="r").shape[0] == n for f, n in rows.items())
    except (OSError, ValueError, json.JSONDecodeError):
        return False


def generate(folder: str | os.PathLike[str], n_train: int = 1_000_000, n_val: int = 2_000, seed: int = 0,
             chunk_rows: int = 65_536) -> bool:
    """Write the scale data into ``folder`` unless it already holds these rows.

    Args:
        folder: created if missing.
        n_train, n_val: rows of the training and validation sets.
        seed: seed of the class means, rows and flipped labels.
        chunk_rows: rows held in memory at once while writing (rounded up to :data:`GRANULE`);
            the files do not depend on it.

    Returns ``True`` when the files were (re)generated, ``False`` when reused. Each file is
    written under a temporary name and renamed; ``scale_data.json`` is written last.
    """
    if n_train < 1 or n_val < 1 or chunk_rows < 1:
        raise ConfigError(f"n_train, n_val and chunk_rows must be >= 1, got {n_train}, {n_val}, {chunk_rows}")
    out = Path(folder)
    meta = scale_meta(n_train, n_val, seed)
    if _is_current(out, meta):
        return False
    out.mkdir(parents=True, exist_ok=True)
    (out / META_JSON).unlink(missing_ok=True)  # the folder is not current until the end
    means = _means(seed)
    chunk = -(-chunk_rows // GRANULE) * GRANULE
    parts = ((_TRAIN, n_train, ("x_train", "y_train", "flipped", "y_clean")), (_VAL, n_val, ("x_val", "y_val")))
    for stream, n, names in parts:
        tmp = {k: out / f".{k}.tmp.npy" for k in names}
        arrays = [np.lib.format.open_memmap(tmp[names[0]], mode="w+", dtype=np.float32, shape=(n, N_FEATURES)),
                  np.lib.format.open_memmap(tmp[names[1]], mode="w+", dtype=np.int64, shape=(n,))]
        if len(names) == 4:
            arrays += [np.lib.format.open_memmap(tmp[names[2]], mode="w+", dtype=np.bool_, shape=(n,)),
                       np.lib.format.open_memmap(tmp[names[3]], mode="w+", dtype=np.int64, shape=(n,))]
        for s in range(0, n, chunk):
            x, y, f, c = _rows(seed, stream, s, min(s + chunk, n), NOISE if stream == _TRAIN else 0.0, means)
            arrays[0][s : s + len(x)] = x
            arrays[1][s : s + len(x)] = y
            if len(arrays) == 4:
                arrays[2][s : s + len(x)] = f
                arrays[3][s : s + len(x)] = c
        for a in arrays:
            a.flush()
        del arrays
        for k, p in tmp.items():
            os.replace(p, out / f"{k}.npy")
    write_json(out / META_JSON, meta)
    return True


def scale_model() -> nn.Module:
    """The scale setup's model, MLP 64-256-256-10 tanh, float32, seeded (the
    ``--model diffin.builtin.synthetic_scale:scale_model`` factory)."""
    from .models import mlp

    torch.manual_seed(0)
    return mlp(N_FEATURES, N_CLASSES, (256, 256), "tanh")


def default_folder() -> Path:
    """Where the ``scale-1m`` setup keeps its data outside a benchmark: ``$DIFFIN_SCALE_DATA``,
    else ``~/.cache/diffin/scale-1m``."""
    env = os.environ.get("DIFFIN_SCALE_DATA")
    return Path(env) if env else Path.home() / ".cache" / "diffin" / "scale-1m"


def load_split(folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32, n_train: int = 1_000_000,
               n_val: int = 2_000, seed: int = 0) -> Any:
    """The scale data as a :class:`~diffin.builtin.data.DataSplit` (generated first when the
    folder is not current). Training inputs and labels are tensors over copy-on-write mappings of
    the files (no copy in float32; another ``dtype`` casts, i.e. copies, the inputs); no test set."""
    from .data import DataSplit

    generate(folder, n_train, n_val, seed)
    f = Path(folder)

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(np.load(f / name, mmap_mode="c", allow_pickle=False))

    x_train, x_val = tensor("x_train.npy"), tensor("x_val.npy").to(dtype)
    if dtype != torch.float32:
        x_train = x_train.to(dtype)
    y_train = tensor("y_train.npy")
    return DataSplit("scale", x_train, y_train, x_val, tensor("y_val.npy").clone(), x_val[:0], y_train[:0],
                      N_CLASSES, (N_FEATURES,), y_train_clean=tensor("y_clean.npy"), flipped=np.load(f / "flipped.npy"))
