"""Uniform access by id to training / target data given as tensors, arrays or a Dataset."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from ._errors import DataMismatchError


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
