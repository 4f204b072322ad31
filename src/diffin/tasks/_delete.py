"""Data deletion (docs/method.md §6): predict what removing groups of records does to the
target, then check it by replaying each removal.

Predictions per group S: the sum of the members' scores, and — for the sweep variants, which see
every batch — the group removed at once in the same sweep (identical to the sum under ``keep``;
under ``renormalize`` it accounts for the shrunken batches). The actual effect is the replayed
removal (same θ_0, batch order and learning rates; S left out of every batch). Replays run in
blocks saved as they finish, each with the key of what made it, so an interrupted run resumes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._data import check_id_groups
from .._errors import ConfigError
from .._io import write_json
from ..config import CONVENTIONS, config_field
from ..groundtruth import replay_removal
from ..report import Report, format_sizes, scatter, winner
from ._common import TaskInputs, TaskState, add_trust, canonical, load_piece, prepare_task, read_ids, write_csv

BLOCK = 10  # groups replayed (side by side) per saved block


@dataclass
class DeleteConfig:
    """Options of ``diffin delete``."""

    method: str = config_field("diffin", "influence method that predicts the effect")
    ids: str | None = config_field(None, "file of id groups (one group per line), or .npy of ids")
    random_groups: int = config_field(50, "number of random groups (when no ids file is given)")
    group_size: int = config_field(10, "size of each random group")
    convention: str = config_field("keep", "removal convention: keep or renormalize",
                                   choices=CONVENTIONS)
    seed: int = config_field(0, "seed of the random groups")

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ConfigError(f"convention must be one of {CONVENTIONS}, got {self.convention!r}")
        if self.ids is None and (self.random_groups < 2 or self.group_size < 1):
            raise ConfigError("need random_groups >= 2 and group_size >= 1 (or an ids file)")


def make_groups(cfg: DeleteConfig, n: int) -> list[np.ndarray]:
    """The groups of ``cfg``: read from its ids file, or random (seeded) groups of ids < n."""
    if cfg.ids is not None:
        groups = read_ids(cfg.ids)
    else:
        if cfg.group_size > n:
            raise ConfigError(f"group_size {cfg.group_size} exceeds the {n} training samples")
        rng = np.random.default_rng(cfg.seed)
        groups = [np.sort(rng.choice(n, size=cfg.group_size, replace=False)) for _ in range(cfg.random_groups)]
    return check_id_groups(groups, n)


def delete(inp: TaskInputs, config: DeleteConfig | None = None, out: str | Path | None = None,
           overwrite: bool = False, progress: bool = True, groups: list[Any] | None = None,
           **options: Any) -> dict[str, Any]:
    """Predict and replay the removal of each group; returns the content of ``delete.json``:
    ``groups`` (per group: ``ids``, ``predicted``, ``actual``), ``pearson``, ``spearman``,
    ``mae`` (loss units), for the primary prediction and each prediction kind."""
    from .._api import score
    from ..metrics import mae, pearson, spearman

    cfg = config if config is not None else DeleteConfig(**options)
    if inp.val is None:
        raise ConfigError("deletion predicts the change of a validation loss: give validation data")
    groups_ = check_id_groups(groups, inp.n_train) if groups is not None else make_groups(cfg, inp.n_train)
    state = prepare_task(inp, "delete", cfg, out, overwrite, progress)
    t0 = time.perf_counter()
    res = score(state.run, inp.model_factory(), inp.loss_fn, train=inp.train, target=inp.val,
                method=cfg.method, convention=cfg.convention, progress=progress, groups=groups_)
    t_score = time.perf_counter() - t0
    s = res.scores.astype(np.float64)
    predictions = {"sum": np.array([s[g].sum() for g in groups_])}
    if res.group_scores is not None:
        predictions["group-sweep"] = res.group_scores.astype(np.float64)
    primary = "group-sweep" if "group-sweep" in predictions else "sum"
    t1 = time.perf_counter()
    actual = _replay_blocks(inp, state, groups_, cfg.convention, progress)
    t_replay = time.perf_counter() - t1
    stats = {k: {"pearson": pearson(p, actual), "spearman": spearman(p, actual), "mae": mae(p, actual)}
             for k, p in predictions.items()}
    result: dict[str, Any] = {
        "setup": inp.description,
        "sizes": inp.sizes or {"train": inp.n_train},
        "method": cfg.method,
        "variant": res.variant,
        "convention": cfg.convention,
        "prediction": primary,
        "groups": [{"ids": g.tolist(), "predicted": float(predictions[primary][k]),
                    **{f"predicted_{n}": float(p[k]) for n, p in predictions.items()},
                    "actual": float(actual[k])} for k, g in enumerate(groups_)],
        **stats[primary],
        "by_prediction": stats,
        "seconds": {"score": t_score, "replay": t_replay},
        "config": asdict(cfg),
        "trust": {cfg.method: res.diagnostics.get("trust")},
    }
    if state.out is not None:
        _write(state.out, result, predictions[primary], actual)
    return result


def _replay_blocks(inp: TaskInputs, state: TaskState, groups: list[np.ndarray], convention: str,
                   progress: bool) -> np.ndarray:
    parts = []
    for b, start in enumerate(range(0, len(groups), BLOCK)):
        block = groups[start : start + BLOCK]
        key = canonical({"run": state.run_id, "train": state.data["train"], "target": state.data["val"],
                         "convention": convention, "groups": [g.tolist() for g in block]})
        path = None if state.out is None else state.out / "replays" / f"block_{b:05d}.json"
        saved = None if path is None else load_piece(path, key)
        if saved is not None and len(saved["actual"]) == len(block):
            parts.append(np.asarray(saved["actual"], dtype=np.float64))
            continue
        arr = replay_removal(state.run, inp.model_factory(), inp.loss_fn, train=inp.train, target=inp.val,
                             remove=[g.tolist() for g in block], convention=convention, progress=progress)
        arr = np.asarray(arr, dtype=np.float64)
        if path is not None:
            write_json(path, {"key": key, "actual": arr.tolist()})
        parts.append(arr)
    return np.concatenate(parts)


def _write(out: Path, result: dict[str, Any], predicted: np.ndarray, actual: np.ndarray) -> None:
    write_json(out / "delete.json", result)
    write_csv(out / "delete.csv", ["group", "size", "predicted", "actual", "ids"],
              [[str(k), str(len(g["ids"])), f"{g['predicted']:.9g}", f"{g['actual']:.9g}",
                " ".join(map(str, g["ids"]))] for k, g in enumerate(result["groups"])])
    scatter(out / "predicted_vs_actual.png", predicted, actual,
            "predicted change of validation loss if removed", "replayed change of validation loss",
            f"{result['method']} ({result['prediction']}): Pearson {result['pearson']:.3f}")
    rep = Report("diffin delete")
    rep.text(f"{result['setup']}. Sizes: {format_sizes(result['sizes'])}. {len(result['groups']):,} groups, "
             f"removal convention `{result['convention']}`; method {result['method']} "
             f"(ran as {result['variant']}).")
    rep.text("Predicted change of the mean validation loss when each group is removed, against the replayed "
             "removal (same θ_0, batch order and learning rates, the group left out of every batch):")
    rep.text(winner({k: v["pearson"] for k, v in result["by_prediction"].items()}, "Pearson")["line"])
    rep.table(["prediction", "Pearson", "Spearman", "MAE (loss units)"],
              [[k, v["pearson"], v["spearman"], v["mae"]] for k, v in result["by_prediction"].items()])
    rep.figure("predicted_vs_actual.png", "predicted against replayed change of the validation loss, per group")
    add_trust(rep, result.get("trust") or {})
    rep.write(out)
