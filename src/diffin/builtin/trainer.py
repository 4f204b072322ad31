"""A seeded, deterministic trainer that records its run with :class:`diffin.Recorder`.

It is the plain PyTorch loop a user would write (shuffled mini-batches, ``torch.optim.SGD``, a
mean loss), so the benchmarks time and score exactly what users do.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._errors import ConfigError
from ..recording import Recorder


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Training hyper-parameters of the built-in trainer."""

    epochs: int = _f(5, "passes over the training set")
    batch_size: int = _f(64, "samples per step")
    lr: float = _f(0.1, "SGD learning rate")
    momentum: float = _f(0.0, "SGD momentum")
    nesterov: bool = _f(False, "Nesterov momentum")
    weight_decay: float = _f(0.0, "L2 weight decay (SGD's weight_decay)")
    schedule: str = _f("constant", "learning-rate schedule: 'constant' or 'cosine' (per step)")
    checkpoint_every: int = _f(50, "steps between checkpoints (0 = one per epoch)")
    seed: int = _f(0, "seed of the initialisation and of the batch order")

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every must be >= 0")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    run_dir: str
    seconds: float
    steps: int
    train_loss: float


def batch_order(n_ids: int, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Positions 0..n_ids−1 in shuffled mini-batches, epoch after epoch (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    out: list[np.ndarray] = []
    for _ in range(epochs):
        perm = torch.randperm(n_ids, generator=g).numpy()
        out += [perm[s : s + batch_size] for s in range(0, n_ids, batch_size)]
    return out


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    keep: np.ndarray | None = None,
    loss: str = "cross_entropy",
    overwrite: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Train ``model`` in place on (x, y) with SGD and record the run into ``run_dir``.

    Args:
        keep: train only on these ids (the recorded ids stay indices into x, y).
        loss: ``"cross_entropy"`` (classification) or ``"mse"``.
    """
    ids_all = np.arange(x.shape[0]) if keep is None else np.asarray(keep, dtype=np.int64)
    if ids_all.size == 0:
        raise ConfigError("cannot train on an empty set of samples")
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          nesterov=config.nesterov, weight_decay=config.weight_decay)
    order = batch_order(len(ids_all), config.batch_size, config.epochs, config.seed)
    total = len(order)
    steps_per_epoch = math.ceil(len(ids_all) / config.batch_size)
    every = config.checkpoint_every or steps_per_epoch
    crit = nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss()
    model.train()
    t0 = time.perf_counter()
    last = float("nan")
    with Recorder(run_dir, model, optimizer=opt, checkpoint_every=every, seed=config.seed,
                  n_train=int(x.shape[0]), overwrite=overwrite) as rec:
        for t, pos in enumerate(tqdm(order, desc="train", disable=not progress, leave=False)):
            if config.schedule == "cosine":
                for g in opt.param_groups:
                    g["lr"] = 0.5 * config.lr * (1 + math.cos(math.pi * t / total))
            ids = torch.as_tensor(ids_all[pos])
            out = model(x[ids])
            batch_loss = crit(out, y[ids])
            opt.zero_grad()
            batch_loss.backward()
            opt.step()
            rec.step(ids, lr=opt.param_groups[0]["lr"])
            last = float(batch_loss.detach())
    return TrainResult(str(run_dir), time.perf_counter() - t0, total, last)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Accuracy and mean cross-entropy of a classifier on (x, y)."""
    was = model.training
    model.eval()
    out = torch.cat([model(x[s : s + 1024]) for s in range(0, x.shape[0], 1024)])
    model.train(was)
    return {
        "accuracy": float((out.argmax(1) == y).double().mean()),
        "loss": float(F.cross_entropy(out, y)),
    }
