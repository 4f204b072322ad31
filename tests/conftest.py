"""Shared fixtures of the test suite.

Tiny recorded runs (float64, built in well under a second) for the numerical and API tests; the
builders themselves live in ``tests/_tiny.py`` so test modules can also call them with options.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from _recording_loop import N_TRAIN
from _recording_loop import record as record_loop_run
from _tiny import Tiny, record


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    """Every test starts from the same global torch seed, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_run(tmp_path: Path) -> Tiny:
    """A tiny tanh MLP (4-6-3) trained by plain SGD for 2 epochs, ids recorded, in ``tmp_path``."""
    return record(tmp_path / "run")


@pytest.fixture
def record_tiny(tmp_path: Path) -> Callable[..., Tiny]:
    """``record_tiny(name="run", **options)`` → a tiny recorded run (options of ``_tiny.record``)."""

    def make(name: str = "run", **options: Any) -> Tiny:
        return record(tmp_path / name, **options)

    return make


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A closed recording of the recording tests' loop (``tests/_recording_loop.py``)."""
    record_loop_run(tmp_path / "run", n_train=N_TRAIN)
    return tmp_path / "run"
