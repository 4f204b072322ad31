"""A seeded, deterministic trainer that records its run with :class:`diffin.Recorder`, and the
one evaluator of the package.

The trainer is the plain PyTorch loop a user would write (shuffled mini-batches,
``torch.optim.SGD``, a mean loss), so the benchmarks time and score exactly what users do. It can
follow a recorded per-step learning-rate schedule (``lrs=``), which is how the data-centric tasks
retrain a user's run with the recipe it was recorded with.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import ConfigError
from .._progress import progress_bar
from ..config import config_field
from ..recording import Recorder

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TrainConfig:
    """Training hyper-parameters of the built-in trainer (``torch.optim.SGD``)."""

    epochs: int = config_field(5, "passes over the training set")
    batch_size: int = config_field(64, "samples per step")
    lr: float = config_field(0.1, "SGD learning rate")
    momentum: float = config_field(0.0, "SGD momentum")
    dampening: float = config_field(0.0, "SGD dampening of the momentum")
    nesterov: bool = config_field(False, "Nesterov momentum")
    weight_decay: float = config_field(0.0, "L2 weight decay (SGD's weight_decay)")
    schedule: str = config_field("constant", "learning-rate schedule: 'constant' or 'cosine' (per step)")
    checkpoint_every: int = config_field(50, "steps between checkpoints (0 = one per epoch)")
    seed: int = config_field(0, "seed of the initialisation and of the batch order")

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1 or not 0 <= self.dampening <= 1 or self.weight_decay < 0:
            raise ConfigError("need 0 <= momentum < 1, 0 <= dampening <= 1 and weight_decay >= 0")
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ConfigError("Nesterov momentum needs momentum > 0 and dampening 0")
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


def step_lrs(config: TrainConfig, n_steps: int, lrs: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """The learning rate of each of ``n_steps`` steps (float64, shape (n_steps,)).

    Without ``lrs``: ``config.lr``, constant or cosine-annealed per step. With ``lrs`` (the
    per-step rates of a reference run of T steps): step t follows the reference at the same
    fraction of training, ``lrs[⌊t·T / n_steps⌋]`` — exactly ``lrs[t]`` when ``n_steps == T``.
    """
    t = np.arange(n_steps)
    if lrs is not None:
        ref = np.asarray(lrs, dtype=np.float64).reshape(-1)
        if ref.size == 0 or not np.all(np.isfinite(ref)) or np.any(ref < 0):
            raise ConfigError("lrs must be a non-empty list of finite, non-negative learning rates")
        return ref[(t * ref.size) // n_steps]
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1 + np.cos(np.pi * t / n_steps))
    return np.full(n_steps, float(config.lr))


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    keep: np.ndarray | None = None,
    loss: str | LossFn = "cross_entropy",
    lrs: Sequence[float] | np.ndarray | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Train ``model`` in place on (x, y) with SGD and record the run into ``run_dir``.

    Args:
        keep: train only on these ids (the recorded ids stay indices into x, y).
        loss: ``"cross_entropy"``, ``"mse"``, or a per-sample loss ``loss(outputs, targets) -> (B,)``
            (averaged over each batch).
        lrs: follow these per-step learning rates (see :func:`step_lrs`) instead of
            ``config.lr`` / ``config.schedule``.
    """
    ids_all = np.arange(x.shape[0]) if keep is None else np.asarray(keep, dtype=np.int64)
    if ids_all.size == 0:
        raise ConfigError("cannot train on an empty set of samples")
    order = batch_order(len(ids_all), config.batch_size, config.epochs, config.seed)
    total = len(order)
    rates = step_lrs(config, total, lrs)
    opt = torch.optim.SGD(model.parameters(), lr=float(rates[0]), momentum=config.momentum,
                          dampening=config.dampening, nesterov=config.nesterov,
                          weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(ids_all) / config.batch_size)
    every = config.checkpoint_every or steps_per_epoch
    crit = _batch_loss(loss)
    model.train()
    t0 = time.perf_counter()
    last = float("nan")
    with Recorder(run_dir, model, optimizer=opt, checkpoint_every=every, seed=config.seed,
                  n_train=int(x.shape[0]), overwrite=overwrite) as rec, \
            progress_bar(total, "train", progress) as bar:
        for t, pos in enumerate(order):
            for g in opt.param_groups:
                g["lr"] = float(rates[t])
            ids = torch.as_tensor(ids_all[pos])
            batch_loss = crit(model(x[ids]), y[ids])
            opt.zero_grad()
            batch_loss.backward()
            opt.step()
            rec.step(ids, lr=opt.param_groups[0]["lr"])
            last = float(batch_loss.detach())
            bar.update(1)
    return TrainResult(str(run_dir), time.perf_counter() - t0, total, last)


def _batch_loss(loss: str | LossFn) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(loss):
        return lambda out, y: loss(out, y).mean()
    if loss == "cross_entropy":
        return nn.CrossEntropyLoss()
    if loss == "mse":
        return nn.MSELoss()
    raise ConfigError(f"loss must be 'cross_entropy', 'mse' or a per-sample loss function, got {loss!r}")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn | None = None,
    params: Mapping[str, Tensor] | None = None,
    batch_size: int = 2048,
) -> dict[str, float]:
    """Mean loss and, for classifiers (2-D outputs, integer targets), accuracy of a model on (x, y).

    Args:
        model: the module; evaluated in eval mode (its mode is restored afterwards).
        x, y: inputs (N, ...) and targets (N, ...); floating inputs are cast to the model's dtype.
        loss_fn: per-sample loss ``(outputs, targets) -> (B,)``; default cross-entropy.
        params: evaluate at these parameter (and buffer) values by name instead of the module's
            own (``torch.func.functional_call``), e.g. a θ replayed from a recorded run.

    Returns:
        ``{"loss": mean loss (loss units), "accuracy": fraction correct (classifiers only)}``.
    """
    from torch.func import functional_call

    loss_fn = loss_fn or (lambda o, t: F.cross_entropy(o, t, reduction="none"))
    dtype = next(model.parameters()).dtype
    was = model.training
    model.eval()
    try:
        outs = []
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size]
            xb = xb.to(dtype) if xb.is_floating_point() else xb
            outs.append(model(xb) if params is None else functional_call(model, dict(params), (xb,)))
    finally:
        model.train(was)
    out = torch.cat(outs)
    res = {"loss": float(loss_fn(out, y).double().mean())}
    if out.ndim == 2 and not y.is_floating_point():
        res["accuracy"] = float((out.argmax(1) == y).double().mean())
    return res
