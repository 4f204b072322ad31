"""Data cleaning (METHOD.md section 6): flag the training samples that hurt a trusted validation
loss most (or, without a validation set, those with the largest self-influence), measure how well
that finds known label noise, and retrain without them.

Harm, per method (higher = more suspicious):

* influence methods with a validation set: ``−score`` (score = predicted change of the validation
  loss if removed; a harmful sample's removal lowers it);
* influence methods without one (``no_validation``): the self-influence (how much the sample's own
  loss would rise if removed: memorised, mislabelled samples rise most);
* ``loss``: the training loss at θ_T;
* ``cleanlab``: ``1 − cleanlab.rank.get_label_quality_scores`` on out-of-fold predicted
  probabilities (K-fold retraining with the same recipe); ``find_label_issues`` is reported too.

Retraining replays the recorded batch order and learning rates with the flagged samples left out
of every batch (each batch renormalised over what remains), from the same θ_0: the change in test
accuracy is the effect of the removal alone. A random removal of the same size, and the removal of
the truly flipped samples (when known), are replayed beside it as control and ceiling.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._data import DataSource
from .._errors import ConfigError
from .._io import write_json, write_text
from ..builtin.trainer import train as train_builtin
from ..config import ScoreConfig
from ..estimators.base import Estimator, ScoringContext
from ..groundtruth import replay_many
from ..metrics import detection_auc, recall_at
from ..report import image_grid, markdown_table, score_histograms, text_table
from ..targets import MeanLoss
from ._common import (
    TaskInputs,
    cached_score,
    config_field,
    evaluate_theta,
    fraction_count,
    prepare_out,
    theta_final,
)

RECALL_AT = (0.05, 0.1, 0.2)


@dataclass
class CleanConfig:
    """Options of ``diffin clean``."""

    method: str = config_field("diffin", "influence method that decides what is flagged")
    fraction: float = config_field(0.1, "fraction of the training set to flag (0, 1]")
    count: int | None = config_field(None, "flag this many samples instead of a fraction")
    no_validation: bool = config_field(False, "rank by self-influence instead of a validation loss")
    retrain: bool = config_field(False, "replay training without the flagged samples and evaluate")
    baselines: str = config_field("tracin,if-cg,loss,cleanlab",
                                  "comma-separated methods to compare detection with")
    cleanlab_folds: int = config_field(5, "folds of out-of-fold probabilities for cleanlab")
    seed: int = config_field(0, "seed of the random-removal control and cleanlab's folds")

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"count must be >= 1, got {self.count}")
        if self.cleanlab_folds < 2:
            raise ConfigError("cleanlab_folds must be >= 2")

    def method_list(self) -> list[str]:
        names = [self.method] + [b.strip() for b in self.baselines.split(",") if b.strip()]
        return list(dict.fromkeys(names))


def _harm(name: str, inp: TaskInputs, cfg: CleanConfig, out: Path | None, progress: bool,
          notes: dict[str, Any]) -> np.ndarray:
    if name == "loss":
        fm, theta, _ = theta_final(inp)
        with torch.no_grad():
            x, y = inp.train
            return torch.cat([fm.losses(theta, x[s : s + 2048], y[s : s + 2048])
                              for s in range(0, inp.n_train, 2048)]).double().numpy()
    if name == "cleanlab":
        return _cleanlab_harm(inp, cfg, notes)
    if name not in Estimator.registry:
        raise ConfigError(f"unknown method {name!r} for cleaning")
    if cfg.no_validation or inp.val is None:
        return cached_score(inp, name, "self", out, progress).scores.astype(np.float64)
    return -cached_score(inp, name, inp.val, out, progress).scores.astype(np.float64)


def out_of_fold_probs(inp: TaskInputs, folds: int, seed: int) -> np.ndarray:
    """Predicted class probabilities of every training sample from a model trained on the other
    folds with the run's recipe (``inp.train_config``): (N, C)."""
    if inp.train_config is None:
        raise ConfigError("out-of-fold probabilities need a training recipe (TaskInputs.train_config)")
    x, y = inp.train
    N = inp.n_train
    order = np.random.default_rng(seed).permutation(N)
    parts = np.array_split(order, folds)
    probs = np.zeros((N, 0))
    with tempfile.TemporaryDirectory() as tmp:
        for k, held in enumerate(parts):
            keep = np.setdiff1d(order, held)
            model = inp.model_factory()
            train_builtin(model, x, y, inp.train_config, Path(tmp) / f"fold{k}", keep=keep, overwrite=True)
            model.eval()
            with torch.no_grad():
                p = model(x[torch.as_tensor(held)]).softmax(1).double().numpy()
            if probs.shape[1] == 0:
                probs = np.zeros((N, p.shape[1]))
            probs[held] = p
    return probs


