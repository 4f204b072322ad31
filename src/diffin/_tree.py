"""Model inputs that are not one tensor: a tensor, a tuple/list or a dict of tensors (docs/method.md
§4.7, "Inputs").

diffin passes a batch's inputs to the model exactly as they were given or collated:

* a tensor ``x``                      → ``model(x)``
* a tuple or list ``(a, b, ...)``     → ``model(a, b, ...)``
* a dict ``{"image": a, "text": b}``  → ``model(image=a, text=b)``

Every leaf has the batch as its first dimension. Floating leaves are cast to the model's dtype and
moved to its device; integer leaves (token ids, masks) are only moved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._errors import DataMismatchError

Inputs = Any  # Tensor | tuple[Tensor, ...] | list[Tensor] | dict[str, Tensor] (leaves may be numpy arrays)


def is_leaf(x: Any) -> bool:
    return not isinstance(x, (tuple, list, Mapping))


def tree_map(fn: Callable[[Any], Any], x: Inputs) -> Inputs:
    """``fn`` applied to every leaf, keeping the structure (a tuple stays a tuple, a dict a dict)."""
    if isinstance(x, Mapping):
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(tree_map(fn, v) for v in x) if type(x) in (tuple, list) else [tree_map(fn, v) for v in x]
    return fn(x)


def leaves(x: Inputs) -> list[Any]:
    """The leaves in a fixed order (dict keys in insertion order)."""
    if isinstance(x, Mapping):
        return [leaf for v in x.values() for leaf in leaves(v)]
    if isinstance(x, (tuple, list)):
        return [leaf for v in x for leaf in leaves(v)]
    return [x]


def batch_len(x: Inputs) -> int:
    """B, the common first dimension of every leaf (raises :class:`DataMismatchError` if they differ)."""
    sizes = {int(leaf.shape[0]) for leaf in leaves(x) if hasattr(leaf, "shape") and len(leaf.shape) > 0}
    if len(sizes) != 1:
        raise DataMismatchError(
            f"the parts of the inputs must share their first (batch) dimension, got sizes {sorted(sizes)}; "
            "give a tensor, or a tuple/list/dict of tensors with one row per sample each"
        )
    return sizes.pop()


def index(x: Inputs, idx: Tensor | np.ndarray | slice) -> Inputs:
    """Rows ``idx`` of every leaf."""
    return tree_map(lambda a: a[idx], x)


def stack(xs: Sequence[Inputs]) -> Inputs:
    """K batches of one structure → one batch whose leaves have a new first dimension K."""
    first = xs[0]
    if isinstance(first, Mapping):
        return {k: stack([x[k] for x in xs]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(stack([x[i] for x in xs]) for i in range(len(first)))
    return torch.stack(list(xs))


def nbytes(x: Inputs) -> int:
    """Bytes held by the tensor leaves."""
    return sum(a.numel() * a.element_size() for a in leaves(x) if isinstance(a, Tensor))


def place(x: Inputs, dtype: torch.dtype, device: torch.device | str) -> Inputs:
    """Floating leaves cast to ``dtype`` and moved to ``device``; other leaves only moved."""

    def one(a: Any) -> Any:
        if not isinstance(a, Tensor):
            return a
        if a.is_floating_point():
            return a.to(device=device, dtype=dtype)
        return a.to(device)

    return tree_map(one, x)


def cuda_device(x: Inputs) -> torch.device | None:
    """The CUDA device of the first tensor leaf of ``x`` (None when it is not on a CUDA device)."""
    first = next((a for a in leaves(x) if isinstance(a, Tensor)), None)
    return first.device if first is not None and first.device.type == "cuda" else None


def to_device(x: Inputs, device: torch.device | str) -> Inputs:
    """Every tensor leaf of ``x`` (a batch, or a {name: tensor} dict) moved to ``device``, dtypes kept."""
    return tree_map(lambda a: a.to(device) if isinstance(a, Tensor) else a, x)


def call_model(model: nn.Module, params: Mapping[str, Tensor] | None, x: Inputs) -> Any:
    """The model on a batch by the convention above; with ``params`` through ``functional_call``."""
    if isinstance(x, Mapping):
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = dict(x)
    elif isinstance(x, (tuple, list)):
        args, kwargs = tuple(x), {}
    else:
        args, kwargs = (x,), {}
    if params is None:
        return model(*args, **kwargs)
    with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no forward-mode / double-backward rule
        return functional_call(model, dict(params), args, kwargs)


def input_shape(inputs: Any) -> tuple[int, int]:
    """(rows, sequence length) of a forward's inputs: the first dimension of its first tensor of at
    least one dimension, and the largest second dimension of its tensors (0 when all are 1-D)."""
    tensors = [a for a in leaves(inputs) if isinstance(a, torch.Tensor) and a.ndim >= 1]
    if not tensors:
        return 0, 0
    return int(tensors[0].shape[0]), max((int(a.shape[1]) for a in tensors if a.ndim >= 2), default=0)


def describe(x: Inputs) -> str:
    """Shapes and dtypes of the leaves, for error messages."""
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__}(" + ", ".join(describe(v) for v in x) + ")"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    return type(x).__name__
