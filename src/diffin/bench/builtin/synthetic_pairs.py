"""The fixed synthetic generator of the ``scale-1m-pairs`` setup: contrastive (CLIP-style) training
at the scale of a vision-language corpus, 1,000,000 pairs written once to disk as ``.npy`` files
and read memory-mapped, never held whole in memory (docs/method.md §4.7: the batch-coupled loss
path; the symmetric InfoNCE loss is :func:`diffin.bench.builtin.captions.clip_loss`).

**Data.** Each pair is two 64-dimensional *views* of one latent point: a latent class c (one of
:data:`N_CLASSES`, uniform) with mean u_c ~ N(0, I_16), the pair's latent u = u_c + τ·δ (δ ~ N(0, I_16),
shared by both views), and each view a fixed random linear map of u plus noise::

    view_a = A·u + σ·ε_a,     view_b = B·u + σ·ε_b,     A, B ~ N(0, 1/16) (64 × 16), ε ~ N(0, I_64)

:data:`MISMATCH` (10%) of the training pairs are *mismatched*: their second view is drawn from
another latent point of another class c' ≠ c (uniform among the others), as a caption of another
image would be. Validation pairs are all matched. Rows are drawn in granules of :data:`GRANULE` rows,
each from its own seeded generator, so a row depends only on the seed and its position: the file of
N rows is the first N rows of any larger one, whatever the chunk size used to write it.

The folder holds ``xa_train.npy``, ``xb_train.npy`` (float32, (N, 64)), ``y_train.npy`` (int64, the
pair's latent class, the class of view a: the targets, used for evaluation only; the loss ignores
them), ``yb_train.npy`` (int64, the class of view b: differs from ``y_train`` exactly where
mismatched), ``mismatched.npy`` (bool), ``xa_val.npy``, ``xb_val.npy``, ``y_val.npy`` and
``pairs_data.json`` (what was generated); a folder whose JSON matches is reused, anything else is
regenerated.

**Model** (:class:`PairTowers`): two MLP towers 64 → 256 → 64 (tanh), their outputs L2-normalised,
and a learned temperature (CLIP's ``logit_scale``, initialised to log(1/0.07)); ``forward(a, b)``
gives the (B, B) logits ``exp(logit_scale)·cos(a_i, b_j)``, the input of ``clip_loss``.

**Recipe** (:data:`PAIRS_TRAIN`, the ``scale-1m-pairs`` setup): float32, SGD lr :data:`LR`, batch 256, one
epoch, a checkpoint every 500 steps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..._errors import ConfigError
from . import _ondisk
from .data import DataSplit
from .models import mlp
from .trainer import TrainConfig

N_FEATURES = 64  # dimension of each view
N_LATENT = 16  # dimension of the latent point both views are made from
N_CLASSES = 100  # latent classes
JITTER = 0.5  # τ: spread of a pair's latent point around its class mean
NOISE = 2.5  # σ: per-view noise
MISMATCH = 0.1  # fraction of training pairs whose second view comes from another class
GRANULE = 1024  # rows per seeded generator: the unit of determinism
GENERATOR = "diffin-pairs-v1"
META_JSON = "pairs_data.json"
N_TRAIN = 1_000_000
N_VAL = 2_000
LR = 0.05  # SGD learning rate of the recipe
_TRAIN, _VAL, _TEST = 0, 1, 2  # streams of the seed sequence
TRAIN_FILES = ("xa_train", "xb_train", "y_train", "yb_train", "mismatched")
VAL_FILES = ("xa_val", "xb_val", "y_val")

PAIRS_TRAIN = TrainConfig(epochs=1, batch_size=256, lr=LR, checkpoint_every=500, seed=0)
"""The ``scale-1m-pairs`` training recipe: SGD, batch 256, one epoch, a checkpoint every 500 steps."""


def _maps(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class means (N_CLASSES, N_LATENT) and the two views' maps A, B (N_FEATURES, N_LATENT), float64."""
    rng = np.random.default_rng([seed, 2])
    means = rng.standard_normal((N_CLASSES, N_LATENT))
    a = rng.standard_normal((N_FEATURES, N_LATENT)) / math.sqrt(N_LATENT)
    b = rng.standard_normal((N_FEATURES, N_LATENT)) / math.sqrt(N_LATENT)
    return means, a, b