def _cleanlab_harm(inp: TaskInputs, cfg: CleanConfig, notes: dict[str, Any]) -> np.ndarray:
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError as e:
        raise ConfigError("cleanlab is not installed: pip install 'diffin[clean]'") from e
    probs = out_of_fold_probs(inp, cfg.cleanlab_folds, cfg.seed)
    labels = inp.labels
    issues = find_label_issues(labels, probs)
    notes["cleanlab"] = {"find_label_issues_count": int(issues.sum()), "folds": cfg.cleanlab_folds,
                         "issues_ids": np.flatnonzero(issues).tolist()}
    if inp.flipped is not None:
        notes["cleanlab"]["find_label_issues_precision"] = float(inp.flipped[issues].mean()) if issues.any() else None
        notes["cleanlab"]["find_label_issues_recall"] = float(issues[inp.flipped].mean())
    return 1.0 - get_label_quality_scores(labels, probs)


def _retrain(inp: TaskInputs, flagged: np.ndarray, cfg: CleanConfig) -> dict[str, Any]:
    fm, _, run = theta_final(inp)
    src = DataSource(inp.train, fm.dtype, fm.device)
    ctx = ScoringContext(run, fm, src, MeanLoss(src), ScoreConfig(), progress=False)
    rng = np.random.default_rng(cfg.seed + 17)
    groups = {"after": flagged, "random_removal": np.sort(rng.choice(inp.n_train, len(flagged), replace=False))}
    if inp.flipped is not None:
        groups["oracle_removal"] = np.flatnonzero(inp.flipped)
    with torch.no_grad():
        full, thetas = replay_many(ctx, list(groups.values()), "renormalize")
    evalset = inp.test if inp.test is not None else inp.val
    if evalset is None:
        raise ConfigError("retraining needs test (or validation) data to evaluate on")
    which = "test" if inp.test is not None else "val"

    def ev(th: torch.Tensor) -> dict[str, float]:
        r = evaluate_theta(fm, th, evalset)
        return {f"{which}_{k}": v for k, v in r.items()}

    out: dict[str, Any] = {"evaluated_on": which, "before": ev(full), "n_removed": int(len(flagged))}
    for (name, grp), th in zip(groups.items(), thetas):
        out[name] = ev(th)
        out[name]["n_removed"] = int(len(grp))
    return out


def clean(inp: TaskInputs, config: CleanConfig | None = None, out: str | Path | None = None,
          overwrite: bool = False, progress: bool = True, **options: Any) -> dict[str, Any]:
    """Flag the most harmful training samples; report detection quality and the retrain effect.

    Returns the content of ``clean.json`` (also written into ``out`` with ``clean.csv`` and
    ``report.md``): ``flagged_ids``, ``detection`` (per method: ``auc``, ``recall_at``),
    ``retrain`` (``before``/``after``: test accuracy and loss), and more.
    """
    cfg = config if config is not None else CleanConfig(**options)
    outp = prepare_out(Path(out) if out is not None else None, cfg, overwrite)
    t0 = time.perf_counter()
    k = fraction_count(inp.n_train, None if cfg.count else cfg.fraction, cfg.count, "flag")
    notes: dict[str, Any] = {}
    harms: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name in cfg.method_list():
        t = time.perf_counter()
        try:
            harms[name] = _harm(name, inp, cfg, outp, progress, notes)
        except ConfigError as e:
            if name == cfg.method:
                raise
            errors[name] = str(e)
            continue
        timing[name] = time.perf_counter() - t
    primary = harms[cfg.method]
    flagged = np.sort(np.argsort(-primary, kind="stable")[:k])
    result: dict[str, Any] = {
        "setup": inp.description,
        "sizes": inp.sizes or {"train": inp.n_train},
        "method": cfg.method,
        "ranking": "self-influence" if (cfg.no_validation or inp.val is None) else "validation loss",
        "n_flagged": int(k),
        "flagged_ids": flagged.tolist(),
        "seconds": timing,
        "errors": errors,
        **notes,
    }
    if inp.flipped is not None:
        result["n_flipped"] = int(inp.flipped.sum())
        result["flagged_precision"] = float(inp.flipped[flagged].mean())
        result["detection"] = {
            name: {"auc": detection_auc(-h, inp.flipped),
                   "recall_at": {str(f): r for f, r in recall_at(-h, inp.flipped, RECALL_AT).items()}}
            for name, h in harms.items()
        }
    if cfg.retrain:
        result["retrain"] = _retrain(inp, flagged, cfg)
    result["total_seconds"] = time.perf_counter() - t0
    result["config"] = asdict(cfg)
    if outp is not None:
        _write(outp, inp, result, harms, flagged)
    return result


