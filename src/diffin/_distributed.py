"""Several processes on ``torch.distributed`` (docs/method.md §4.5): each step's batch split
across ranks for the gradient, the HVP and the per-sample inner products.

Every rank runs the same sweep on the same run, data and seeds, so every rank takes the same
steps in the same order. Only the functional core's batch work is split: :class:`ShardedFlatModel`
wraps a :class:`~diffin._functional.FlatModel` and, for a batch of B rows, lets rank r compute on
its contiguous slice of about B/W rows, then

* batch gradients and HVPs of the mean loss: the slice's mean times |slice|/B, summed over ranks
  (one all-reduce of a P-vector, or Q of them), which is the full batch's mean;
* per-sample losses and inner products: gathered from every rank (B·Q numbers), so each rank
  holds the whole batch's values and adds every sample's term, the same on every rank.

The adjoint is then the same on every rank (up to the order of a floating-point sum), and so are
the scores: rank 0 writes them. Methods the wrapper does not override (per-sample gradients of
small chunks, vmapped dots over parameter copies) run whole on every rank: correct, not split.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._errors import ConfigError, DistributedError
from ._functional import FlatModel


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (a named error if one has stopped)."""
    _collective(dist.barrier)


def init_from_env(device: str = "cpu") -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1):
    gloo on CPU, NCCL on CUDA. Returns whether a group of more than one process is active."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per process
        dist.init_process_group(backend=backend)
        global _OWNED
        _OWNED = True
    return dist.get_world_size() > 1


_OWNED = False  # whether init_from_env created the default process group (then shutdown ends it)


def shutdown(wait: bool = True) -> None:
    """End the process group :func:`init_from_env` created: every rank waits for the others first
    (``wait``; skipped when leaving on an error), then the group is destroyed. A process that exits
    with a live gloo group can abort in its threads' teardown ("terminate called without an active
    exception") after its work is done, failing the whole torchrun."""
    global _OWNED
    if not _OWNED or not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait:
            barrier()
    finally:
        dist.destroy_process_group()
        _OWNED = False


def _collective(fn: Any, *args: Any, **kwargs: Any) -> None:
    """Run a collective; a failure (another rank gone, a broken group) becomes :class:`DistributedError`."""
    try:
        fn(*args, **kwargs)
    except RuntimeError as e:
        rank, size = world()
        raise DistributedError(
            f"rank {rank} of {size}: a collective ({fn.__name__}) failed, so another rank has stopped or "
            f"the process group broke ({str(e).splitlines()[0] if str(e) else type(e).__name__}); nothing was "
            "written as complete. Fix the failing rank and rerun every rank"
        ) from e


