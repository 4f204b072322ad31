"""Shared plumbing of the data-centric tasks: inputs, output folders, cached scores, evaluation.

A task runs either on a built-in setup (trained and recorded into ``OUT/run`` on first use, reused
afterwards) or on the user's own recorded run, model, loss and data (:class:`TaskInputs`).
Every output folder holds ``config.json``; a re-run with a different config is refused unless
``overwrite`` is set, and everything already finished (scores, replays, retrains) is reused, so an
interrupted task resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import _constants as C
from .._api import ScoreResult, score
from .._errors import ConfigError, OutputExistsError
from .._functional import FlatModel, LossFn
from .._io import write_json
from ..builtin.trainer import TrainConfig
from ..config import ScoreConfig
from ..recording.run import Run, load_run


@dataclass
class TaskInputs:
    """Everything a task needs about one recorded training run.

    ``model_factory`` builds a fresh module of the architecture (values come from the run);
    ``train``/``val``/``test`` are ``(inputs, targets)`` tensors (``val``/``test`` optional);
    ``flipped`` marks training ids whose labels are known to be wrong (for detection metrics);
    ``train_config`` is the recipe for retraining from scratch (pruning).
    """

    run: Path
    model_factory: Callable[[], nn.Module]
    loss_fn: LossFn
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor] | None = None
    test: tuple[Tensor, Tensor] | None = None
    flipped: np.ndarray | None = None
    clean_labels: Tensor | None = None
    train_config: TrainConfig | None = None
    description: str = "user run"
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return int(self.train[0].shape[0])

    @property
    def labels(self) -> np.ndarray:
        return self.train[1].detach().cpu().numpy()


def builtin_inputs(setup_name: str, noise: float | None, out: Path, overwrite: bool = False,
                   progress: bool = False) -> TaskInputs:
    """Train (once) and record a built-in setup into ``out/run``; return its :class:`TaskInputs`."""
    from ..builtin import get_setup, train

    setup = get_setup(setup_name)
    if noise is not None:
        setup = setup.with_changes(noise=noise)
    data = setup.data()
    run_dir = out / "run"
    meta = {"setup": setup.name, "noise": setup.noise, "train": setup.train.to_json()}
    meta_path = run_dir / C.SETUP_JSON
    fresh = not (meta_path.exists() and (run_dir / C.MANIFEST).exists()
                 and json.loads(meta_path.read_text(encoding="utf-8")) == meta)
    if fresh:
        train(setup.model(data), data.x_train, data.y_train, setup.train, run_dir, overwrite=True,
              progress=progress)
        write_json(meta_path, meta)
    has_test = len(data.y_test) > 0
    return TaskInputs(
        run=run_dir,
        model_factory=lambda: setup.model(data),
        loss_fn=setup.loss_fn,
        train=(data.x_train, data.y_train),
        val=(data.x_val, data.y_val) if len(data.y_val) else None,
        test=(data.x_test, data.y_test) if has_test else None,
        flipped=data.flipped if setup.noise else None,
        clean_labels=data.y_train_clean,
        train_config=setup.train,
        description=setup.description + (f"; {setup.noise:.0%} of training labels flipped"
                                         if setup.noise else ""),
        sizes=data.sizes(),
    )


def prepare_out(out: Path | None, config: Any, overwrite: bool) -> Path | None:
    """Create ``out``; refuse one holding a different task config unless ``overwrite``."""
    if out is None:
        return None
    out = Path(out)
    cfg = dataclasses.asdict(config)
    path = out / "config.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != cfg:
            if not overwrite:
                raise OutputExistsError(
                    f"{out} holds results of another {type(config).__name__} ({_diff(old, cfg)}); "
                    "pass overwrite=True (--overwrite) or choose another folder"
                )
            for child in out.iterdir():
                if child.name != "run":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, cfg)
    return out


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:4])


def cached_score(inp: TaskInputs, method: str, target: Any, out: Path | None, progress: bool,
                 **options: Any) -> ScoreResult:
    """Score with ``method``, reusing ``out/scores-<method>`` when it holds the same config."""
    cfg = ScoreConfig(method=method, **options)
    folder = None if out is None else out / f"scores-{method}{'-self' if isinstance(target, str) else ''}"
    if folder is not None and (folder / C.SCORES_JSON).exists():
        meta = json.loads((folder / C.SCORES_JSON).read_text(encoding="utf-8"))
        if meta.get("config") == cfg.to_json() and meta.get("run") == str(load_run(inp.run).path):
            arr = np.load(folder / C.SCORES_NPY, allow_pickle=False)
            return ScoreResult(arr, method, meta["variant"], cfg, meta["run"], meta["target"],
                               meta["seconds"], meta.get("diagnostics", {}))
    return score(inp.run, inp.model_factory(), inp.loss_fn, train=inp.train, target=target,
                 config=cfg, progress=progress, out=folder, overwrite=True)


def theta_final(inp: TaskInputs) -> tuple[FlatModel, Tensor, Run]:
    """The functional model and θ_T of the run (buffers installed)."""
    run = load_run(inp.run)
    fm = FlatModel(inp.model_factory(), inp.loss_fn, run.trainable)
    ck = run.load_checkpoint(run.n_steps)
    fm.set_constants({**{n: t for n, t in ck.params.items() if n not in set(run.trainable)},
                      **ck.buffers})
    return fm, fm.flatten(ck.params), run


@torch.no_grad()
def evaluate_theta(fm: FlatModel, theta: Tensor, data: tuple[Tensor, Tensor]) -> dict[str, float]:
    """Mean loss and (for classifiers: 2-D outputs, integer targets) accuracy at θ."""
    from torch.func import functional_call

    x, y = data
    was = fm.model.training
    fm.model.eval()
    outs = [functional_call(fm.model, fm.unflatten(theta), (x[s : s + 2048].to(fm.dtype),))
            for s in range(0, x.shape[0], 2048)]
    fm.model.train(was)
    out = torch.cat(outs)
    res = {"loss": float(fm.loss_fn(out, y).mean())}
    if out.ndim == 2 and not y.is_floating_point():
        res["accuracy"] = float((out.argmax(1) == y).double().mean())
    return res


def fraction_count(n: int, fraction: float | None, count: int | None, what: str) -> int:
    """How many samples a fraction (0, 1] or a count means; named errors for bad values."""
    if count is not None:
        if not 1 <= count <= n:
            raise ConfigError(f"{what} count must be in [1, {n}], got {count}")
        return int(count)
    if fraction is None or not 0 < fraction <= 1:
        raise ConfigError(f"{what} fraction must be in (0, 1], got {fraction}")
    return max(1, int(round(fraction * n)))


def read_ids(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """Id groups from a file: one group per line (ids separated by commas or spaces), or a
    .npy array of ids (one group)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"ids file {p} does not exist")
    if p.suffix == ".npy":
        return [np.load(p, allow_pickle=False).astype(np.int64).reshape(-1)]
    groups = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            groups.append(np.array([int(t) for t in line.replace(",", " ").split()], dtype=np.int64))
        except ValueError as e:
            raise ConfigError(f"{p}:{i}: not a list of integer ids ({e})") from e
    if not groups:
        raise ConfigError(f"{p} holds no ids")
    return groups


def check_ids(groups: list[np.ndarray], n: int) -> None:
    from .._errors import InvalidIdsError

    for k, g in enumerate(groups):
        if g.size == 0:
            raise ConfigError(f"group {k} is empty")
        if g.min() < 0 or g.max() >= n:
            raise InvalidIdsError(
                f"group {k} holds ids outside [0, {n}): {sorted(set(g[(g < 0) | (g >= n)].tolist()))[:5]}"
            )


def config_field(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})

