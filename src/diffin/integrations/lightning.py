"""Record a ``lightning.Trainer`` run with one callback.

    from diffin.integrations.lightning import DiffinCallback
    trainer = lightning.Trainer(max_epochs=3, gradient_clip_val=1.0, accumulate_grad_batches=2,
                                callbacks=[DiffinCallback("runs/x", checkpoint_every=50)])
    trainer.fit(module, train_loader)
    scores = diffin.influence("runs/x", module, loss_fn, train=dataset, target=(Xv, Yv))

The callback translates the Trainer's objects into :class:`diffin.Recorder`'s plain calls and holds
no math: it builds the recorder at ``on_train_start`` on the LightningModule (or the submodule
named by ``module=``) and the Trainer's one optimizer (unwrapped from ``LightningOptimizer``), with
``gradient_clip_val`` as ``clip_grad_norm``; it reads each optimizer step's sample ids from the
batch or from the DataLoader's sampler and calls ``Recorder.step`` once after each optimizer step
(one per ``accumulate_grad_batches`` micro-batches). Learning-rate schedulers need nothing: the
recorder reads every group's rate at each ``optimizer.step()``. Manual optimization works the same
way (``self.optimizers().step()`` inside ``training_step``); a loop that clips by hand passes the
threshold as ``clip_grad_norm=``.

This module is the only one in diffin that imports ``lightning``.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .._data import WithIds
from .._errors import RecordingError, UnsupportedOptimizerError
from .._optional import require
from ..recording import Recorder

_pl = require("lightning.pytorch", "lightning", "diffin.integrations.lightning", extra="lightning")

IdsFrom = str | Callable[[Any], Any]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside a wrapper, following ``.optimizer`` while it holds one
    (Lightning's ``LightningOptimizer`` is a subclass of the optimizer it wraps and shares its
    state, so only its ``.optimizer`` is the object whose ``step`` runs the update)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UnsupportedOptimizerError(
            f"{type(optimizer).__name__} is not a torch.optim.Optimizer and holds none as .optimizer; "
            "diffin records torch optimizers (SGD, Adam, AdamW, ...)"
        )
    return optimizer


class _SamplerTap:
    """Stands in for a DataLoader's sampler: yields its indices unchanged and keeps those of each
    pass (epoch) in a queue of its own, from which the callback takes each batch's ids."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.passes: deque[deque[int]] = deque()

    def __iter__(self) -> Iterator[int]:
        taken: deque[int] = deque()
        self.passes.append(taken)
        for i in self.sampler:
            taken.append(int(i))
            yield i

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name: str) -> Any:  # set_epoch, generator, ... of the wrapped sampler
        return getattr(self.sampler, name)

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` indices of the current pass."""
        if not self.passes or len(self.passes[0]) < n:
            have = len(self.passes[0]) if self.passes else 0
            raise RecordingError(
                f"DiffinCallback: a batch of {n} samples arrived but the sampler gave only {have} indices "
                "since the last batch: the DataLoader drew this batch before the callback could see its "
                "sampler (worker processes prefetch at the start of training), or its batch_sampler does "
                "not draw from .sampler. Let the batch carry the ids instead: train on "
                "diffin.with_ids(dataset) (batches (ids, x, y)) or pass ids=callable(batch) -> ids"
            )
        q = self.passes[0]
        return np.array([q.popleft() for _ in range(n)], dtype=np.int64)

    def end_pass(self) -> None:
        if self.passes:
            self.passes.popleft()


class DiffinCallback(_pl.Callback):
    """A Lightning callback that records the training run into ``run_dir`` for diffin.

    Args:
        run_dir: the run folder (as for :class:`diffin.Recorder`).
        checkpoint_every: save θ and the optimizer state every this many optimizer steps.
        ids: where each batch's sample ids come from. ``"auto"`` (default): from the batch when the
            DataLoader's dataset is a :func:`diffin.with_ids` one (batches ``(ids, x, y)``), else
            from its sampler; ``"batch"``: the batch's first element; ``"sampler"``: the indices the
            DataLoader's sampler drew for the batch (its batch sampler must draw from ``.sampler``;
            use ``num_workers=0`` or ids in the batch, since worker processes draw the first batches
            before training starts); or a callable ``batch -> ids`` (a 1-D integer tensor / array).
            Ids index the dataset passed as ``train=`` when scoring.
        module: dotted attribute path of the submodule to record (e.g. ``"model"`` for a
            LightningModule that trains ``self.model``); default: the LightningModule itself. The
            recorded module is the model given to ``diffin.influence`` later, and the one the step's
            training forward must call (``self(x)`` / ``self.model(x)``) when it has dropout.
        clip_grad_norm: under manual optimization, the ``max_norm`` the ``training_step`` passes to
            ``self.clip_gradients(opt, gradient_clip_val=..., gradient_clip_algorithm="norm")``.
            Under automatic optimization leave it out: ``Trainer(gradient_clip_val=...)`` is read.
        seed: the training seed, stored for reference.
        n_train: size of the training set (default: ``len`` of the DataLoader's dataset).
        overwrite: replace an existing recording in ``run_dir``.

    Refused at ``on_train_start`` with a named error (:class:`~diffin._errors.RecordingError`,
    :class:`~diffin._errors.UnsupportedOptimizerError`): several optimizers, several processes
    (DDP / FSDP / DeepSpeed: each rank sees part of a batch), ``16-mixed`` precision (its gradient
    scaler skips steps whose gradients overflow), ``gradient_clip_algorithm="value"``. Refused at
    the step it happens: an accumulation window with fewer micro-batches than
    ``accumulate_grad_batches`` (Lightning divides each micro-batch's loss by
    ``accumulate_grad_batches`` even in the last, shorter window of an epoch: make the number of
    batches per epoch a multiple of it), or micro-batches of different sizes in one step (use
    ``drop_last=True``).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        checkpoint_every: int = 50,
        *,
        ids: IdsFrom = "auto",
        module: str | None = None,
        clip_grad_norm: float | None = None,
        seed: int | None = None,
        n_train: int | None = None,
        overwrite: bool = False,
    ) -> None:
        if not callable(ids) and ids not in ("auto", "batch", "sampler"):
            raise RecordingError(f"ids must be 'auto', 'batch', 'sampler' or a callable batch -> ids, got {ids!r}")
        self.run_dir = run_dir
        self.checkpoint_every = checkpoint_every
        self.ids = ids
        self.module = module
        self.clip_grad_norm = clip_grad_norm
        self.seed = seed
        self.n_train = n_train
        self.overwrite = overwrite
        self.recorder: Recorder | None = None
        self._tap: _SamplerTap | None = None
        self._ids_from: Callable[[Any], np.ndarray] | None = None
        self._pending: list[np.ndarray] = []  # the micro-batches' ids since the last optimizer step
        self._n_opt_steps = 0
        self._seen_steps = 0
        self._post_hook: Any = None
        self._automatic = True
        self._accumulate = 1

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(trainer.optimizers)
        if len(optimizers) != 1:
            raise UnsupportedOptimizerError(
                f"DiffinCallback records a run with one optimizer; configure_optimizers returned "
                f"{len(optimizers)}. Train with one optimizer (parameter groups are fine)"
            )
        if trainer.world_size > 1:
            raise RecordingError(
                f"DiffinCallback records single-process training; this Trainer runs {trainer.world_size} "
                f"processes ({type(trainer.strategy).__name__}), each seeing part of every batch. Record on "
                "one device (scoring can then run on several processes: docs/method.md §4.5)"
            )
        precision = str(trainer.precision)
        if precision.startswith("16"):
            raise RecordingError(
                f"DiffinCallback cannot record precision={precision!r}: its gradient scaler skips the steps "
                "whose gradients overflow, which diffin would replay as taken. Use precision='bf16-mixed', "
                "'32-true' or '64-true'"
            )
        self._automatic = bool(pl_module.automatic_optimization)
        clip = self.clip_grad_norm
        if self._automatic:
            self._accumulate = int(trainer.accumulate_grad_batches)
            algo = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm")
            if trainer.gradient_clip_val:
                if algo != "norm":
                    raise RecordingError(
                        f"DiffinCallback records gradient-norm clipping only; this Trainer clips by {algo!r}. "
                        "Use gradient_clip_algorithm='norm' (the default)"
                    )
                if clip is not None and float(clip) != float(trainer.gradient_clip_val):
                    raise RecordingError(
                        f"clip_grad_norm={clip} was passed but the Trainer clips at gradient_clip_val="
                        f"{trainer.gradient_clip_val}; leave clip_grad_norm out under automatic optimization"
                    )
                clip = float(trainer.gradient_clip_val)
        optimizer = unwrap_optimizer(optimizers[0])
        model = _submodule(pl_module, self.module)
        loader = _train_loader(trainer)
        n_train = self.n_train
        if n_train is None and loader is not None:
            try:
                n_train = len(loader.dataset)
            except TypeError:
                n_train = None
        self._ids_from = self._id_reader(loader)
        self.recorder = Recorder(self.run_dir, model, optimizer, self.checkpoint_every, seed=self.seed,
                                 n_train=n_train, overwrite=self.overwrite, clip_grad_norm=clip)
        self._post_hook = optimizer.register_step_post_hook(self._count_step)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.recorder is None or self._ids_from is None:
            return
        self._pending.append(self._ids_from(batch))
        self._seen_steps = self._n_opt_steps

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        rec = self.recorder
        if rec is None:
            return
        stepped = self._n_opt_steps - self._seen_steps
        if stepped == 0:
            return
        if stepped > 1:
            raise RecordingError(
                f"the optimizer stepped {stepped} times in one training batch; DiffinCallback records one "
                "optimizer step per batch at most"
            )
        parts, self._pending = self._pending, []
        if self._automatic and self._accumulate > 1:
            if len(parts) != self._accumulate:
                raise RecordingError(
                    f"step {rec.steps}: the optimizer stepped after {len(parts)} micro-batches, not "
                    f"accumulate_grad_batches={self._accumulate}: Lightning still divides each micro-batch's "
                    "loss by accumulate_grad_batches in an epoch's last, shorter window, a step diffin cannot "
                    "replay as the mean over its batch. Make the number of batches per epoch a multiple of "
                    "accumulate_grad_batches (e.g. limit_train_batches, or drop_last with a matching size)"
                )
            if len({len(p) for p in parts}) > 1:
                raise RecordingError(
                    f"step {rec.steps}: its micro-batches have sizes {[len(p) for p in parts]}; with "
                    "accumulate_grad_batches the step's gradient is the mean of the micro-batch means, the "
                    "mean over the union only when the sizes are equal. Use drop_last=True"
                )
        rec.step(parts if len(parts) > 1 else parts[0])

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._tap is not None:
            self._tap.end_pass()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.recorder is not None:
            self.recorder.close()
        self._release()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.recorder is not None and not self.recorder._closed:
            self.recorder.__exit__(type(exception), exception, exception.__traceback__)
        self._release()

    # ------------------------------------------------------------------ helpers
    def _count_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._n_opt_steps += 1

    def _release(self) -> None:
        if self._post_hook is not None:
            self._post_hook.remove()
            self._post_hook = None
        if self._tap is not None and self._tap_owner is not None:
            self._tap_owner.sampler = self._tap.sampler
        self._tap = None

    _tap_owner: Any = None

    def _id_reader(self, loader: Any) -> Callable[[Any], np.ndarray]:
        how = self.ids
        if callable(how):
            return lambda batch: _as_ids(how(batch), "ids(batch)")
        if how == "auto":
            how = "batch" if loader is not None and isinstance(getattr(loader, "dataset", None), WithIds) else "sampler"
        if how == "batch":
            return _ids_of_batch
        bs = getattr(loader, "batch_sampler", None)
        if loader is None or bs is None or not hasattr(bs, "sampler"):
            raise RecordingError(
                "DiffinCallback cannot read the sample ids from this DataLoader's sampler (no DataLoader, "
                "batch_size=None, or a batch_sampler without .sampler); train on diffin.with_ids(dataset) "
                "so that batches carry their ids, or pass ids=callable(batch) -> ids"
            )
        self._tap = _SamplerTap(bs.sampler)
        self._tap_owner = bs
        bs.sampler = self._tap
        tap = self._tap
        return lambda batch: tap.take(_batch_len(batch))


def _submodule(pl_module: nn.Module, path: str | None) -> nn.Module:
    if not path:
        return pl_module
    m: Any = pl_module
    for part in path.split("."):
        if not hasattr(m, part):
            raise RecordingError(f"module={path!r}: {type(m).__name__} has no attribute {part!r}")
        m = getattr(m, part)
    if not isinstance(m, nn.Module):
        raise RecordingError(f"module={path!r} is a {type(m).__name__}, not a torch.nn.Module")
    return m


def _train_loader(trainer: Any) -> Any:
    """The Trainer's training DataLoader (None when it is not one DataLoader)."""
    dl = trainer.train_dataloader
    return dl if isinstance(dl, torch.utils.data.DataLoader) else None


def _as_ids(ids: Any, where: str) -> np.ndarray:
    arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise RecordingError(f"{where} gave {arr.dtype} ids of shape {arr.shape}; ids must be 1-D integers")
    return arr.astype(np.int64, copy=False)


def _ids_of_batch(batch: Any) -> np.ndarray:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise RecordingError(
            f"ids='batch' needs batches (ids, x, y) from diffin.with_ids(dataset); got a {type(batch).__name__}"
        )
    return _as_ids(batch[0], "the batch's first element")


def _batch_len(batch: Any) -> int:
    """The number of samples in a collated batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        try:
            return _batch_len(item)
        except RecordingError:
            continue
    raise RecordingError(
        f"cannot tell how many samples a {type(batch).__name__} batch holds (no tensor in it); "
        "pass ids=callable(batch) -> ids"
    )