def _group_device(like: Tensor) -> torch.device:
    """Where the default group's collectives take tensors: CUDA for NCCL, else ``like``'s device."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device


def broadcast_tensor(t: Tensor | None, like: Tensor, src: int = 0) -> Tensor:
    """Rank ``src``'s tensor ``t`` on every rank (others pass ``None``): its shape is sent first, then
    its values, in ``like``'s dtype; returned on ``like``'s device."""
    rank, _ = world()
    dev = _group_device(like)
    shape = torch.zeros(8, dtype=torch.int64, device=dev)
    if rank == src:
        assert t is not None and t.dim() <= 7
        shape[0] = t.dim()
        shape[1:1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    _collective(dist.broadcast, shape, src=src)
    dims = [int(d) for d in shape[1:1 + int(shape[0])].tolist()]
    buf = (t.to(device=dev, dtype=like.dtype).contiguous() if rank == src
           else torch.empty(dims, dtype=like.dtype, device=dev))
    _collective(dist.broadcast, buf, src=src)
    return buf.to(like.device)


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over every rank, on every rank (``t``'s device and dtype)."""
    buf = t.to(_group_device(t)).contiguous()
    _collective(dist.all_reduce, buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def _bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank ``rank`` among ``size`` for a batch of n (contiguous, sizes differ by ≤ 1)."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class ShardedFlatModel(FlatModel):
    """A :class:`FlatModel` whose batch work is split across the ranks of the default process
    group (see the module docstring). Everything else is the wrapped model's."""

    keeps_graphs = False  # a kept gradient graph would hold the whole batch on every rank

    def __init__(self, inner: FlatModel):  # noqa: D107 - no FlatModel.__init__: a proxy
        self.__dict__["_inner"] = inner
        self.__dict__["_rank"], self.__dict__["_size"] = world()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_inner"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["_inner"], name, value)

    # ------------------------------------------------------------------ helpers
    def _slice(self, x: Tensor, y: Tensor) -> tuple[int, int, int]:
        n = int(x.shape[0])
        lo, hi = _bounds(n, self._rank, self._size)
        return n, lo, hi

    def _gather_rows(self, part: Tensor, n: int) -> Tensor:
        """Concatenate each rank's rows (last dimension of ``part``: this rank's slice) into the
        batch's n rows, in rank order."""
        size = self._size
        width = -(-n // size)  # the largest slice
        pad = torch.zeros(*part.shape[:-1], width, dtype=part.dtype, device=part.device)
        pad[..., : part.shape[-1]] = part
        bufs = [torch.empty_like(pad) for _ in range(size)]
        _collective(dist.all_gather, bufs, pad.contiguous())
        pieces = []
        for r in range(size):
            lo, hi = _bounds(n, r, size)
            pieces.append(bufs[r][..., : hi - lo])
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def _sum(t: Tensor) -> Tensor:
        _collective(dist.all_reduce, t, op=dist.ReduceOp.SUM)
        return t

    # ------------------------------------------------------------------ split work
    def loss_grad(self, theta: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        n, lo, hi = self._slice(x, y)
        inner = self._inner
        if hi > lo:
            g, losses = inner.loss_grad(theta, x[lo:hi], y[lo:hi])
            g = g * ((hi - lo) / n)
        else:
            g, losses = torch.zeros_like(theta), theta.new_zeros(0)
        return self._sum(g.contiguous()), self._gather_rows(losses, n)

    def loss_grad_many(self, thetas: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        gs, ls = zip(*(self.loss_grad(th, x, y) for th in thetas))
        return torch.stack(gs), torch.stack(ls)

    def dots(self, theta: Tensor, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        n, lo, hi = self._slice(x, y)
        if hi > lo:
            part = self._inner.dots(theta, x[lo:hi], y[lo:hi], v)
        else:
            part = theta.new_zeros((0,) if v.ndim == 1 else (v.shape[0], 0))
        return self._gather_rows(part, n)

    def hvp(self, theta: Tensor, x: Tensor, y: Tensor, v: Tensor, mode: Any = "central",
            eps: float | None = None) -> Tensor:
        return self.hvp_and_dots(theta, x, y, v, mode=mode, eps=eps, dots="jvp", want_dots=False)[0]

    def hvp_and_dots(self, theta: Tensor, x: Tensor, y: Tensor, v: Tensor, mode: Any = "central",
                     eps: float | None = None, dots: Any = "auto",
                     want_dots: bool = True) -> tuple[Tensor, Tensor | None]:
        n, lo, hi = self._slice(x, y)
        if hi > lo:
            hv, d = self._inner.hvp_and_dots(theta, x[lo:hi], y[lo:hi], v, mode=mode, eps=eps, dots=dots,
                                             want_dots=want_dots)
            hv = hv * ((hi - lo) / n)
        else:
            hv = torch.zeros_like(v)
            d = None if not want_dots else theta.new_zeros((0,) if v.ndim == 1 else (v.shape[0], 0))
        hv = self._sum(hv.contiguous())
        if want_dots:
            assert d is not None
            d = self._gather_rows(d, n)
        return hv, d
