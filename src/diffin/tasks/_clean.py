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
* ``aum``, ``el2n``, ``forgetting``: minus the area under the margin (Pleiss et al. 2020), EL2N
  at an early checkpoint, forgetting events (:mod:`._heuristics`; each replayed from the run);
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

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from .. import _tree
from .._errors import ConfigError, MissingExtraError, UnsupportedMethodError
from .._io import write_json
from .._optional import require
from ..config import ScoreConfig, config_field
from ..estimators.base import Estimator
from ..report import Report, format_sizes, image_grid, score_histograms, text_table, winner
from ._classes import class_harm
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
from ._heuristics import importance
from ._removal import estimate_seconds, heldout_split, removal_sets, replay_without, retrain_fresh
from ._self import self_scores

RECALL_AT = (0.05, 0.1, 0.2)
ADVICE_MARGIN = 0.01
"""A method whose ROC-AUC on the run exceeds the chosen method's by this much is offered in one line."""
COMBINED = "combined"
RANK_MEAN_SEP = "+"
"""``A+B``: the rank mean (:func:`rank_mean`) of the harms of methods A and B (e.g. ``tracin-classes+cleanlab``)."""
AUTO = "auto"
AUTO_DETECTOR = "diffin-classes+tracin-classes+cleanlab"
"""What ``method="auto"`` flags by when the validation set has class labels and a retraining recipe is known: the
rank mean of per-class validation influence by Diff-In's exact sweep and by TracIn, and cleanlab (measured in
BENCHMARKS.md, "Removal that beats the best baseline": the only detector measured that clears the issue-23 bar on
detection and on removal, docs/method.md §6); otherwise :data:`AUTO_DETECTOR_NO_RECIPE` or ``diffin``."""
AUTO_DETECTOR_NO_RECIPE = "tracin-classes"
"""``method="auto"`` with a class-labelled validation set but no retraining recipe (cleanlab cannot run)."""
SELF_SUFFIX = "-self"
CLASSES_SUFFIX = "-classes"
"""``METHOD-classes``: the method's influence on each class of the validation set (one score column per
class), each sample ranked by the class it harms most (:func:`class_harm`)."""
CLIP_SCORE = "clip-score"
DEFAULT_BASELINES = "tracin,tracin-self,loss,aum,el2n,forgetting,cleanlab,combined"
"""Every default baseline costs at most a few trainings' worth (cleanlab: ``cleanlab_folds`` of them; AUM and
forgetting: one replay; TracIn: per-sample gradients at the checkpoints)."""
HEURISTIC_SIGNALS = ("aum", "el2n", "forgetting")
"""Signals of :mod:`._heuristics` that rank mislabelled samples high (AUM by its minus)."""
COSTLY = ("if-cg", "if-lissa")
"""Opt-in methods whose cost grows with full-data Hessian–vector products: their time is
estimated (one measured HVP times the iterations) and printed before they run."""
PAIR_BASELINES = "tracin,clip-score,loss"
"""The baselines of image–text pairs when ``baselines`` is left at its default (cleanlab, if-cg and
the combined detector are classification or per-sample-loss methods)."""


@dataclass
class CleanConfig:
    """Options of ``diffin clean``."""

    method: str = config_field(AUTO, "method that decides what is flagged: 'auto' (with a class-labelled validation "
                               f"set {AUTO_DETECTOR} when a retraining recipe is known, else "
                               f"{AUTO_DETECTOR_NO_RECIPE}; without one diffin), an influence method, METHOD-classes, "
                               "METHOD-self, a baseline name, or A+B (the rank mean of A and B)")
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
    horizon: str = config_field("best-val", "where METHOD-classes scores the run: 'best-val' (the checkpoint with the "
                                "lowest validation loss, before the labels are memorised), 'end', or a checkpoint step")
    retrain_seeds: int = config_field(0, "also train from scratch with the retraining recipe, this many seeds, "
                                      "without each detection method's flagged samples (and a random and the "
                                      "oracle removal): test accuracy per method, mean over the seeds")

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"count must be >= 1, got {self.count}")
        if self.horizon not in ("best-val", "end") and not self.horizon.isdigit():
            raise ConfigError(f"horizon must be 'best-val', 'end' or a checkpoint step, got {self.horizon!r}")
        if self.retrain_seeds < 0:
            raise ConfigError(f"retrain_seeds must be >= 0, got {self.retrain_seeds}")
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
        out: list[str] = []
        for n in names:  # a rank mean's parts are scored (and reported) before it
            out += [*(parts(n) if RANK_MEAN_SEP in n else []), n]
        return list(dict.fromkeys(out))


