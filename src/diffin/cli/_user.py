"""The user's own model, data and loss on the command line (``--model``, ``--data``, ``--loss``)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from .._data import open_memmap
from .._errors import ConfigError, DataMismatchError
from .._functional import LossFn

LOSSES: dict[str, LossFn] = {
    "cross_entropy": lambda o, y: torch.nn.functional.cross_entropy(o, y, reduction="none"),
    "mse": lambda o, y: ((o - y) ** 2).reshape(o.shape[0], -1).mean(dim=1),
}
MODEL_HELP = ("your model: module:function returning a fresh torch.nn.Module (the module is imported "
              "from the current folder or the Python path)")


def model_factory(spec: str) -> Callable[[], nn.Module]:
    """The function named by ``module:function``; the current folder comes first on ``sys.path``,
    so ``--model mymodels:build`` finds ``./mymodels.py`` as ``python -c`` would."""
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise ConfigError(f"--model must look like module:function (a function returning the model), got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        factory = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import --model {spec} ({type(e).__name__}: {e}); run diffin from the "
                          "folder that holds the module, or add its folder to PYTHONPATH") from e
    if not callable(factory):
        raise ConfigError(f"--model {spec}: {fn} is not a function")

    def build() -> nn.Module:
        model = factory()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    return build


def load_npz(path: str | os.PathLike[str]) -> dict[str, Tensor | np.ndarray]:
    """The arrays of an .npz (never unpickled), or of a folder of .npy files (:func:`load_folder`);
    needs ``x_train`` and ``y_train``."""
    if Path(path).is_dir():
        return load_folder(path)
    if not Path(path).is_file():
        raise DataMismatchError(f"--data {path} does not exist; pass an .npz file or a folder of .npy files")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: torch.from_numpy(np.ascontiguousarray(f[k])) for k in f.files}
    except (OSError, ValueError) as e:
        raise DataMismatchError(f"--data {path}: cannot read as .npz ({e})") from e
    missing = [k for k in ("x_train", "y_train") if k not in data]
    if missing:
        raise DataMismatchError(f"--data {path} lacks arrays {missing}; expected x_train, y_train, x_val, y_val")
    return data


def load_folder(path: str | os.PathLike[str]) -> dict[str, Tensor | np.ndarray]:
    """The ``.npy`` files of a folder, memory-mapped (data larger than memory): ``x_<part>.npy``
    stay read-only numpy memmaps, read by batch ids while scoring; every other array
    (``y_<part>``, ``flipped``) is a tensor over its copy-on-write mapping (no copy either).
    Needs ``x_train.npy`` and ``y_train.npy``; each ``x_<part>`` needs its ``y_<part>`` of as many rows."""
    folder = Path(path)
    names = sorted(p.stem for p in folder.glob("*.npy"))
    missing = [k for k in ("x_train", "y_train") if k not in names]
    if missing:
        raise DataMismatchError(f"--data {path} lacks {[k + '.npy' for k in missing]}; a data folder holds "
                                "x_train.npy, y_train.npy and optionally x_val.npy, y_val.npy (numpy.save)")
    data: dict[str, Tensor | np.ndarray] = {}
    for k in names:
        a = open_memmap(folder / f"{k}.npy")
        if k.startswith("x_"):
            data[k] = a
        else:
            try:
                data[k] = torch.from_numpy(np.load(folder / f"{k}.npy", mmap_mode="c", allow_pickle=False))
            except TypeError as e:
                raise DataMismatchError(f"--data {path}: {k}.npy has dtype {a.dtype}, which torch cannot "
                                        "hold; save it as a numeric array") from e
    for k in [n for n in names if n.startswith("x_")]:
        y = data.get("y_" + k[2:])
        if y is not None and len(y) != len(data[k]):
            raise DataMismatchError(f"--data {path}: {k}.npy has {len(data[k])} rows but y_{k[2:]}.npy has "
                                    f"{len(y)}; save one target per input row")
    return data


def targets_for_loss(y: Tensor, loss: str, name: str) -> Tensor:
    """Targets in the dtype ``loss`` needs: ``cross_entropy`` takes int64 class labels, so
    integer labels of any width (int32, uint8, ...) are cast; float class indices are refused
    with what to do (soft labels, shape (N, C), pass as they are)."""
    if loss != "cross_entropy":
        return y
    if not y.is_floating_point() and not y.is_complex():
        return y.long()
    if y.ndim == 1:
        raise DataMismatchError(
            f"{name} holds floats ({y.dtype}) but --loss cross_entropy needs integer class labels; save "
            f"them as integers (e.g. y.astype(np.int64)) or choose --loss mse"
        )
    return y


def split(
    data: dict[str, Tensor | np.ndarray], part: str, dtype: torch.dtype, loss: str
) -> tuple[Tensor | np.ndarray, Tensor] | None:
    """``(x_<part>, y_<part>)`` with floating inputs in the model's ``dtype`` and targets in what
    ``loss`` needs; ``None`` when the data lacks either array. Memory-mapped inputs (a data
    folder) stay as they are: diffin casts the rows it reads, never the whole array."""
    x, y = data.get(f"x_{part}"), data.get(f"y_{part}")
    if x is None or y is None:
        return None
    if isinstance(x, Tensor) and x.is_floating_point():
        x = x.to(dtype)
    return x, targets_for_loss(cast(Tensor, y), loss, f"y_{part}")  # every y_<part> is a tensor
