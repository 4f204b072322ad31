"""MNIST-5k with a visual shortcut, for debiasing (``diffin debias --setup mnist5k-spurious``).

The label is a property of the digit, ``y = 1`` for digits 5–9 and ``0`` for 0–4. A shortcut, a
faint square patch (``patch``×``patch`` pixels of ``value``) in the image's top-left corner (where
MNIST digits never reach), is added to some images: in the training set its presence agrees with
the label in ``agree`` (default 95%) of the samples, in the validation and test sets in 50%
(independent of the label). A model that learns "patch → 5–9" is right on 95% of its training
data and wrong on the two minority groups (a 0–4 digit with the patch, a 5–9 digit without) at
test time.

Groups: ``g = 2·y + s`` (attribute = label, shortcut s ∈ {0, 1}): 0 = (0–4, no patch),
1 = (0–4, patch), 2 = (5–9, no patch), 3 = (5–9, patch). Groups 1 and 2 are the minorities of
the training set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..._errors import ConfigError
from .data import DataSplit, load_mnist5k

GROUP_NAMES = ("0-4, no patch", "0-4, patch", "5-9, no patch", "5-9, patch")


@dataclass
class GroupedSplit(DataSplit):
    """A :class:`DataSplit` with a group label per sample of each part: (n,) int64 arrays."""

    groups_train: np.ndarray = field(default=None)  # type: ignore[assignment]
    groups_val: np.ndarray = field(default=None)  # type: ignore[assignment]
    groups_test: np.ndarray = field(default=None)  # type: ignore[assignment]
    group_names: tuple[str, ...] = GROUP_NAMES


def add_patch(x: Tensor, mask: np.ndarray, size: int = 2, value: float = 0.3, side: int = 28) -> Tensor:
    """A copy of flattened square images ``x`` (n, side²) with a ``size``×``size`` square of
    ``value`` in the top-left corner (rows and columns 1…size) of the rows where ``mask`` is True."""
    out = x.clone().reshape(x.shape[0], side, side)
    rows = torch.as_tensor(np.flatnonzero(mask), dtype=torch.long)
    out[rows, 1 : 1 + size, 1 : 1 + size] = value
    return out.reshape(x.shape[0], side * side)


def _shortcut(y: np.ndarray, agree: float, rng: np.random.Generator) -> np.ndarray:
    """Shortcut presence (n,) bool: equal to the label on exactly ``round(agree · n)`` samples,
    drawn at random (the disagreeing ones spread over both labels in proportion)."""
    n = len(y)
    s = y.astype(bool).copy()
    flip = rng.choice(n, size=n - int(round(agree * n)), replace=False)
    s[flip] = ~s[flip]
    return s


def load_mnist5k_spurious(n_train: int = 4000, n_val: int = 500, n_test: int = 500, agree: float = 0.95,
                          patch: int = 2, value: float = 0.3, seed: int = 0,
                          dtype: torch.dtype = torch.float32) -> GroupedSplit:
    """MNIST-5k split (seed 0, as :func:`load_mnist5k`), labels ``digit >= 5``, a ``patch``×``patch``
    square of ``value`` on the images as the module docstring says; ``agree``: the training set's
    label–shortcut agreement."""
    if not 0.5 <= agree <= 1:
        raise ConfigError(f"agree must be in [0.5, 1], got {agree}")
    base = load_mnist5k(n_train, n_val, n_test, seed=0, dtype=dtype)
    rng = np.random.default_rng(seed + 104729)
    parts = {}
    for name, x, digit, a in (("train", base.x_train, base.y_train, agree), ("val", base.x_val, base.y_val, 0.5),
                              ("test", base.x_test, base.y_test, 0.5)):
        y = (digit.numpy() >= 5).astype(np.int64)
        s = _shortcut(y, a, rng)
        parts[name] = (add_patch(x, s, patch, value), torch.as_tensor(y), 2 * y + s.astype(np.int64))
    (xt, yt, gt), (xv, yv, gv), (xs, ys, gs) = parts["train"], parts["val"], parts["test"]
    return GroupedSplit("mnist5k-spurious", xt, yt, xv, yv, xs, ys, 2, (784,), groups_train=gt, groups_val=gv,
                        groups_test=gs)
