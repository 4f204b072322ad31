"""What removing flagged samples does, measured on data the flags were not chosen on: the replayed
run without them, models trained from scratch without each method's flags, and the time estimate of
costly detectors (``diffin clean``)."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import _tree
from .._data import DataSource
from .._errors import ConfigError
from ..config import ScoreConfig
from ..groundtruth import replay_states
from ..trajectory import Trajectory
from ._common import Recipe, TaskInputs, TaskState, theta_final


def heldout_split(inp: TaskInputs, seed: int) -> tuple[TaskInputs, str]:
    """Inputs whose before/after numbers are measured on data the flags were not chosen on: the
    test set when there is one; else the validation set split in two halves (seeded), the first
    the target of validation-influence methods, the second held out for evaluation. Returns the
    inputs and what the evaluation set is, in words."""
    if inp.test is not None:
        return inp, "test"
    if inp.val is None:
        raise ConfigError("retraining needs test or validation data to evaluate on (give a test set, or a "
                          "validation set of which half is held out)")
    n = _tree.batch_len(inp.val[0])
    if n < 2:
        raise ConfigError("retraining without a test set holds out half of the validation set, which needs "
                          f">= 2 samples (has {n}); give a test set")
    perm = torch.as_tensor(np.random.default_rng(seed + 31).permutation(n))
    choose, held = perm[: n // 2], perm[n // 2:]
    part = lambda ids: (_tree.index(inp.val[0], ids), inp.val[1][ids])  # noqa: E731
    return (dataclasses.replace(inp, val=part(choose), test=part(held)),
            f"held-out half of the validation set ({len(held)} samples; flags chosen on the other {len(choose)})")


def replay_without(inp: TaskInputs, state: TaskState, flagged: np.ndarray, seed: int, which: str) -> dict[str, Any]:
    """Replay the recorded run without the flagged samples (and a random and the oracle removal),
    evaluated on ``inp.test`` with each replay's own parameters and running statistics."""
    fm, _, run = theta_final(inp, state.run)
    src = DataSource(inp.train, fm.dtype, fm.device)
    traj = Trajectory(run, fm, src)
    rng = np.random.default_rng(seed + 17)
    groups = {"after": flagged, "random_removal": np.sort(rng.choice(inp.n_train, len(flagged), replace=False))}
    if inp.flipped is not None:
        groups["oracle_removal"] = np.flatnonzero(inp.flipped)
    with torch.no_grad():
        full, finals = replay_states(traj, list(groups.values()), "renormalize")

    def ev(th: torch.Tensor, stats: torch.Tensor | None) -> dict[str, float]:
        params = fm.unflatten(th)
        if stats is not None and stats.numel():
            params.update(fm.unflat_stats(stats))
        res = inp.evaluate(fm.model, *inp.test, loss_fn=fm.loss_fn, params=params)  # type: ignore[misc]
        return {f"test_{k}": v for k, v in res.items()}

    out: dict[str, Any] = {"evaluated_on": which, "before": ev(full.theta, full.stats), "n_removed": int(len(flagged))}
    for k, (name, grp) in enumerate(groups.items()):
        out[name] = ev(finals.theta[k], None if finals.stats is None else finals.stats[k])
        out[name]["n_removed"] = int(len(grp))
    return out


def removal_sets(harms: dict[str, np.ndarray], k: int, inp: TaskInputs, seed: int) -> dict[str, np.ndarray]:
    """The training ids each comparison removes: nothing (``none``), the k most harmful by each
    method, k at random, and the corrupted ids when known (``oracle``)."""
    sets = {"none": np.zeros(0, dtype=np.int64)}
    sets.update({m: np.sort(np.argsort(-h, kind="stable")[:k]) for m, h in harms.items()})
    sets["random"] = np.sort(np.random.default_rng(seed + 17).choice(inp.n_train, k, replace=False))
    if inp.flipped is not None:
        sets["oracle"] = np.flatnonzero(inp.flipped)
    return sets


def retrain_fresh(inp: TaskInputs, recipe: Recipe, sets: dict[str, np.ndarray], seeds: list[int],
                  which: str) -> dict[str, Any]:
    """Train from scratch with ``recipe`` (one model per removal set and seed; the model's
    initialisation seeded with the same seed) and evaluate on ``inp.test``: per set, the test
    accuracy and loss of each seed and their means and standard deviations."""
    x, y = inp.train
    res: dict[str, Any] = {"evaluated_on": which, "seeds": seeds, "recipe": recipe.describe(), "removals": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ids in sets.items():
            keep = np.setdiff1d(np.arange(inp.n_train), ids)
            per: dict[str, list[float]] = {}
            for sd in seeds:
                torch.manual_seed(sd)
                model = inp.model_factory()
                recipe.train(model, x, y, Path(tmp) / "run", keep, sd, inp.loss_fn)
                for key, v in inp.evaluate(model, *inp.test, loss_fn=inp.loss_fn).items():  # type: ignore[misc]
                    per.setdefault(f"test_{key}", []).append(float(v))
            row: dict[str, Any] = {"n_removed": int(len(ids))}
            for key, vals in per.items():
                row[key] = vals
                row[f"{key}_mean"] = float(np.mean(vals))
                row[f"{key}_std"] = float(np.std(vals))
            res["removals"][name] = row
    return res


LANCZOS_HVPS = 40
"""About how many full-data HVPs the influence functions' Lanczos eigenvalue bounds take (docs/method.md §5)."""


def estimate_seconds(name: str, inp: TaskInputs, state: TaskState, base: ScoreConfig) -> tuple[float, str]:
    """A costly method's time (s) before it runs, from one measured full-data Hessian–vector
    product at θ_T times the iterations it may take, and the estimate in words."""
    fm, theta, _ = theta_final(inp, state.run)
    v = torch.randn(1, theta.numel(), dtype=theta.dtype, generator=torch.Generator().manual_seed(0))
    src = DataSource(inp.train, fm.dtype, fm.device)
    t0 = time.perf_counter()
    if name == "if-cg":
        for _, x, y in src.chunks(base.batch_size):
            fm.hvp(theta, x, y, v, mode="exact" if base.hvp == "auto" else base.hvp)  # type: ignore[arg-type]
        one = time.perf_counter() - t0
        n = base.cg_iters + LANCZOS_HVPS
        return one * n, (f"up to {base.cg_iters} CG iterations and about {LANCZOS_HVPS} Lanczos steps for the damping, "
                         f"each one full-data HVP of {one:.2g} s")
    ids = np.arange(min(inp.n_train, base.lissa_batch_size))
    _, x, y = next(iter(DataSource((_tree.index(inp.train[0], torch.as_tensor(ids)), inp.train[1][ids]),
                                   fm.dtype, fm.device).chunks(len(ids))))
    fm.hvp(theta, x, y, v, mode="exact" if base.hvp == "auto" else base.hvp)  # type: ignore[arg-type]
    one = time.perf_counter() - t0
    return one * base.lissa_depth, (f"{base.lissa_depth} LiSSA steps × one HVP on {len(ids)} samples ({one:.2g} s), "
                                    "plus the Lanczos bounds (a few dozen full-data HVPs)")
