"""Tiny recorded training loops for the recording tests (float64, milliseconds per run).

``record`` is the user loop of the README with every value it passed kept for comparison.
``train`` is a deterministic loop (data, batches and learning rates are functions of the step)
that can also run as a script, to be killed by a real SIGKILL mid-run:

    python tests/_recording_loop.py RUN_DIR --steps 11 --every 3 --kill-after 8
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import diffin
from diffin import _constants as C

N_TRAIN = 20
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


# ---------------------------------------------------------------------- the README loop
def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (N_TRAIN,), generator=g)


def batch_ids(t: int) -> np.ndarray:
    """Deterministic batches of varying size (3 or 4) over 0..N_TRAIN-1."""
    rng = np.random.default_rng(100 + t)
    return rng.choice(N_TRAIN, size=3 + t % 2, replace=False).astype(np.int64)


def lr_at(t: int) -> float:
    return 0.1 / (1 + t)


def as_kind(ids: np.ndarray, kind: str) -> Any:
    if kind == "list":
        return ids.tolist()
    if kind == "numpy":
        return ids
    if kind == "long":
        return torch.as_tensor(ids, dtype=torch.long)
    if kind == "int32":
        return torch.as_tensor(ids, dtype=torch.int32)
    raise AssertionError(kind)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def record(
    path: Path,
    *,
    steps: int = 7,
    every: int = 3,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    ids_kind: str = "numpy",
    model: nn.Module | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """The exact user loop. Returns the model, the passed ids/lrs and the parameters (and
    momentum buffers) captured at every step."""
    model = make_model() if model is None else model
    x, y = make_data()
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=lr_at(0), momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
    )
    rec = diffin.Recorder(path, model, optimizer=opt, checkpoint_every=every, **kw)
    params = {0: snapshot(model)}
    buffers = {0: {n: b.detach().clone() for n, b in model.named_buffers()}}
    moms: dict[int, dict[str, torch.Tensor]] = {}
    ids_given, lrs = [], []
    for t in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(t)
        ids = batch_ids(t)
        loss = nn.functional.cross_entropy(model(x[ids]), y[ids])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(as_kind(ids, ids_kind), lr=opt.param_groups[0]["lr"])
        ids_given.append(ids)
        lrs.append(opt.param_groups[0]["lr"])
        params[t + 1] = snapshot(model)
        buffers[t + 1] = {n: b.detach().clone() for n, b in model.named_buffers()}
        named = dict(model.named_parameters())
        moms[t + 1] = {
            n: opt.state[p]["momentum_buffer"].clone()
            for n, p in named.items()
            if p.requires_grad and opt.state[p].get("momentum_buffer") is not None
        }
    assert rec.close() == Path(path)
    return {"model": model, "opt": opt, "ids": ids_given, "lrs": lrs, "params": params,
            "buffers": buffers, "moms": moms}


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / C.MANIFEST).read_text())


def write_manifest(path: Path, m: dict[str, Any]) -> None:
    (path / C.MANIFEST).write_text(json.dumps(m))


def ckpt_rel(step: int) -> str:
    """A checkpoint's path relative to the run folder."""
    return f"{C.CHECKPOINT_DIR}/{C.CHECKPOINT_PATTERN.format(step=step)}"


# ---------------------------------------------------------------------- the killable loop
N_LOOP = 24
LOOP_BATCH = 5


def loop_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training (24, 4) and validation (8, 4) inputs with 3-class labels, float64."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(N_LOOP, 4, generator=g, dtype=torch.float64)
    Xv = torch.randn(8, 4, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 3, (N_LOOP,), generator=g), Xv, torch.randint(0, 3, (8,), generator=g)


def loop_model() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def loop_batch(t: int) -> np.ndarray:
    """The ids of step t: a function of t only, so a restarted loop replays the same batches."""
    rng = np.random.default_rng(500 + t)
    return rng.choice(N_LOOP, size=LOOP_BATCH - t % 2, replace=False).astype(np.int64)


def loop_lr(t: int) -> float:
    return 0.3 / (1.0 + 0.1 * t)


def loop_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def loop_optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor, Y: torch.Tensor,
                        t: int) -> np.ndarray:
    """One optimizer step of the loop on step t's batch (mean loss, backward, ``opt.step()``);
    returns the batch ids for ``rec.step``."""
    b = loop_batch(t)
    loss = loop_loss(model(X[b]), Y[b]).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return b


def train(
    path: Path | str,
    *,
    steps: int,
    every: int,
    momentum: float = 0.9,
    kill_after: int | None = None,
    resume: bool = False,
) -> nn.Module:
    """Record ``steps`` SGD steps of a tiny MLP into ``path``. ``kill_after=k``: SIGKILL this
    process right after recording step k (1-based count), never closing the run. ``resume``:
    load the run's last checkpoint and continue it from there (the loop restarts at rec.steps)."""
    X, Y, _, _ = loop_data()
    model = loop_model()
    opt = torch.optim.SGD(model.parameters(), lr=loop_lr(0), momentum=momentum)
    if resume:
        start = diffin.recording.restore_checkpoint(path, model, opt)
        rec = diffin.Recorder(path, model, optimizer=opt, checkpoint_every=every, n_train=N_LOOP,
                              seed=0, resume=True)
        if rec.steps != start:
            raise RuntimeError(f"restore_checkpoint gave step {start}, the Recorder {rec.steps}")
    else:
        rec = diffin.Recorder(path, model, optimizer=opt, checkpoint_every=every, n_train=N_LOOP, seed=0)
    for t in range(rec.steps, steps):
        for g in opt.param_groups:
            g["lr"] = loop_lr(t)
        b = loop_optimizer_step(model, opt, X, Y, t)
        rec.step(b, lr=opt.param_groups[0]["lr"])
        if kill_after is not None and t + 1 == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    rec.close()
    return model


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--every", type=int, required=True)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--kill-after", type=int, default=None)
    a = ap.parse_args()
    train(a.path, steps=a.steps, every=a.every, momentum=a.momentum, kill_after=a.kill_after)
