"""Targets: scalar functions f(θ_T) whose change under removal a score measures.

* :class:`MeanLoss` — mean loss on a validation set V (Q = 1, scores shape (N,)).
* :class:`PerExample` — the loss of each of Q test examples (scores shape (N, Q)).
* :class:`SelfLoss` — each training sample's own loss (self-influence, scores shape (N,)).

A target supplies its gradient ∇f(θ) as a (Q, P) matrix and its value f(θ) as (Q,).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._data import DataSource
from ._errors import DataMismatchError
from ._functional import FlatModel
from ._tree import batch_len


class Target:
    """Base class. ``kind`` is one of "mean", "pairwise", "self"; ``size`` is Q."""

    kind: str = ""
    size: int = 1

    def grads(self, fm: FlatModel, theta: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def values(self, fm: FlatModel, theta: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def stat_grads(self, fm: FlatModel, theta: Tensor, stats: Tensor) -> Tensor:
        """∂f/∂r (Q, R): the gradient in the running statistics r (R,) of train-mode BatchNorm
        layers, which f reads in eval mode (docs/method.md §4.8)."""
        rows = []
        for _, x, y in self.source.chunks(self.batch_size):
            B = batch_len(x)
            rows.append(torch.func.jacrev(lambda r, x=x, y=y, B=B: fm._per_sample(fm.forward(theta, x, None, r), y, B))(
                stats))
        return torch.cat(rows)


class MeanLoss(Target):
    """f(θ) = mean_{v∈V} l(v; θ). Gradient streamed over V in chunks (memory O(P)).

    For a batch-coupled loss (docs/method.md §4.7) f is the loss of V as one batch with weights of
    ones: :func:`make_target` then sets ``batch_size = |V|``; a smaller ``batch_size`` (for memory)
    makes f the mean of the loss over consecutive chunks of V instead, a different target."""

    kind = "mean"
    size = 1

    def __init__(self, source: DataSource, batch_size: int = 512) -> None:
        self.source = source
        self.batch_size = batch_size

    def grads(self, fm: FlatModel, theta: Tensor) -> Tensor:
        n = len(self.source)
        total = torch.zeros_like(theta)
        for ids, x, y in self.source.chunks(self.batch_size):
            g, _ = fm.loss_grad(theta, x, y)
            total += g * (len(ids) / n)
        return total.unsqueeze(0)

    def stat_grads(self, fm: FlatModel, theta: Tensor, stats: Tensor) -> Tensor:
        n = len(self.source)
        total = torch.zeros_like(stats)
        with torch.enable_grad():
            for ids, x, y in self.source.chunks(self.batch_size):
                r = stats.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(fm.batch_loss(theta, x, y, stats=r), r, allow_unused=True)
                if g is not None:
                    total += g * (len(ids) / n)
        return total.unsqueeze(0)

    def values(self, fm: FlatModel, theta: Tensor) -> Tensor:
        n = len(self.source)
        with torch.no_grad():
            s = sum(fm.batch_loss(theta, x, y) * len(ids) for ids, x, y in self.source.chunks(self.batch_size))
        return (s / n).reshape(1)


class PerExample(Target):
    """f_q(θ) = l(v_q; θ) for each of Q examples. Gradients (Q, P) by vmapped per-sample grads."""

    kind = "pairwise"

    def __init__(self, source: DataSource, batch_size: int = 64) -> None:
        self.source = source
        self.size = len(source)
        self.batch_size = batch_size

    def grads(self, fm: FlatModel, theta: Tensor) -> Tensor:
        return torch.cat(
            [fm.per_sample_grads(theta, x, y) for _, x, y in self.source.chunks(self.batch_size)]
        )

    def values(self, fm: FlatModel, theta: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([fm.losses(theta, x, y) for _, x, y in self.source.chunks(512)])


class GroupMeanLoss(Target):
    """f_g(θ) = mean loss over the examples of group g, for each of G groups of one target set
    (e.g. the classes of a validation set): one sweep carries G adjoint vectors, and the scores
    are an N×G matrix, column g the predicted change of group g's mean loss if the sample were
    removed. Gradients (G, P) streamed over the set in chunks."""

    kind = "pairwise"

    def __init__(self, source: DataSource, groups: np.ndarray, batch_size: int = 64) -> None:
        groups = np.asarray(groups, dtype=np.int64).reshape(-1)
        if groups.shape != (len(source),) or groups.size == 0 or groups.min() < 0:
            raise DataMismatchError(f"groups must hold one non-negative group index per target example "
                                    f"({len(source)}), got shape {groups.shape}")
        self.source = source
        self.groups = groups
        self.size = int(groups.max()) + 1
        self.counts = np.bincount(groups, minlength=self.size)
        if np.any(self.counts == 0):
            raise DataMismatchError(f"groups {np.flatnonzero(self.counts == 0).tolist()} have no examples; "
                                    "number the groups 0..G-1 without gaps")
        self.batch_size = batch_size

    def _weights(self, ids: np.ndarray, like: Tensor) -> Tensor:
        """(G, B) weights 1/|group| of each chunk member in its own group's row."""
        w = np.zeros((self.size, len(ids)))
        w[self.groups[ids], np.arange(len(ids))] = 1.0 / self.counts[self.groups[ids]]
        return torch.as_tensor(w, dtype=like.dtype, device=like.device)

    def grads(self, fm: FlatModel, theta: Tensor) -> Tensor:
        total = torch.zeros(self.size, theta.numel(), dtype=theta.dtype, device=theta.device)
        for ids, x, y in self.source.chunks(self.batch_size):
            total += self._weights(ids, theta) @ fm.per_sample_grads(theta, x, y)
        return total

    def values(self, fm: FlatModel, theta: Tensor) -> Tensor:
        with torch.no_grad():
            return sum(self._weights(ids, theta) @ fm.losses(theta, x, y)
                       for ids, x, y in self.source.chunks(self.batch_size))


