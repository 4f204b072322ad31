"""A seeded, deterministic trainer that records its run with :class:`diffin.Recorder`, and the
one evaluator of the package.

The trainer is the plain PyTorch loop a user would write (shuffled mini-batches, a mean loss,
``torch.optim.SGD`` / ``Adam`` / ``AdamW``, optionally the usual two parameter groups with weight
decay on weights only, ``torch.nn.utils.clip_grad_norm_`` and a cosine ``LambdaLR`` schedule), so
the benchmarks time and score exactly what users do. It can follow a recorded per-step
learning-rate schedule (``lrs=``), which is how the data-centric tasks retrain a user's run with
the recipe it was recorded with.
"""

from __future__ import annotations

import contextlib
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

from ... import _tree
from ..._errors import ConfigError
from ..._functional import BatchLoss
from ..._progress import progress_bar
from ...config import config_field
from ...recording import Recorder
from ...trajectory.clipping import clipped_fraction

LossFn = Callable[[Tensor, Tensor], Tensor]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
WEIGHT_DECAY_ON = ("all", "weights")


@dataclass
class TrainConfig:
    """Training hyper-parameters of the built-in trainer (``torch.optim.SGD``, ``Adam`` or ``AdamW``)."""

    epochs: int = config_field(5, "passes over the training set")
    batch_size: int = config_field(64, "samples per step")
    lr: float = config_field(0.1, "learning rate (the peak rate of the cosine schedule)")
    momentum: float = config_field(0.0, "SGD momentum")
    dampening: float = config_field(0.0, "SGD dampening of the momentum")
    nesterov: bool = config_field(False, "Nesterov momentum (SGD)")
    weight_decay: float = config_field(
        0.0, "weight decay: L2 added to the gradient (sgd, adam) or decoupled (adamw)")
    schedule: str = config_field("constant", "learning-rate schedule: 'constant' or 'cosine' (per step, "
                                 "a torch LambdaLR: lr·(1 + cos(π t / T)) / 2)", choices=SCHEDULES)
    checkpoint_every: int = config_field(50, "steps between checkpoints (0 = one per epoch)")
    seed: int = config_field(0, "seed of the initialisation and of the batch order")
    optimizer: str = config_field("sgd", "torch optimizer: 'sgd', 'adam' or 'adamw'", choices=OPTIMIZERS)
    beta1: float = config_field(0.9, "Adam/AdamW β1 (decay of the first moment)")
    beta2: float = config_field(0.999, "Adam/AdamW β2 (decay of the second moment)")
    eps: float = config_field(1e-8, "Adam/AdamW ε added to the square root of the second moment")
    weight_decay_on: str = config_field(
        "all", "parameters the weight decay applies to: 'all', or 'weights' (two param groups: matrices and "
        "kernels with decay, biases and norm scales (parameters of < 2 dims) without)", choices=WEIGHT_DECAY_ON)
    clip_grad_norm: float | None = config_field(
        None, "clip the gradient's L2 norm over all trainable parameters to this value before each step "
        "(torch.nn.utils.clip_grad_norm_); default: no clipping")

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be >= 1")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"lr must be finite and > 0, got {self.lr}")
        if not 0 <= self.momentum < 1 or not 0 <= self.dampening <= 1 or not self.weight_decay >= 0:
            raise ConfigError("need 0 <= momentum < 1, 0 <= dampening <= 1 and weight_decay >= 0")
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ConfigError("Nesterov momentum needs momentum > 0 and dampening 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer != "sgd" and (self.momentum or self.dampening or self.nesterov):
            raise ConfigError(f"momentum, dampening and nesterov are SGD's; {self.optimizer} has beta1 and "
                              "beta2 instead: set them (or optimizer='sgd')")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"need 0 <= beta1 < 1 and 0 <= beta2 < 1, got {self.beta1}, {self.beta2}")
        if not self.eps > 0 or not math.isfinite(self.eps):
            raise ConfigError(f"eps must be finite and > 0, got {self.eps}")
        if self.weight_decay_on not in WEIGHT_DECAY_ON:
            raise ConfigError(f"weight_decay_on must be 'all' or 'weights', got {self.weight_decay_on!r}")
        c = self.clip_grad_norm
        if c is not None and (not c > 0 or not math.isfinite(c)):
            raise ConfigError(f"clip_grad_norm must be None (no clipping) or a finite value > 0, got {c}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What :func:`train` did: the run folder, the loop's wall time (s), the number of steps, the
    last batch's loss, and with ``clip_grad_norm`` the share of steps whose gradient was clipped."""

    run_dir: str
    seconds: float
    steps: int
    train_loss: float
    clipped_fraction: float | None = None


def batch_order(n_ids: int, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Positions 0..n_ids−1 in shuffled mini-batches, epoch after epoch (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    out: list[np.ndarray] = []
    for _ in range(epochs):
        perm = torch.randperm(n_ids, generator=g).numpy()
        out += [perm[s : s + batch_size] for s in range(0, n_ids, batch_size)]
    return out


def cosine_factor(t: int, n_steps: int) -> float:
    """The cosine schedule's factor at step t of n_steps: (1 + cos(π t / n_steps)) / 2."""
    return 0.5 * (1.0 + math.cos(math.pi * t / n_steps))


def step_lrs(config: TrainConfig, n_steps: int, lrs: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """The learning rate of each of ``n_steps`` steps (float64, shape (n_steps,)).

    Without ``lrs``: ``config.lr``, constant or times :func:`cosine_factor` (what :func:`train`'s
    ``LambdaLR`` sets). With ``lrs`` (the per-step rates of a reference run of T steps): step t
    follows the reference at the same fraction of training, ``lrs[⌊t·T / n_steps⌋]`` — exactly
    ``lrs[t]`` when ``n_steps == T``.
    """
    t = np.arange(n_steps)
    if lrs is not None:
        ref = np.asarray(lrs, dtype=np.float64).reshape(-1)
        if ref.size == 0 or not np.all(np.isfinite(ref)) or np.any(ref < 0):
            raise ConfigError("lrs must be a non-empty list of finite, non-negative learning rates")
        return ref[(t * ref.size) // n_steps]
    if config.schedule == "cosine":
        return np.array([config.lr * cosine_factor(int(s), n_steps) for s in t], dtype=np.float64)
    return np.full(n_steps, float(config.lr))


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one holding every trainable parameter, or with
    ``weight_decay_on="weights"`` two (the usual AdamW recipe): parameters of ≥ 2 dimensions
    (weight matrices, conv kernels, embeddings) with ``config.weight_decay``, then those of < 2
    (biases, norm scales) with none. An empty group is left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    if config.weight_decay_on == "all":
        return [{"params": params, "weight_decay": config.weight_decay}]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The torch optimizer of ``config`` over ``model``'s trainable parameters at ``config.lr``."""
    groups = param_groups(model, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, dampening=config.dampening,
                               nesterov=config.nesterov)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)


def train(
    model: nn.Module,
    x: Any,
    y: Tensor,
    config: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    keep: np.ndarray | None = None,
    loss: str | LossFn | BatchLoss = "cross_entropy",
    lrs: Sequence[float] | np.ndarray | None = None,
    overwrite: bool = False,
    progress: bool = False,
    record: bool = True,
) -> TrainResult:
    """Train ``model`` in place on (x, y) as ``config`` says and record the run into ``run_dir``.

    Each step: mean loss of the batch, backward, ``clip_grad_norm_`` (when configured),
    ``optimizer.step()``, ``Recorder.step(ids)`` (which reads every group's learning rate from the
    optimizer), then the scheduler's step.

    ``x`` and ``y`` may be numpy arrays or memmaps (``diffin.memmap_arrays``): each step reads only
    its batch's rows. ``x`` may also be a tuple/list or a dict of tensors or arrays with one row per
    sample each (docs/method.md §4.7): the model is called as ``model(*batch)`` or
    ``model(**batch)``.

    Args:
        keep: train only on these ids (the recorded ids stay indices into x, y).
        loss: ``"cross_entropy"``, ``"mse"``, a per-sample loss ``loss(outputs, targets) -> (B,)``
            (averaged over each batch), or a batch-coupled loss :func:`diffin.batch_loss`
            (``fn(outputs, targets, ones(B))``, the batch's loss as it defines it; docs/method.md §4.7).
        lrs: follow these per-step learning rates (see :func:`step_lrs`; every group gets the
            step's rate) instead of ``config.lr`` / ``config.schedule``.
        record: ``False`` runs the same loop without a :class:`Recorder` (nothing is written to
            ``run_dir``): the reference the speed benchmarks divide by.
    """
    n_rows = _tree.batch_len(x)
    ids_all = np.arange(n_rows) if keep is None else np.asarray(keep, dtype=np.int64)
    if ids_all.size == 0:
        raise ConfigError("cannot train on an empty set of samples")
    order = batch_order(len(ids_all), config.batch_size, config.epochs, config.seed)
    total = len(order)
    rates = None if lrs is None else step_lrs(config, total, lrs)
    opt = build_optimizer(model, config)
    sched = None
    if rates is None and config.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine_factor(t, total))
    trainable = [p for p in model.parameters() if p.requires_grad]  # the optimizer's, in the model's order
    clip = config.clip_grad_norm
    norms: list[Tensor] = []
    steps_per_epoch = math.ceil(len(ids_all) / config.batch_size)
    every = config.checkpoint_every or steps_per_epoch
    crit = _batch_loss(loss)
    model.train()
    t0 = time.perf_counter()
    last = float("nan")
    recorder = (Recorder(run_dir, model, optimizer=opt, checkpoint_every=every, seed=config.seed,
                         n_train=n_rows, overwrite=overwrite, clip_grad_norm=clip)
                if record else contextlib.nullcontext())
    with recorder as rec, progress_bar(total, "train", progress) as bar:
        for t, pos in enumerate(order):
            if rates is not None:
                for g in opt.param_groups:
                    g["lr"] = float(rates[t])
            ids = torch.as_tensor(ids_all[pos])
            batch_loss = crit(_tree.call_model(model, None, _batch_rows(x, ids)), _rows(y, ids))
            opt.zero_grad()
            batch_loss.backward()
            if clip is not None:
                norms.append(torch.nn.utils.clip_grad_norm_(trainable, clip).detach())
            opt.step()
            if rec is not None:
                rec.step(ids)
            if sched is not None:
                sched.step()
            last = float(batch_loss.detach())
            bar.update(1)
    frac = clipped_fraction(torch.stack(norms).double(), clip) if clip is not None else None
    return TrainResult(str(run_dir), time.perf_counter() - t0, total, last, frac)


def _rows(a: Tensor | np.ndarray, ids: Tensor) -> Tensor:
    """Rows ``ids`` of a tensor, or of a numpy array or memmap (only those rows are read)."""
    return torch.from_numpy(np.asarray(a[ids.numpy()])) if isinstance(a, np.ndarray) else a[ids]


def _batch_rows(x: Any, ids: Tensor) -> Any:
    """Rows ``ids`` of every part of the inputs (a tensor/array, or a tuple/list/dict of them)."""
    return _tree.tree_map(lambda a: _rows(a, ids), x)


def _batch_loss(loss: str | LossFn | BatchLoss) -> Callable[[Any, Tensor], Tensor]:
    if isinstance(loss, BatchLoss):
        return lambda out, y: loss(out, y, torch.ones(y.shape[0], dtype=_out_dtype(out), device=y.device))
    if callable(loss):
        return lambda out, y: loss(out, y).mean()
    if loss == "cross_entropy":
        return nn.CrossEntropyLoss()
    if loss == "mse":
        return nn.MSELoss()
    raise ConfigError(f"loss must be 'cross_entropy', 'mse', a per-sample loss function or diffin.batch_loss(fn), "
                      f"got {loss!r}")


def _out_dtype(out: Any) -> torch.dtype:
    """The dtype of a model's (first floating) output: the batch-loss weights' dtype."""
    floats = [a for a in _tree.leaves(out) if isinstance(a, Tensor) and a.is_floating_point()]
    return floats[0].dtype if floats else torch.get_default_dtype()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Any,
    y: Tensor,
    loss_fn: LossFn | BatchLoss | None = None,
    params: Mapping[str, Tensor] | None = None,
    batch_size: int = 2048,
) -> dict[str, float]:
    """Mean loss and, for classifiers (2-D outputs, integer targets), accuracy of a model on (x, y).

    Args:
        model: the module; evaluated in eval mode (its mode is restored afterwards).
        x, y: inputs (N, ...) (or a tuple/list/dict of such parts, docs/method.md §4.7) and targets
            (N, ...); floating inputs are cast to the model's dtype.
        loss_fn: per-sample loss ``(outputs, targets) -> (B,)``, or a :func:`diffin.batch_loss`
            (then the loss of each chunk of ``batch_size`` rows as one batch, averaged over chunks
            by rows); default cross-entropy.
        params: evaluate at these parameter (and buffer) values by name instead of the module's
            own (``torch.func.functional_call``), e.g. a θ replayed from a recorded run.

    Returns:
        ``{"loss": mean loss (loss units), "accuracy": fraction correct (classifiers only)}``.
    """
    loss_fn = loss_fn or (lambda o, t: F.cross_entropy(o, t, reduction="none"))
    p0 = next(model.parameters())
    n = _tree.batch_len(x)
    was = model.training
    model.eval()
    try:
        outs, chunk_losses = [], []
        for s in range(0, n, batch_size):
            xb = _tree.place(_tree.index(x, slice(s, s + batch_size)), p0.dtype, p0.device)
            out = _tree.call_model(model, params, xb)
            if isinstance(loss_fn, BatchLoss):
                yb = y[s : s + batch_size]
                w = torch.ones(yb.shape[0], dtype=_out_dtype(out), device=yb.device)
                chunk_losses.append(float(loss_fn(out, yb, w)) * yb.shape[0])
            else:
                outs.append(out)
    finally:
        model.train(was)
    if isinstance(loss_fn, BatchLoss):
        return {"loss": sum(chunk_losses) / n}
    out = torch.cat(outs)
    res = {"loss": float(loss_fn(out, y).double().mean())}
    if out.ndim == 2 and not y.is_floating_point():
        res["accuracy"] = float((out.argmax(1) == y).double().mean())
    return res