def summary_text(result: dict[str, Any]) -> str:
    """Terminal tables: detection per method and the retrain effect."""
    parts = [f"flagged {result['n_flagged']} samples by {result['method']} ({result['ranking']})"]
    if "detection" in result:
        rows = [[m, d["auc"], *d["recall_at"].values()] for m, d in result["detection"].items()]
        header = ["method", "ROC-AUC", *[f"recall @{float(f):.0%}" for f in RECALL_AT]]
        parts += [f"\nfinding the {result['n_flipped']} flipped labels:\n", text_table(header, rows)]
    if "retrain" in result:
        r = result["retrain"]
        keys = list(r["before"])
        rows = [[n, *[r[n][k] for k in keys]] for n in ("before", "after", "random_removal",
                                                        "oracle_removal") if n in r]
        parts += ["\nretrained without the flagged samples (same θ_0 and batch order):\n",
                  text_table(["run", *keys], rows)]
    return "\n".join(parts)


def _write(out: Path, inp: TaskInputs, result: dict[str, Any], harms: dict[str, np.ndarray],
           flagged: np.ndarray) -> None:
    write_json(out / "clean.json", result)
    labels = inp.labels
    is_flagged = np.zeros(inp.n_train, dtype=bool)
    is_flagged[flagged] = True
    cols = ["id", "label"] + (["true_label", "flipped"] if inp.flipped is not None else []) + \
        [f"harm_{m}" for m in harms] + ["flagged"]
    lines = [",".join(cols)]
    true = inp.clean_labels.numpy() if inp.clean_labels is not None else None
    for i in range(inp.n_train):
        row = [str(i), str(labels[i])]
        if inp.flipped is not None and true is not None:
            row += [str(true[i]), str(int(inp.flipped[i]))]
        row += [f"{harms[m][i]:.9g}" for m in harms] + [str(int(is_flagged[i]))]
        lines.append(",".join(row))
    write_text(out / "clean.csv", "\n".join(lines) + "\n")
    text = [f"# diffin clean\n\n{result['setup']}. Sizes: {result['sizes']}.\n",
            f"Flagged the {result['n_flagged']} samples with the highest harm by **{result['method']}** "
            f"(ranked by {result['ranking']}).\n"]
    if "detection" in result:
        rows = [[m, d["auc"], *d["recall_at"].values()] for m, d in result["detection"].items()]
        header = ["method", "ROC-AUC", *[f"recall @{float(f):.0%}" for f in RECALL_AT]]
        text.append(f"## Finding the {result['n_flipped']} flipped labels\n\n{markdown_table(header, rows)}\n")
        score_histograms(out / "harm_histograms.png", {m: -h for m, h in harms.items()}, inp.flipped)
        text.append("![harm](harm_histograms.png)\n\n(x axis: −harm; flipped samples should sit left.)\n")
    if "retrain" in result:
        r = result["retrain"]
        keys = [k for k in r["before"]]
        rows = [[name, *[r[name][k] for k in keys]] for name in
                ("before", "after", "random_removal", "oracle_removal") if name in r]
        text.append("## Retraining without the flagged samples\n\nSame θ_0, batch order and learning "
                    "rates; flagged samples left out of every batch.\n\n"
                    + markdown_table(["run", *keys], rows) + "\n")
    side = int(round(inp.train[0][0].numel() ** 0.5))
    if side * side == inp.train[0][0].numel() and side >= 8:
        worst = np.argsort(-harms[result["method"]], kind="stable")[:25]
        caps = [f"#{i} label {labels[i]}" + (f" / true {inp.clean_labels[i].item()}"
                                              if inp.clean_labels is not None else "") for i in worst]
        image_grid(out / "most_harmful.png", inp.train[0][worst].numpy(), caps, side,
                   f"25 most harmful by {result['method']}")
        text.append("![most harmful](most_harmful.png)\n")
    write_text(out / "report.md", "\n".join(text))
