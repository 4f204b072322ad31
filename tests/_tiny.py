"""Tiny recorded runs for numerical tests (float64, seconds to build)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import diffin

RTOL = 1e-6  # float64 tolerances of CONVENTIONS.md
ATOL = 1e-9


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