def _rows(seed: int, stream: int, start: int, stop: int, mismatch: float,
          maps: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows [start, stop) of a stream (``start`` a multiple of :data:`GRANULE`): ``xa``, ``xb``
    (n, 64) float32, ``y``, ``yb`` (n,) int64, ``mismatched`` (n,) bool. Every granule draws the
    same random arrays whatever ``mismatch`` is, so only the mismatched rows differ between rates."""
    means, a_map, b_map = maps
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("xa", "xb", "y", "yb", "mismatched")}
    for g in range(start // GRANULE, -(-stop // GRANULE)):
        lo, hi = g * GRANULE, min((g + 1) * GRANULE, stop)
        rng = np.random.default_rng([seed, stream, g])
        c = rng.integers(0, N_CLASSES, GRANULE)
        delta = rng.standard_normal((GRANULE, N_LATENT))
        eps_a = rng.standard_normal((GRANULE, N_FEATURES))
        eps_b = rng.standard_normal((GRANULE, N_FEATURES))
        mis = rng.random(GRANULE) < mismatch
        other = (c + rng.integers(1, N_CLASSES, GRANULE)) % N_CLASSES
        delta_other = rng.standard_normal((GRANULE, N_LATENT))
        cb = np.where(mis, other, c)
        u_a = means[c] + JITTER * delta
        u_b = np.where(mis[:, None], means[cb] + JITTER * delta_other, u_a)
        keep = slice(0, hi - lo)
        parts["xa"].append((u_a @ a_map.T + NOISE * eps_a)[keep].astype(np.float32))
        parts["xb"].append((u_b @ b_map.T + NOISE * eps_b)[keep].astype(np.float32))
        parts["y"].append(c[keep].astype(np.int64))
        parts["yb"].append(cb[keep].astype(np.int64))
        parts["mismatched"].append(mis[keep])
    return {k: np.concatenate(v) for k, v in parts.items()}


def test_pairs(n: int = 5_000, seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """``n`` clean held-out pairs of the generator of ``seed`` (their own stream, never written to disk,
    disjoint from training and validation): ``((view_a (n, 64), view_b (n, 64)) float32, classes (n,)
    int64)``, for evaluating models retrained on a selection of the training pairs."""
    r = _rows(seed, _TEST, 0, n, 0.0, _maps(seed))
    return (r["xa"], r["xb"]), r["y"]


def pairs_meta(n_train: int, n_val: int, seed: int) -> dict[str, Any]:
    """What identifies a generated folder (the content of ``pairs_data.json``)."""
    return {"generator": GENERATOR, "n_train": int(n_train), "n_val": int(n_val), "n_features": N_FEATURES,
            "n_latent": N_LATENT, "n_classes": N_CLASSES, "jitter": JITTER, "noise": NOISE, "mismatch": MISMATCH,
            "seed": int(seed)}


def generate(folder: str | os.PathLike[str], n_train: int = N_TRAIN, n_val: int = N_VAL, seed: int = 0,
             chunk_rows: int = 65_536) -> bool:
    """Write the pairs into ``folder`` unless it already holds these rows.

    Args:
        folder: created if missing.
        n_train, n_val: pairs of the training and validation sets.
        seed: seed of the class means, the views' maps, the rows and the mismatched pairs.
        chunk_rows: rows held in memory at once while writing (rounded up to :data:`GRANULE`);
            the files do not depend on it.

    Returns ``True`` when the files were (re)generated, ``False`` when reused. Each file is written
    under a temporary name and renamed; ``pairs_data.json`` is written last. On disk: 2 × N × 64 × 4
    bytes of views plus 17 bytes per pair (512 MiB + 17 MB at N = 1,000,000).
    """
    if n_train < 1 or n_val < 1 or chunk_rows < 1:
        raise ConfigError(f"n_train, n_val and chunk_rows must be >= 1, got {n_train}, {n_val}, {chunk_rows}")
    out = Path(folder)
    meta = pairs_meta(n_train, n_val, seed)
    if _ondisk.is_current(out, META_JSON, meta, {**dict.fromkeys(TRAIN_FILES, n_train),
                                                 **dict.fromkeys(VAL_FILES, n_val)}):
        return False
    maps = _maps(seed)
    specs = {"xa": (np.float32, (N_FEATURES,)), "xb": (np.float32, (N_FEATURES,)), "y": (np.int64, ()),
             "yb": (np.int64, ()), "mismatched": (np.bool_, ())}

    def part(stream: int, n: int, names: tuple[str, ...], rate: float) -> tuple[int, dict[str, Any], _ondisk.Rows]:
        keys = tuple(specs)[: len(names)]

        def rows(start: int, stop: int) -> dict[str, np.ndarray]:
            r = _rows(seed, stream, start, stop, rate, maps)
            return {name: r[k] for k, name in zip(keys, names)}

        return n, {name: specs[k] for k, name in zip(keys, names)}, rows

    parts = [part(_TRAIN, n_train, TRAIN_FILES, MISMATCH), part(_VAL, n_val, VAL_FILES, 0.0)]
    _ondisk.write(out, META_JSON, meta, parts, -(-chunk_rows // GRANULE) * GRANULE)
    return True


def memmap_pairs(folder: str | os.PathLike[str], part: str = "train",
                 writable_view: bool = False) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """``((view_a (N, 64) float32, view_b (N, 64) float32), latent class (N,) int64)`` of ``part``
    (``"train"`` or ``"val"``), memory-mapped read-only (``writable_view``: copy-on-write, for
    ``torch.from_numpy``, which wants writable arrays); the ``train=`` / ``target=`` of diffin."""
    f = Path(folder)
    mode = "c" if writable_view else "r"

    def load(name: str) -> np.ndarray:
        return np.load(f / f"{name}_{part}.npy", mmap_mode=mode, allow_pickle=False)

    return (load("xa"), load("xb")), load("y")


class PairTowers(nn.Module):
    """Two MLP towers into a shared ``dim``-dimensional space with a learned temperature (CLIP).

    * tower a: ``n_in → hidden… → dim`` (tanh between layers), tower b the same, separate weights;
    * both outputs L2-normalised;
    * ``logit_scale``: a scalar, initialised to log(1/0.07); logits use ``exp(logit_scale)``
      (clamped at 100 as in CLIP).
    """

    def __init__(self, n_in: int = N_FEATURES, hidden: tuple[int, ...] = (256,), dim: int = 64) -> None:
        super().__init__()
        self.tower_a = mlp(n_in, dim, hidden, "tanh")
        self.tower_b = mlp(n_in, dim, hidden, "tanh")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, a: Tensor, b: Tensor, embed: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Logits (B_a, B_b) = exp(logit_scale)·cos(tower_a(a_i), tower_b(b_j)) of views a (B_a, 64) and
        b (B_b, 64); with ``embed``: the unit embeddings and the scale ``(ea (B_a, dim), eb (B_b, dim),
        scale ())`` (the interface of :func:`diffin.bench.builtin.captions.clip_scores`)."""
        ea, eb = self.tower_a(a), self.tower_b(b)
        ea = ea / ea.norm(dim=-1, keepdim=True)
        eb = eb / eb.norm(dim=-1, keepdim=True)
        scale = self.logit_scale.exp().clamp(max=100.0)
        if embed:
            return ea, eb, scale
        return scale * ea @ eb.T


def pairs_model() -> nn.Module:
    """The setup's model, :class:`PairTowers` 64-256-64 per tower, float32, seeded (a
    ``--model diffin.bench.builtin.synthetic_pairs:pairs_model`` factory)."""
    torch.manual_seed(0)
    return PairTowers()


@dataclass
class PairSplit(DataSplit):
    """A :class:`DataSplit` of pairs: ``x_*`` are tuples ``(view_a (N, 64), view_b (N, 64))``, ``y_*``
    the latent classes (evaluation only); ``flipped`` marks the mismatched training pairs."""

    @property
    def n_train(self) -> int:
        return int(self.x_train[0].shape[0])

    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": int(self.x_val[0].shape[0]), "test": int(self.x_test[0].shape[0])}


def default_folder() -> Path:
    """Where the setup keeps its data outside a benchmark: ``$DIFFIN_PAIRS_DATA``, else
    ``~/.cache/diffin/scale-1m-pairs``."""
    env = os.environ.get("DIFFIN_PAIRS_DATA")
    return Path(env) if env else Path.home() / ".cache" / "diffin" / "scale-1m-pairs"


def load_split(folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32, n_train: int = N_TRAIN,
               n_val: int = N_VAL, seed: int = 0) -> PairSplit:
    """The pairs as a :class:`PairSplit` (generated first when the folder is not current). Training
    views and classes are tensors over copy-on-write mappings of the files (no copy in float32;
    another ``dtype`` casts, i.e. copies, the views); validation in memory; no test set."""
    generate(folder, n_train, n_val, seed)
    f = Path(folder)
    (xa, xb), y = memmap_pairs(f, "train", writable_view=True)
    (va, vb), yv = memmap_pairs(f, "val")
    xa_t, xb_t = torch.from_numpy(xa), torch.from_numpy(xb)
    if dtype != torch.float32:
        xa_t, xb_t = xa_t.to(dtype), xb_t.to(dtype)
    va_t, vb_t = torch.from_numpy(np.array(va)).to(dtype), torch.from_numpy(np.array(vb)).to(dtype)
    y_t = torch.from_numpy(y)
    return PairSplit("scale-pairs", (xa_t, xb_t), y_t, (va_t, vb_t), torch.from_numpy(np.array(yv)),
                     (va_t[:0], vb_t[:0]), y_t[:0], N_CLASSES, (N_FEATURES,),
                     y_train_clean=torch.from_numpy(np.load(f / "yb_train.npy", mmap_mode="c")),
                     flipped=np.load(f / "mismatched.npy"))