def auto_method(inp: TaskInputs, cfg: CleanConfig) -> str:
    """``method="auto"``: :data:`AUTO_DETECTOR` when ranking against a validation set with integer
    class labels (classification, not image–text pairs) and a retraining recipe is known (cleanlab's
    out-of-fold models need one); :data:`AUTO_DETECTOR_NO_RECIPE` with such a validation set but no
    recipe; else ``diffin``."""
    classes = (inp.val is not None and not inp.pairs and isinstance(inp.val[1], torch.Tensor)
               and inp.val[1].ndim == 1 and not inp.val[1].is_floating_point())
    if not classes or cfg.no_validation:
        return "diffin"
    try:
        inp.recipe()
    except ConfigError:
        return AUTO_DETECTOR_NO_RECIPE
    return AUTO_DETECTOR


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
    if name == "aum":
        return "area under the margin, logits (← more suspicious)", "AUM"
    if name == "el2n":
        return "EL2N at an early checkpoint (more harmful →)", "EL2N"
    if name == "forgetting":
        return "forgetting events (more harmful →)", "forgets"
    if name.endswith(CLASSES_SUFFIX):
        return "highest harm percentile over the validation classes (more harmful →)", "class harm"
    if name == COMBINED or RANK_MEAN_SEP in name:
        return "mean rank percentile of the combined signals (more harmful →)", "mean rank"
    if self_ranked:
        return "self-influence: own loss rise if removed (more harmful →)", "self-infl."
    return "validation loss change if removed (← more harmful)", "Δval loss"


def _shown(name: str, harm: np.ndarray, self_ranked: bool) -> np.ndarray:
    """The natural value of a method from its harm: influence scores against a validation set
    are −harm; every other harm is shown as is."""
    return -harm if ((name in Estimator.registry and not self_ranked) or name in (CLIP_SCORE, "aum")) else harm


def rank_mean(harms: list[np.ndarray]) -> np.ndarray:
    """The ``combined`` detector: mean over the signals (each (N,), higher = more harmful) of
    their rank percentiles ``rank / N`` (ranks 1..N, ties averaged); (N,) in (0, 1]."""
    return np.mean([rankdata(h) / len(h) for h in harms], axis=0)


def parts(name: str) -> list[str]:
    """The signals a rank-mean name ``A+B[+C]`` averages (``[name]`` for a single signal)."""
    return [p for p in name.split(RANK_MEAN_SEP) if p] if RANK_MEAN_SEP in name else [name]


