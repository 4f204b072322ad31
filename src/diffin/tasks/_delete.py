"""Data deletion (METHOD.md section 6): predict what removing groups of records does to the
target, then check it by replaying each removal.

Predictions per group S: the sum of the members' scores, and — for the sweep variants, which see
every batch — the group removed at once in the same sweep (identical to the sum under ``keep``;
under ``renormalize`` it accounts for the shrunken batches). The actual effect is the replayed
removal (same θ_0, batch order and learning rates; S left out of every batch). Replays run in
blocks saved as they finish, so an interrupted run resumes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import ConfigError
from .._io import write_json, write_npy, write_text
from ..config import CONVENTIONS
from ..groundtruth import replay_removal
from ..metrics import mae, pearson, spearman
from ..report import markdown_table, scatter
from ._common import TaskInputs, check_ids, config_field, prepare_out, read_ids

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
    if cfg.ids is not None:
        groups = read_ids(cfg.ids)
    else:
        if cfg.group_size > n:
            raise ConfigError(f"group_size {cfg.group_size} exceeds the {n} training samples")
        rng = np.random.default_rng(cfg.seed)
        groups = [np.sort(rng.choice(n, size=cfg.group_size, replace=False)) for _ in range(cfg.random_groups)]
    check_ids(groups, n)
    return groups


def delete(inp: TaskInputs, config: DeleteConfig | None = None, out: str | Path | None = None,
           overwrite: bool = False, progress: bool = True, groups: list[Any] | None = None,
           **options: Any) -> dict[str, Any]:
    """Predict and replay the removal of each group; returns the content of ``delete.json``:
    ``groups`` (per group: ``ids``, ``predicted``, ``actual``), ``pearson``, ``spearman``,
    ``mae`` (loss units), for the primary prediction and each prediction kind."""
    from .._api import score

    cfg = config if config is not None else DeleteConfig(**options)
    outp = prepare_out(Path(out) if out is not None else None, cfg, overwrite)
    if inp.val is None:
        raise ConfigError("deletion predicts the change of a validation loss: give validation data")
    groups_ = [np.asarray(g, dtype=np.int64) for g in groups] if groups is not None else \
        make_groups(cfg, inp.n_train)
    check_ids(groups_, inp.n_train)
    t0 = time.perf_counter()
    res = score(inp.run, inp.model_factory(), inp.loss_fn, train=inp.train, target=inp.val,
                method=cfg.method, convention=cfg.convention, progress=progress, groups=groups_)
    t_score = time.perf_counter() - t0
    s = res.scores.astype(np.float64)
    predictions = {"sum": np.array([s[np.unique(g)].sum() for g in groups_])}
    if res.group_scores is not None:
        predictions["group-sweep"] = res.group_scores.astype(np.float64)
    primary = "group-sweep" if "group-sweep" in predictions else "sum"
    t1 = time.perf_counter()
    actual = _replay_blocks(inp, groups_, cfg.convention, outp, progress)
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
    }
    if outp is not None:
        _write(outp, result, predictions[primary], actual)
    return result


def _replay_blocks(inp: TaskInputs, groups: list[np.ndarray], convention: str, out: Path | None,
                   progress: bool) -> np.ndarray:
    parts = []
    for b, start in enumerate(range(0, len(groups), BLOCK)):
        path = None if out is None else out / "replays" / f"block_{b:05d}.npy"
        block = groups[start : start + BLOCK]
        if path is not None and path.exists():
            arr = np.load(path, allow_pickle=False)
            if arr.shape == (len(block),):
                parts.append(arr)
                continue
        arr = replay_removal(inp.run, inp.model_factory(), inp.loss_fn, train=inp.train, target=inp.val,
                             remove=[list(g) for g in block], convention=convention, progress=progress)
        arr = np.asarray(arr, dtype=np.float64)
        if path is not None:
            write_npy(path, arr)
        parts.append(arr)
    return np.concatenate(parts)


def _write(out: Path, result: dict[str, Any], predicted: np.ndarray, actual: np.ndarray) -> None:
    write_json(out / "delete.json", result)
    lines = ["group,size,predicted,actual,ids"]
    for k, g in enumerate(result["groups"]):
        lines.append(f"{k},{len(g['ids'])},{g['predicted']:.9g},{g['actual']:.9g},"
                     + " ".join(map(str, g["ids"])))
    write_text(out / "delete.csv", "\n".join(lines) + "\n")
    scatter(out / "predicted_vs_actual.png", predicted, actual, "predicted change of validation loss",
            "replayed change", f"{result['method']} ({result['prediction']}): "
            f"Pearson {result['pearson']:.3f}")
    rows = [[k, v["pearson"], v["spearman"], v["mae"]] for k, v in result["by_prediction"].items()]
    write_text(out / "report.md", f"""# diffin delete

{result['setup']}. Sizes: {result['sizes']}. {len(result['groups'])} groups, removal convention
`{result['convention']}`; method {result['method']} (ran as {result['variant']}).

Predicted change of the mean validation loss when each group is removed, against the replayed
removal (same θ_0, batch order and learning rates, the group left out of every batch):

{markdown_table(["prediction", "Pearson", "Spearman", "MAE (loss units)"], rows)}

![predicted vs actual](predicted_vs_actual.png)
""")
