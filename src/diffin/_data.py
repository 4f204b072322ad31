"""Uniform access by id to training / target data given as tensors, arrays or a Dataset."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from ._errors import DataMismatchError, InvalidIdsError


class DataSource:
    """Rows of a dataset fetched by integer ids, cast to the model's dtype and device.

    Args:
        data: ``(inputs, targets)`` tensors or numpy arrays with a common first dimension, or a
            ``torch.utils.data.Dataset`` whose items are ``(input, target)``.
        dtype: floating inputs are cast to it (the model's dtype); integer inputs are left alone.
        device: where batches are placed.
        name: used in error messages ("train", "target").
    """

    def __init__(self, data: Any, dtype: torch.dtype, device: torch.device, name: str = "train"):
        self.name = name
        self.dtype = dtype
        self.device = device
        self._ds: Dataset | None = None
        if isinstance(data, Dataset) and not isinstance(data, (tuple, list)):
            self._ds = data
            try:
                self._n = len(data)  # type: ignore[arg-type]
            except TypeError as e:
                raise DataMismatchError(f"{name} Dataset must define __len__") from e
            self.x = self.y = None
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            self.x, self.y = (_as_tensor(a, f"{name} {w}") for a, w in zip(data, ("inputs", "targets")))
            if self.x.shape[0] != self.y.shape[0]:
                raise DataMismatchError(
                    f"{name} inputs have {self.x.shape[0]} rows but targets have {self.y.shape[0]}"
                )
            self._n = int(self.x.shape[0])
        else:
            raise DataMismatchError(
                f"{name} data must be an (inputs, targets) pair of tensors/arrays or a "
                f"torch.utils.data.Dataset, got {type(data).__name__}"
            )
        if self._n == 0:
            raise DataMismatchError(f"{name} data is empty")

    def __len__(self) -> int:
        return self._n

    def get(self, ids: np.ndarray | Tensor | list[int]) -> tuple[Tensor, Tensor]:
        """Inputs and targets of the rows ``ids`` (shape (B, ...) each)."""
        idx = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        if self._ds is not None:
            batch = default_collate([self._ds[int(i)] for i in idx])
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise DataMismatchError(
                    f"{self.name} Dataset items must be (input, target) pairs"
                )
            x, y = batch
        else:
            x, y = self.x[idx], self.y[idx]  # type: ignore[index]
        return self._place(x), y.to(self.device)

    def all(self) -> tuple[Tensor, Tensor]:
        return self.get(np.arange(self._n))

    def chunks(self, size: int) -> Iterator[tuple[np.ndarray, Tensor, Tensor]]:
        """Consecutive chunks ``(ids, x, y)`` covering every row once (tensor data: views)."""
        for start in range(0, self._n, size):
            stop = min(start + size, self._n)
            ids = np.arange(start, stop)
            if self._ds is None and self.x is not None and self.y is not None:
                yield ids, self._place(self.x[start:stop]), self.y[start:stop].to(self.device)
            else:
                x, y = self.get(ids)
                yield ids, x, y

    def _place(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            return x.to(device=self.device, dtype=self.dtype)
        return x.to(self.device)


def _as_tensor(a: Any, what: str) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach()
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a))
    raise DataMismatchError(f"{what} must be a tensor or numpy array, got {type(a).__name__}")


def fingerprint(data: Any) -> str:
    """A content hash (sha256 hex) of training or target data, for cache keys of saved results.

    ``(inputs, targets)`` tensors / arrays: every byte, with shapes and dtypes. A ``Dataset``:
    its length and the bytes of up to 64 items spread over it (hashing millions of items would
    cost a pass over the data; a changed dataset of the same length that differs only between
    the sampled items is not detected). ``None`` hashes to a fixed value.
    """
    h = hashlib.sha256()

    def add(a: Any) -> None:
        if isinstance(a, Tensor):
            a = a.detach().to("cpu").contiguous().numpy()
        if isinstance(a, np.ndarray):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(memoryview(a.reshape(-1)).cast("B"))
        elif isinstance(a, (tuple, list)):
            h.update(f"seq{len(a)}".encode())
            for item in a:
                add(item)
        elif isinstance(a, (int, float, str, bool, np.generic)) or a is None:
            h.update(repr(a).encode())
        else:
            raise DataMismatchError(f"cannot fingerprint data of type {type(a).__name__}")

    if isinstance(data, Dataset) and not isinstance(data, (tuple, list)):
        n = len(data)  # type: ignore[arg-type]
        h.update(f"dataset{type(data).__name__}{n}".encode())
        for i in sorted(set(np.linspace(0, max(n - 1, 0), num=min(n, 64)).astype(int).tolist())):
            add(data[i])
    else:
        add(data)
    return h.hexdigest()


def check_id_groups(groups: Sequence[Any], n: int, what: str = "group") -> list[np.ndarray]:
    """Validate groups of training ids: each a non-empty 1-D integer array inside [0, n).

    Returns them as int64 arrays of unique sorted ids. Raises :class:`InvalidIdsError` naming
    the first bad group and its out-of-range ids.
    """
    out = []
    for k, g in enumerate(groups):
        arr = np.asarray(g)
        if arr.size == 0:
            raise InvalidIdsError(f"{what} {k} is empty; every {what} needs at least one id")
        if arr.dtype.kind not in "iu":
            raise InvalidIdsError(f"{what} {k} holds non-integer ids (dtype {arr.dtype})")
        arr = np.unique(arr.astype(np.int64).reshape(-1))
        bad = arr[(arr < 0) | (arr >= n)]
        if bad.size:
            raise InvalidIdsError(
                f"{what} {k} holds ids outside [0, {n}): {bad[:5].tolist()}; ids are row numbers "
                "of the training data"
            )
        out.append(arr)
    return out