def _harm(name: str, inp: TaskInputs, state: TaskState, cfg: CleanConfig, recipe: Recipe | None,
          progress: bool, notes: dict[str, Any], done: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Harm (N,) of one method, higher = more suspicious; ``done``: harms already computed by name
    (a rank mean reuses them and stores its parts there)."""
    done = {} if done is None else done
    if name in done:
        return done[name]
    if name == COMBINED or RANK_MEAN_SEP in name:
        signals = cfg.combine_list() if name == COMBINED else parts(name)
        hs = []
        for s in signals:
            if s not in done:
                done[s] = _harm(s, inp, state, cfg, recipe, progress, notes, done)
            hs.append(done[s])
        return rank_mean(hs)
    if name.endswith(CLASSES_SUFFIX) and name.removesuffix(CLASSES_SUFFIX) in Estimator.registry:
        return class_harm(name.removesuffix(CLASSES_SUFFIX), inp, state, cfg.horizon, progress, notes)
    base = name.removesuffix(SELF_SUFFIX)
    if name.endswith(SELF_SUFFIX) and base in Estimator.registry:
        return self_scores(inp, state, base, progress).astype(np.float64)
    if name == "loss":
        fm, theta, _ = theta_final(inp, state.run)
        return losses_at(fm, theta, inp.train)
    if name == CLIP_SCORE:
        return -pair_scores_at(inp, state.run)
    if name in HEURISTIC_SIGNALS:
        return importance(name, inp, run=state.run)
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


def clean(inp: TaskInputs, config: CleanConfig | None = None, out: str | Path | None = None,
          overwrite: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
          **options: Any) -> dict[str, Any]:
    """Flag the most harmful training samples; report detection quality and the retrain effect.

    Returns the content of ``clean.json`` (also written into ``out`` with ``clean.csv``,
    ``report.md`` and ``report.html``): ``flagged_ids``, ``detection`` (per method: ``auc``,
    ``recall_at``), ``winner`` (the best detector and its lead, when the corrupted ids are known),
    ``advice`` (a one-line hint when another method finds them better than ``method``),
    ``retrain`` (``before``/``after``: test accuracy and loss of the replayed run),
    ``retrain_fresh`` (with ``retrain_seeds``: per method, the test accuracy of models trained from
    scratch without its flags), and more. Before/after numbers are measured on the test set, or,
    without one, on a held-out half of the validation set (the other half is then the target of
    validation-influence methods). ``log`` (e.g. ``print``) receives the time estimates of costly
    methods before they run. ``out`` holding results made from other inputs is refused unless
    ``overwrite``.
    """
    from ..metrics import detection_auc, recall_at

    cfg = config if config is not None else CleanConfig(**options)
    if cfg.method == AUTO:
        cfg = dataclasses.replace(cfg, method=auto_method(inp, cfg))
    say = log or (lambda _msg: None)
    methods = cfg.method_list(inp.pairs)
    which = "test"
    if cfg.retrain or cfg.retrain_seeds:
        inp, which = heldout_split(inp, cfg.seed)
    recipe, recipe_error = None, None
    if cfg.retrain_seeds or "cleanlab" in methods or (COMBINED in methods and "cleanlab" in cfg.combine_list()):
        try:
            recipe = inp.recipe()
        except ConfigError as e:
            if cfg.method == "cleanlab" or cfg.retrain_seeds:
                raise
            recipe_error = str(e)
    state = prepare_task(inp, "clean", cfg, out, overwrite, progress, recipe)
    t0 = time.perf_counter()
    k = fraction_count(inp.n_train, None if cfg.count else cfg.fraction, cfg.count, "flag")
    notes: dict[str, Any] = {}
    harms: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}
    estimates: dict[str, float] = {}
    errors: dict[str, str] = {"cleanlab": recipe_error} if recipe_error else {}
    for name in methods:
        if name in errors:
            continue
        if name in COSTLY:
            secs, how = estimate_seconds(name, inp, state, ScoreConfig(method=name))
            estimates[name] = secs
            say(f"{name}: about {secs:,.0f} s ({how}); leave it out of --baselines to skip it")
        t = time.perf_counter()
        try:
            harms[name] = _harm(name, inp, state, cfg, recipe, progress, notes, dict(harms))
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
        "estimated_seconds": estimates,
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
        aucs = {m: d["auc"] for m, d in result["detection"].items()}
        result["winner"] = winner(aucs, "ROC-AUC")
        best = result["winner"]["method"]
        if best != cfg.method and aucs[best] - aucs[cfg.method] >= ADVICE_MARGIN:
            result["advice"] = (f"{best} finds the {result['corrupted']} better on this run (ROC-AUC {aucs[best]:.3f} "
                                f"against {aucs[cfg.method]:.3f} by {cfg.method}): rerun with --method {best} to "
                                "flag by it")
    if cfg.retrain:
        result["retrain"] = replay_without(inp, state, flagged, cfg.seed, which)
    if cfg.retrain_seeds:
        assert recipe is not None  # retrain_seeds raised above without one
        sets = removal_sets(harms, k, inp, cfg.seed)
        result["retrain_fresh"] = retrain_fresh(inp, recipe, sets,
                                                [recipe.config.seed + i for i in range(cfg.retrain_seeds)], which)
    result["total_seconds"] = time.perf_counter() - t0
    result["config"] = asdict(cfg)
    result["trust"] = dict(state.trust)
    if state.out is not None:
        _write(state.out, inp, result, harms, flagged, self_ranked)
    return result


def _detection_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    rows = [[m, d["auc"], *d["recall_at"].values()] for m, d in result["detection"].items()]
    return ["method", "ROC-AUC", *[f"recall @{float(f):.0%}" for f in RECALL_AT]], rows


def fresh_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the from-scratch retraining comparison: per removal, how many were
    removed and the test accuracy (mean ± std over the seeds) and loss."""
    rem = result["retrain_fresh"]["removals"]
    acc = "test_accuracy_mean" in next(iter(rem.values()))
    rows = [[name, r["n_removed"], *([r["test_accuracy_mean"], r["test_accuracy_std"]] if acc else []),
             r["test_loss_mean"]] for name, r in rem.items()]
    return ["removed", "n", *(["test accuracy", "± std"] if acc else []), "test loss"], rows


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
                  text_table(*_detection_table(result)), result["winner"]["line"]]
    if "advice" in result:
        parts.append(result["advice"])
    if "retrain" in result:
        parts += [f"\nretrained without the flagged samples (same θ_0 and batch order), on the "
                  f"{result['retrain']['evaluated_on']}:\n", text_table(*_retrain_table(result))]
    if "retrain_fresh" in result:
        f = result["retrain_fresh"]
        parts += [f"\ntrained from scratch without each method's {result['n_flagged']:,} flags (seeds "
                  f"{', '.join(map(str, f['seeds']))}), on the {f['evaluated_on']}:\n",
                  text_table(*fresh_table(result))]
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
        rep.text(result["winner"]["line"] + (f" {result['advice']}." if "advice" in result else ""))
        rep.table(*_detection_table(result))
        shown = {m: _shown(m, h, self_ranked) for m, h in harms.items()}
        score_histograms(out / "harm_histograms.png", shown, inp.flipped,  # type: ignore[arg-type]
                         {m: _what(m, self_ranked)[0] for m in harms})
        rep.figure("harm_histograms.png", "what each method ranks by, clean and "
                   + ("mismatched pairs" if inp.pairs else "flipped samples"))
    if "retrain" in result:
        rep.heading("Retraining without the flagged samples")
        rep.text("Same θ_0, batch order and learning rates; flagged samples left out of every batch. Evaluated "
                 f"on the {result['retrain']['evaluated_on']}, each replay with its own parameters and running "
                 "statistics.")
        rep.table(*_retrain_table(result))
    if "retrain_fresh" in result:
        f = result["retrain_fresh"]
        rep.heading("Training from scratch without each method's flags")
        rep.text(f"Recipe: {f['recipe']}; seeds {', '.join(map(str, f['seeds']))}; the {result['n_flagged']:,} "
                 f"most harmful by each method removed; evaluated on the {f['evaluated_on']}.")
        header, rows = fresh_table(result)
        if "test accuracy" in header:
            rep.text(winner({r[0]: r[2] for r in rows if r[0] not in ("none", "oracle")},
                            "test accuracy after removal")["line"])
        rep.table(header, rows)
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
