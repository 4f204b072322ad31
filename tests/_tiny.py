"""Tiny recorded runs for numerical tests (float64, seconds to build)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import diffin


def tolerance(dtype: torch.dtype = torch.float64, computation: str = "exact") -> tuple[float, float]:
    """``(rtol, floor)`` for comparing a computation in ``dtype`` with its reference: an entry
    passes when |actual − expected| ≤ rtol·|expected| + floor·max|expected| (see
    :func:`assert_close`). Both come from the dtype's machine epsilon ε, never from one
    machine's last bits (other BLAS builds and thread counts round differently).

    * ``exact``: the same mathematics rounded differently: another summation order or chunking,
      vmapped or looped, autograd or dense Hessians, through a few dozen SGD steps. Rounding
      errors of a few hundred ε, amplified a little by the steps: rtol √ε/10 and floor 10⁴ε
      (float64: 1.5e-9 and 2.2e-12; float32: 3.5e-5 and 1.2e-3).
    * ``fd``: central finite differences at diffin's default step (about ε^(1/3) relative),
      whose truncation and rounding errors are both about ε^(2/3) of the largest product:
      rtol 10³ε^(2/3) and floor 10²ε^(2/3) (float64: 3.7e-8 and 3.7e-9).
    """
    eps = torch.finfo(dtype).eps
    if computation == "exact":
        return eps**0.5 / 10, 1e4 * eps
    if computation == "fd":
        return 1e3 * eps ** (2 / 3), 1e2 * eps ** (2 / 3)
    raise ValueError(f"unknown computation {computation!r}")


def _numpy(a: object) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def assert_close(
    actual: object,
    expected: object,
    dtype: torch.dtype = torch.float64,
    computation: str = "exact",
    *,
    rtol: float | None = None,
    floor: float | None = None,
    scale: float | None = None,
    msg: str = "",
) -> None:
    """Assert |actual − expected| ≤ rtol·|expected| + floor·max|expected| entrywise.

    ``rtol`` and ``floor`` default to :func:`tolerance` of ``dtype`` and ``computation``; pass
    them for a computation whose error is known otherwise (an iterative solver stopped at a
    residual, a finite difference of another order). The absolute part scales with the size of
    the compared values, so entries near zero are judged against the vector's scale; pass
    ``scale`` when the reference is a difference of larger numbers, whose rounding it inherits
    (see :func:`difference_scale`).
    """
    a, e = _numpy(actual), _numpy(expected)
    r, f = tolerance(dtype, computation)
    r = r if rtol is None else rtol
    f = f if floor is None else floor
    if scale is None:
        scale = float(np.abs(e).max()) if e.size else 0.0
    np.testing.assert_allclose(a, e, rtol=r, atol=f * scale, err_msg=msg)


def ce(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o, y, reduction="none")


def sq(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((o - y) ** 2).sum(dim=1)


@dataclass
class Tiny:
    run: Path
    make: object  # () -> nn.Module
    loss: object
    X: torch.Tensor
    Y: torch.Tensor
    Xv: torch.Tensor
    Yv: torch.Tensor

    def score(self, method: str, **kw) -> diffin.ScoreResult:
        kw.setdefault("target", (self.Xv, self.Yv))
        return diffin.score(self.run, self.make(), self.loss, train=(self.X, self.Y), method=method,
                            progress=False, **kw)


def make_model(kind: str, d: int, k: int, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(1)
    if kind == "mlp":
        m = nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, k))
    elif kind == "linear":
        m = nn.Sequential(nn.Linear(d, k))
    elif kind == "cnn":
        m = nn.Sequential(nn.Unflatten(1, (1, 6, 6)), nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(),
                          nn.Linear(32, k))
    else:
        raise ValueError(kind)
    return m.to(dtype)


def record(
    path: Path,
    *,
    kind: str = "mlp",
    n: int = 24,
    d: int = 4,
    k: int = 3,
    batch: int = 6,
    epochs: int = 2,
    every: int = 3,
    opt_kw: dict | None = None,
    regression: bool = False,
    ids: bool = True,
    dtype=torch.float64,
    seed: int = 0,
) -> Tiny:
    """Train a tiny model with a plain loop + Recorder and return everything to score it."""
    g = torch.Generator().manual_seed(seed)
    if kind == "cnn":
        d = 36
    X = torch.randn(n, d, generator=g, dtype=dtype)
    Xv = torch.randn(8, d, generator=g, dtype=dtype)
    if regression:
        W = torch.randn(d, k, generator=g, dtype=dtype)
        Y = X @ W + 0.3 * torch.randn(n, k, generator=g, dtype=dtype)
        Yv = Xv @ W + 0.3 * torch.randn(8, k, generator=g, dtype=dtype)
        loss = sq
    else:
        Y = torch.randint(0, k, (n,), generator=g)
        Yv = torch.randint(0, k, (8,), generator=g)
        loss = ce

    def make() -> nn.Module:
        return make_model(kind, d, k, dtype)

    model = make()
    opt = torch.optim.SGD(model.parameters(), **(opt_kw or {"lr": 0.1}))
    rec = diffin.Recorder(path, model, optimizer=opt, checkpoint_every=every, n_train=n)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch):
            b = perm[s : s + batch]
            out = loss(model(X[b]), Y[b]).mean()
            opt.zero_grad()
            out.backward()
            opt.step()
            rec.step(b if ids else None, lr=opt.param_groups[0]["lr"])
    rec.close()
    return Tiny(path, make, loss, X, Y, Xv, Yv)


def difference_scale(theta: torch.Tensor, target_grad: torch.Tensor, value: float) -> float:
    """The size of the rounding in f(θ') − f(θ) when θ' and θ come from separate replays of
    training (replayed removal): each θ carries rounding of about ε·‖θ‖, which moves f by up to
    ‖∇f‖·‖θ‖·ε, and f itself is rounded at ε·|f|. Pass it as ``scale`` to :func:`assert_close`."""
    return float(target_grad.norm() * theta.norm()) + abs(float(value))



def record_loop(
    path: Path,
    make_opt: object,  # (model) -> torch.optim.Optimizer
    *,
    n: int = 18,
    d: int = 4,
    k: int = 3,
    batch: int = 6,
    epochs: int = 2,
    every: int = 3,
    clip: float | None = None,
    record_clip: float | None | str = "same",
    micro: int = 1,
    scheduler: object = None,  # (optimizer) -> LR scheduler, stepped after every step
    warmup: int = 0,
    seed: int = 0,
) -> Tiny:
    """Train the tiny tanh MLP (float64) with a user's loop: any optimizer, ``clip_grad_norm_`` at
    ``clip``, ``micro`` equal micro-batches per step (each mean loss divided by ``micro``), an LR
    scheduler; recorded with ``rec.step(ids)`` (no lr) and ``Recorder(clip_grad_norm=...)``
    (``record_clip="same"``: the loop's threshold). ``warmup``: full-batch steps taken before
    recording starts (the run then starts from a trained optimizer state)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Xv = torch.randn(8, d, generator=g, dtype=torch.float64)
    Y = torch.randint(0, k, (n,), generator=g)
    Yv = torch.randint(0, k, (8,), generator=g)

    def make() -> nn.Module:
        return make_model("mlp", d, k)

    model = make()
    opt = make_opt(model)
    sched = scheduler(opt) if scheduler is not None else None
    for _ in range(warmup):
        opt.zero_grad()
        ce(model(X), Y).mean().backward()
        opt.step()
    rc = clip if record_clip == "same" else record_clip
    with diffin.Recorder(path, model, optimizer=opt, checkpoint_every=every, n_train=n, clip_grad_norm=rc) as rec:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, batch):
                parts = perm[s : s + batch].chunk(micro)
                opt.zero_grad()
                for p in parts:
                    (ce(model(X[p]), Y[p]).mean() / len(parts)).backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                rec.step(list(parts) if micro > 1 else parts[0])
                if sched is not None:
                    sched.step()
    return Tiny(path, make, ce, X, Y, Xv, Yv)


def record_sgd_order(path: Path, model: nn.Module, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, *, loss,
                     lr: float, steps: int, batch: int, every: int, n_train: int,
                     weight_decay: float = 0.0) -> diffin.Run:
    """The README loop: plain SGD (on the parameters that require grad) over consecutive batches of
    ``order``, ``steps`` steps, recorded with ``rec.step(ids)``; returns the loaded run."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    with diffin.Recorder(path, model, optimizer=opt, checkpoint_every=every, n_train=n_train) as rec:
        for t in range(steps):
            ids = order[t * batch : (t + 1) * batch]
            out = loss(model(x[ids]), y[ids]).mean()
            opt.zero_grad()
            out.backward()
            opt.step()
            rec.step(ids)
    return diffin.load_run(path)