class SelfLoss(Target):
    """f_z(θ) = l(z; θ) for every training sample z; estimators return the diagonal.

    ``chunk``: for a batch-coupled loss, f_z is z's share ℓ_z (docs/method.md §4.7) within its chunk
    of ``chunk`` consecutive ids (the recorded batch size), the same chunks wherever it is evaluated;
    estimators then take subsets aligned to those chunks."""

    kind = "self"

    def __init__(self, train: DataSource, chunk: int | None = None) -> None:
        self.source = train
        self.size = len(train)
        self.chunk = chunk

    def subset(self, ids: np.ndarray) -> PerExample:
        """The training samples ``ids`` as a pairwise target (for chunked self-influence)."""
        return PerExample(_Subset(self.source, ids), batch_size=self.chunk or 64)

    def values(self, fm: FlatModel, theta: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([fm.losses(theta, x, y) for _, x, y in self.source.chunks(self.chunk or 512)])


class _Subset(DataSource):
    """A view of some rows of another DataSource (no copy of the data)."""

    def __init__(self, parent: DataSource, ids: np.ndarray) -> None:  # noqa: D107
        self.parent = parent
        self.ids = np.asarray(ids)
        self.name = parent.name
        self.dtype = parent.dtype
        self.device = parent.device
        self._n = len(self.ids)
        self._ds = None
        self.x = self.y = None  # rows come through get(), by id

    def get(self, ids: Any) -> tuple[Tensor, Tensor]:
        return self.parent.get(self.ids[np.asarray(ids)])


def make_target(
    target: Any,
    train: DataSource,
    fm: FlatModel,
    pairwise: bool = False,
    batch_size: int = 512,
    self_chunk: int | None = None,
) -> Target:
    """Build a :class:`Target` from what the user passed as ``target=``.

    ``"self"`` → :class:`SelfLoss`; an ``(inputs, targets)`` pair or Dataset → :class:`MeanLoss`
    (or :class:`PerExample` with ``pairwise=True``); a :class:`Target` is used as is.
    """
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        if target != "self":
            raise DataMismatchError(
                f"target must be an (inputs, targets) pair, a Dataset or 'self'; got {target!r}"
            )
        if pairwise:
            raise DataMismatchError("pairwise=True needs target examples, not 'self'")
        return SelfLoss(train, chunk=self_chunk if fm.coupled else None)
    if target is None:
        raise DataMismatchError(
            "pass target=(inputs, targets) (e.g. a validation set) or target='self'"
        )
    src = DataSource(target, fm.dtype, fm.device, name="target")
    if fm.coupled and not pairwise:
        return MeanLoss(src, len(src))  # the target set as one batch of the loss
    return PerExample(src) if pairwise else MeanLoss(src, batch_size)
