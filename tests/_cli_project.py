"""A user's project for the command-line tests: a model file, an .npz and a recorded run."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import diffin

MODELS = '''"""A user's model file, as a new user would write it."""
import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()


def explode():
    raise RuntimeError("boom in the user's factory")
'''


def ce(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(o, y, reduction="none")


def make_project(folder: Path, label_dtype: type = np.int64, momentum: float = 0.0,
                 test: bool = False) -> tuple[ModuleType, torch.Tensor, torch.Tensor]:
    """``folder/mymodels.py``, ``folder/data.npz`` (labels saved as ``label_dtype``) and a run
    recorded from a plain SGD loop (lr 0.1, batch 6, ``momentum``) in ``folder/run``; with ``test``
    also ``x_test``, ``y_test``. Returns the module and the training data (X, Y)."""
    (folder / "mymodels.py").write_text(MODELS, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("_user_models_for_test", folder / "mymodels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 3, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (24,), generator=g)
    arrays = {"x_train": X.numpy(), "y_train": Y.numpy().astype(label_dtype), "x_val": X[:6].numpy(),
              "y_val": Y[:6].numpy().astype(label_dtype)}
    if test:
        Xt = torch.randn(12, 3, generator=g, dtype=torch.float64)
        arrays.update(x_test=Xt.numpy(), y_test=torch.randint(0, 3, (12,), generator=g).numpy().astype(label_dtype))
    np.savez(folder / "data.npz", **arrays)
    model = mod.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    with diffin.Recorder(folder / "run", model, optimizer=opt, checkpoint_every=2) as rec:
        for s in range(0, 24, 6):
            opt.zero_grad()
            ce(model(X[s : s + 6]), Y[s : s + 6]).mean().backward()
            opt.step()
            rec.step(list(range(s, s + 6)))
    return mod, X, Y


@contextmanager
def inside(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run inside ``folder`` as the current folder; sys.path and the imported ``mymodels`` are
    restored afterwards (the CLI puts the current folder on sys.path and imports from it)."""
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("mymodels", None)
    try:
        yield folder
    finally:
        sys.modules.pop("mymodels", None)
