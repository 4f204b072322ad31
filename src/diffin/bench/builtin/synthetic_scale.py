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
is regenerated. It is a data folder for
``diffin score --data DIR --model diffin.bench.builtin.synthetic_scale:scale_model``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..._errors import ConfigError
from . import _ondisk

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


_TRAIN_FILES = ("x_train", "y_train", "flipped", "y_clean")
_VAL_FILES = ("x_val", "y_val")


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
    if _ondisk.is_current(out, META_JSON, meta, {**dict.fromkeys(_TRAIN_FILES, n_train),
                                                 **dict.fromkeys(_VAL_FILES, n_val)}):
        return False
    means = _means(seed)
    specs = {"x": (np.float32, (N_FEATURES,)), "y": (np.int64, ()), "flipped": (np.bool_, ()),
             "y_clean": (np.int64, ())}

    def part(stream: int, n: int, names: tuple[str, ...], noise: float) -> tuple[int, dict[str, Any], _ondisk.Rows]:
        def rows(start: int, stop: int) -> dict[str, np.ndarray]:
            return dict(zip(names, _rows(seed, stream, start, stop, noise, means)))

        return n, {name: spec for name, spec in zip(names, specs.values())}, rows

    parts = [part(_TRAIN, n_train, _TRAIN_FILES, NOISE), part(_VAL, n_val, _VAL_FILES, 0.0)]
    _ondisk.write(out, META_JSON, meta, parts, -(-chunk_rows // GRANULE) * GRANULE)
    return True


def scale_model() -> nn.Module:
    """The scale setup's model, MLP 64-256-256-10 tanh, float32, seeded (the
    ``--model diffin.bench.builtin.synthetic_scale:scale_model`` factory)."""
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
    """The scale data as a :class:`~diffin.bench.builtin.data.DataSplit` (generated first when the
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
