"""Data cleaning (docs/method.md §6): flag the training samples that hurt a trusted validation
loss most (or, without a validation set, those with the largest self-influence), measure how well
that finds known label noise, and retrain without them.

Harm, per method (higher = more suspicious):

* influence methods with a validation set: ``−score`` (score = predicted change of the validation
  loss if removed; a harmful sample's removal lowers it);
* influence methods without one (``no_validation``): the self-influence (how much the sample's own
  loss would rise if removed: memorised, mislabelled samples rise most);
* ``loss``: the training loss at θ_T (for a batch-coupled loss, each pair's share of the loss of the
  training set as one batch, :func:`~._common.losses_at`);
* ``clip-score``: for image–text pairs, minus the cosine of the pair under θ_T (low cosine =
  suspicious, the DataComp filter);
* ``cleanlab``: ``1 − cleanlab.rank.get_label_quality_scores`` on out-of-fold predicted
  probabilities (K-fold retraining with the task's retraining recipe); ``find_label_issues`` is
  reported too.
* ``combined``: the mean over the signals of ``combine`` (default: the loss and TracIn's
  self-influence) of each one's rank percentile (:func:`rank_mean`); a signal is ``loss``,
  ``cleanlab``, an influence method (its harm as above) or ``METHOD-self`` (its self-influence).

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
from scipy.stats import rankdata

from .. import _tree
from .._data import DataSource
from .._errors import ConfigError, MissingExtraError, UnsupportedMethodError
from .._io import write_json
from .._optional import require
from ..config import config_field
from ..estimators.base import Estimator
from ..groundtruth import replay_many
from ..report import Report, format_sizes, image_grid, score_histograms, text_table
from ..trajectory import Trajectory
from ._common import (
    Recipe,
    TaskInputs,
    TaskState,
    add_trust,
    cached_score,
    fraction_count,
    losses_at,
    pair_scores_at,
    prepare_task,
    theta_final,
    write_csv,
)
from ._self import self_scores

RECALL_AT = (0.05, 0.1, 0.2)
COMBINED = "combined"
SELF_SUFFIX = "-self"
CLIP_SCORE = "clip-score"
DEFAULT_BASELINES = "tracin,if-cg,loss,cleanlab,combined"
PAIR_BASELINES = "tracin,clip-score,loss"
"""The baselines of image–text pairs when ``baselines`` is left at its default (cleanlab, if-cg and
the combined detector are classification or per-sample-loss methods)."""


@dataclass
class CleanConfig:
    """Options of ``diffin clean``."""

    method: str = config_field("diffin", "influence method that decides what is flagged")
    fraction: float = config_field(0.1, "fraction of the training set to flag (0, 1]")
    count: int | None = config_field(None, "flag this many samples instead of a fraction")
    no_validation: bool = config_field(False, "rank by self-influence instead of a validation loss")
    retrain: bool = config_field(False, "replay training without the flagged samples and evaluate")
    baselines: str = config_field(DEFAULT_BASELINES, "comma-separated methods to compare detection with (default "
                                  f"for image-text setups: {PAIR_BASELINES})")
    combine: str = config_field("loss,tracin-self", "signals the 'combined' detector averages by rank "
                                "percentile: loss, cleanlab, an influence method or METHOD-self")
    cleanlab_folds: int = config_field(5, "folds of out-of-fold probabilities for cleanlab")
    seed: int = config_field(0, "seed of the random-removal control and cleanlab's folds")

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"count must be >= 1, got {self.count}")
        if self.cleanlab_folds < 2:
            raise ConfigError("cleanlab_folds must be >= 2")
        signals = self.combine_list()
        if not signals or COMBINED in signals:
            raise ConfigError(f"combine must list one or more signals other than {COMBINED!r}, got {self.combine!r}")

    def combine_list(self) -> list[str]:
        return list(dict.fromkeys(c.strip() for c in self.combine.split(",") if c.strip()))

    def method_list(self, pairs: bool = False) -> list[str]:
        """The primary method, then the baselines (``pairs``: image–text data, whose default
        baselines are :data:`PAIR_BASELINES`)."""
        base = PAIR_BASELINES if pairs and self.baselines == DEFAULT_BASELINES else self.baselines
        names = [self.method] + [b.strip() for b in base.split(",") if b.strip()]
        return list(dict.fromkeys(names))


def _self_ranked(cfg: CleanConfig, inp: TaskInputs) -> bool:
    return cfg.no_validation or inp.val is None


def _what(name: str, self_ranked: bool) -> tuple[str, str]:
    """(axis label of the value a method ranks by, short name for captions)."""
    if name == "loss":
        return "training loss at θ_T (more harmful →)", "loss"
    if name == CLIP_SCORE:
        return "CLIP score: cosine of the pair at θ_T (← more suspicious)", "cos"
    if name == "cleanlab":
        return "1 − cleanlab label quality (more harmful →)", "1−quality"
    if name == COMBINED:
        return "mean rank percentile of the combined signals (more harmful →)", "mean rank"
    if self_ranked:
        return "self-influence: own loss rise if removed (more harmful →)", "self-infl."
    return "validation loss change if removed (← more harmful)", "Δval loss"


def _shown(name: str, harm: np.ndarray, self_ranked: bool) -> np.ndarray:
    """The natural value of a method from its harm: influence scores against a validation set
    are −harm; every other harm is shown as is."""
    return -harm if ((name in Estimator.registry and not self_ranked) or name == CLIP_SCORE) else harm


def rank_mean(harms: list[np.ndarray]) -> np.ndarray:
    """The ``combined`` detector: mean over the signals (each (N,), higher = more harmful) of
    their rank percentiles ``rank / N`` (ranks 1..N, ties averaged); (N,) in (0, 1]."""
    return np.mean([rankdata(h) / len(h) for h in harms], axis=0)


def _harm(name: str, inp: TaskInputs, state: TaskState, cfg: CleanConfig, recipe: Recipe | None,
          progress: bool, notes: dict[str, Any]) -> np.ndarray:
    if name == COMBINED:
        return rank_mean([_harm(s, inp, state, cfg, recipe, progress, notes) for s in cfg.combine_list()])
    base = name.removesuffix(SELF_SUFFIX)
    if name.endswith(SELF_SUFFIX) and base in Estimator.registry:
        return self_scores(inp, state, base, progress).astype(np.float64)
    if name == "loss":
        fm, theta, _ = theta_final(inp, state.run)
        return losses_at(fm, theta, inp.train)
    if name == CLIP_SCORE:
        return -pair_scores_at(inp, state.run)
    if name == "cleanlab":
        if recipe is None:
            raise ConfigError("cleanlab's out-of-fold models need a retraining recipe; see the recipe error")
        return _cleanlab_harm(inp, cfg, recipe, notes)
    if name not in Estimator.registry:
        raise ConfigError(f"unknown method {name!r} for cleaning")
    if _self_ranked(cfg, inp):
        return self_scores(inp, state, name, progress).astype(np.float64)
    return -cached_score(inp, state, name, inp.val, progress).astype(np.float64)


def out_of_fold_probs(inp: TaskInputs, recipe: Recipe, folds: int, seed: int) -> np.ndarray:
    """Predicted class probabilities (N, C) of every training sample from a model trained with
    ``recipe`` on the other folds."""
    x, y = inp.train
    N = inp.n_train
    order = np.random.default_rng(seed).permutation(N)
    parts = np.array_split(order, folds)
    probs = np.zeros((N, 0))
    with tempfile.TemporaryDirectory() as tmp:
        for k, held in enumerate(parts):
            keep = np.setdiff1d(order, held)
            model = inp.model_factory()
            recipe.train(model, x, y, Path(tmp) / f"fold{k}", keep, recipe.config.seed, inp.loss_fn)
            model.eval()
            with torch.no_grad():
                xh = x[torch.as_tensor(held)]
                p = model(xh.to(next(model.parameters()).dtype) if xh.is_floating_point() else xh)
                p = p.softmax(1).double().numpy()
            if probs.shape[1] == 0:
                probs = np.zeros((N, p.shape[1]))
            probs[held] = p
    return probs


def _cleanlab_harm(inp: TaskInputs, cfg: CleanConfig, recipe: Recipe, notes: dict[str, Any]) -> np.ndarray:
    find_label_issues = require("cleanlab.filter", "cleanlab", "the cleanlab baseline", "clean").find_label_issues
    quality = require("cleanlab.rank", "cleanlab", "the cleanlab baseline", "clean").get_label_quality_scores
    probs = out_of_fold_probs(inp, recipe, cfg.cleanlab_folds, cfg.seed)
    labels = inp.labels
    issues = find_label_issues(labels, probs)
    notes["cleanlab"] = {"find_label_issues_count": int(issues.sum()), "folds": cfg.cleanlab_folds,
                         "issues_ids": np.flatnonzero(issues).tolist()}
    if inp.flipped is not None:
        notes["cleanlab"]["find_label_issues_precision"] = float(inp.flipped[issues].mean()) if issues.any() else None
        notes["cleanlab"]["find_label_issues_recall"] = float(issues[inp.flipped].mean())
    return 1.0 - quality(labels, probs)


def _retrain(inp: TaskInputs, state: TaskState, flagged: np.ndarray, cfg: CleanConfig) -> dict[str, Any]:
    evalset = inp.test if inp.test is not None else inp.val
    if evalset is None:
        raise ConfigError("retraining needs test (or validation) data to evaluate on")
    which = "test" if inp.test is not None else "val"
    fm, _, run = theta_final(inp, state.run)
    src = DataSource(inp.train, fm.dtype, fm.device)
    traj = Trajectory(run, fm, src)
    rng = np.random.default_rng(cfg.seed + 17)
    groups = {"after": flagged, "random_removal": np.sort(rng.choice(inp.n_train, len(flagged), replace=False))}
    if inp.flipped is not None:
        groups["oracle_removal"] = np.flatnonzero(inp.flipped)
    with torch.no_grad():
        full, thetas = replay_many(traj, list(groups.values()), "renormalize")

    def ev(th: torch.Tensor) -> dict[str, float]:
        res = inp.evaluate(fm.model, *evalset, loss_fn=fm.loss_fn, params=fm.unflatten(th))
        return {f"{which}_{k}": v for k, v in res.items()}

    out: dict[str, Any] = {"evaluated_on": which, "before": ev(full), "n_removed": int(len(flagged))}
    for (name, grp), th in zip(groups.items(), thetas):
        out[name] = ev(th)
        out[name]["n_removed"] = int(len(grp))
    return out


def clean(inp: TaskInputs, config: CleanConfig | None = None, out: str | Path | None = None,
          overwrite: bool = False, progress: bool = True, **options: Any) -> dict[str, Any]:
    """Flag the most harmful training samples; report detection quality and the retrain effect.

    Returns the content of ``clean.json`` (also written into ``out`` with ``clean.csv``,
    ``report.md`` and ``report.html``): ``flagged_ids``, ``detection`` (per method: ``auc``,
    ``recall_at``), ``retrain`` (``before``/``after``: test accuracy and loss), and more.
    ``out`` holding results made from other inputs is refused unless ``overwrite``.
    """
    from ..metrics import detection_auc, recall_at

    cfg = config if config is not None else CleanConfig(**options)
    methods = cfg.method_list(inp.pairs)
    recipe, recipe_error = None, None
    if "cleanlab" in methods or (COMBINED in methods and "cleanlab" in cfg.combine_list()):
        try:
            recipe = inp.recipe()
        except ConfigError as e:
            if cfg.method == "cleanlab":
                raise
            recipe_error = str(e)
    state = prepare_task(inp, "clean", cfg, out, overwrite, progress, recipe)
    t0 = time.perf_counter()
    k = fraction_count(inp.n_train, None if cfg.count else cfg.fraction, cfg.count, "flag")
    notes: dict[str, Any] = {}
    harms: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}
    errors: dict[str, str] = {"cleanlab": recipe_error} if recipe_error else {}
    for name in methods:
        if name in errors:
            continue
        t = time.perf_counter()
        try:
            harms[name] = _harm(name, inp, state, cfg, recipe, progress, notes)
        except (ConfigError, MissingExtraError, UnsupportedMethodError) as e:
            if name == cfg.method:
                raise
            errors[name] = str(e)
            continue
        timing[name] = time.perf_counter() - t
    primary = harms[cfg.method]
    flagged = np.sort(np.argsort(-primary, kind="stable")[:k])
    self_ranked = _self_ranked(cfg, inp)
    result: dict[str, Any] = {
        "setup": inp.description,
        "sizes": inp.sizes or {"train": inp.n_train},
        "method": cfg.method,
        "ranking": "self-influence" if self_ranked else "validation loss",
        "n_flagged": int(k),
        "flagged_ids": flagged.tolist(),
        "seconds": timing,
        "errors": errors,
        **notes,
    }
    if recipe is not None:
        result["recipe"] = {"description": recipe.describe(), **recipe.to_json()}
    if inp.flipped is not None:
        result["n_flipped"] = int(inp.flipped.sum())
        result["corrupted"] = "mismatched pairs" if inp.pairs else "flipped labels"
        result["flagged_precision"] = float(inp.flipped[flagged].mean())
        result["detection"] = {
            name: {"auc": detection_auc(-h, inp.flipped),
                   "recall_at": {str(f): r for f, r in recall_at(-h, inp.flipped, RECALL_AT).items()}}
            for name, h in harms.items()
        }
    if cfg.retrain:
        result["retrain"] = _retrain(inp, state, flagged, cfg)
    result["total_seconds"] = time.perf_counter() - t0
    result["config"] = asdict(cfg)
    result["trust"] = dict(state.trust)
    if state.out is not None:
        _write(state.out, inp, result, harms, flagged, self_ranked)
    return result


def _detection_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    rows = [[m, d["auc"], *d["recall_at"].values()] for m, d in result["detection"].items()]
    return ["method", "ROC-AUC", *[f"recall @{float(f):.0%}" for f in RECALL_AT]], rows


def _retrain_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    r = result["retrain"]
    keys = list(r["before"])
    rows = [[n.replace("_", " "), *[r[n][k] for k in keys]]
            for n in ("before", "after", "random_removal", "oracle_removal") if n in r]
    return ["run", *[k.replace("_", " ") for k in keys]], rows


def summary_text(result: dict[str, Any]) -> str:
    """Terminal tables: detection per method and the retrain effect."""
    parts = [f"flagged {result['n_flagged']:,} samples by {result['method']} ({result['ranking']})"]
    if "detection" in result:
        parts += [f"\nfinding the {result['n_flipped']:,} {result.get('corrupted', 'flipped labels')}:\n",
                  text_table(*_detection_table(result))]
    if "retrain" in result:
        parts += ["\nretrained without the flagged samples (same θ_0 and batch order):\n",
                  text_table(*_retrain_table(result))]
    for name, err in result.get("errors", {}).items():
        parts.append(f"\n{name} did not run: {err}")
    return "\n".join(parts)


def _write(out: Path, inp: TaskInputs, result: dict[str, Any], harms: dict[str, np.ndarray],
           flagged: np.ndarray, self_ranked: bool) -> None:
    write_json(out / "clean.json", result)
    labels = inp.labels
    is_flagged = np.zeros(inp.n_train, dtype=bool)
    is_flagged[flagged] = True
    true = inp.clean_labels.numpy() if inp.clean_labels is not None else None
    known = inp.flipped is not None and true is not None
    corrupt = "mismatched" if inp.pairs else "flipped"
    header = (["id", "label"] + (["caption"] if inp.texts is not None else [])
              + (["true_label", corrupt] if known else []) + [f"harm_{m}" for m in harms] + ["flagged"])
    rows = []
    for i in range(inp.n_train):
        row = [str(i), str(labels[i])] + ([inp.texts[i]] if inp.texts is not None else [])
        if known:
            row += [str(true[i]), str(int(inp.flipped[i]))]  # type: ignore[index]
        rows.append(row + [f"{harms[m][i]:.9g}" for m in harms] + [str(int(is_flagged[i]))])
    write_csv(out / "clean.csv", header, rows)

    rep = Report("diffin clean")
    rep.text(f"{result['setup']}. Sizes: {format_sizes(result['sizes'])}.")
    rep.text(f"Flagged the {result['n_flagged']:,} samples with the highest harm by **{result['method']}** "
             f"(ranked by {result['ranking']}).")
    if "recipe" in result:
        rep.text(f"Retraining recipe of cleanlab's out-of-fold models: {result['recipe']['description']}.")
    if "detection" in result:
        rep.heading(f"Finding the {result['n_flipped']:,} {result.get('corrupted', 'flipped labels')}")
        rep.table(*_detection_table(result))
        shown = {m: _shown(m, h, self_ranked) for m, h in harms.items()}
        score_histograms(out / "harm_histograms.png", shown, inp.flipped,  # type: ignore[arg-type]
                         {m: _what(m, self_ranked)[0] for m in harms})
        rep.figure("harm_histograms.png", "what each method ranks by, clean and "
                   + ("mismatched pairs" if inp.pairs else "flipped samples"))
    if "retrain" in result:
        rep.heading("Retraining without the flagged samples")
        rep.text("Same θ_0, batch order and learning rates; flagged samples left out of every batch.")
        rep.table(*_retrain_table(result))
    if result.get("errors"):
        rep.heading("Methods that did not run")
        for name, err in result["errors"].items():
            rep.text(f"**{name}**: {err}")
    images = _tree.leaves(inp.train[0])[0]  # the images: the inputs, or their first part (image-text pairs)
    side = int(round(images[0].numel() ** 0.5))
    if side * side == images[0].numel() and side >= 8:
        m = result["method"]
        label, short = _what(m, self_ranked)
        values = _shown(m, harms[m], self_ranked)
        worst = np.argsort(-harms[m], kind="stable")[:25]
        if inp.texts is not None:
            caps = [f"#{i} digit {labels[i]}" + (" MISMATCHED" if known and inp.flipped[i] else "")  # type: ignore[index]
                    + f"\n'{inp.texts[i]}'\n{short} {values[i]:.3g}" for i in worst]
        else:
            caps = [f"#{i} label {labels[i]}"
                    + (f" (true {true[i]})" if true is not None and true[i] != labels[i] else "")
                    + f"\n{short} {values[i]:.3g}" for i in worst]
        image_grid(out / "most_harmful.png", images[worst].reshape(len(worst), -1).detach().cpu().numpy(), caps, side,
                   f"{len(worst)} most harmful by {m}: {label.split(' (')[0]}")
        rep.figure("most_harmful.png", f"the {len(worst)} most harmful training samples by {m}, with their values")
    add_trust(rep, result.get("trust") or {})
    rep.write(out)
