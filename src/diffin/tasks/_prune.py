"""Coreset selection (docs/method.md §6): keep a fraction of the training set chosen by score,
retrain from scratch on it (several seeds), and compare test accuracy across methods.

Selection rules for influence scores (positive = helpful):

* ``auto`` (default): ``cover`` when keeping less than ``cover_below`` of the data (default
  0.25; methods with a trajectory influence embedding, below 100,000 samples), ``drop-harmful``
  below ``switch`` (default 0.5), ``keep-influential`` from there on. The best rule flips with the
  kept fraction (Sorscher et al. 2022: keep easy, typical samples when data are scarce, hard ones
  when they abound); measured on ``mnist5k`` with and without label noise in BENCHMARKS.md ("Tasks
  against their baselines", "Pruning to 5%").
* ``cover``: drop the harmful samples (negative scores), then cover what is left: k-means on the
  directions of the samples' trajectory influence embeddings (:func:`diffin.embed`, rows scaled to
  unit length, so samples that move the model the same way fall together) with one cluster per kept
  sample, and from each cluster the member nearest its centroid (:func:`cover`). What is kept
  spans every way the data influence the model, with no two picks alike.
* ``drop-harmful``: drop the most harmful samples first (negative scores, lowest first); if more
  must go than there are harmful samples, drop the rest at random, so what is kept is not
  narrowed to the "most helpful" look-alikes.
* ``keep-helpful``: keep the highest-scoring samples.
* ``keep-influential``: keep the largest ``|score|``; what goes first is what the model would
  barely miss (redundant, easy samples), the influence counterpart of keeping the hard ones.
* ``stratified``: coverage-centric selection (CCS, Zheng et al. 2023), with any score as the
  difficulty (:func:`difficulty`): drop the hardest ``hard_cut`` fraction first, split the rest
  into ``strata`` equal-width bins of difficulty, and spend the budget evenly over the bins (the
  smallest bin first; a bin smaller than its share gives all it has and the rest goes to the
  others), drawing at random within each bin. Applies to heuristics too (``aum`` with it is
  CCS-on-AUM).

``METHOD:RULE`` in ``methods`` (e.g. ``aum:stratified``) gives one method its own rule.

``METHOD-self`` (e.g. ``diffin-self``) ranks by the estimator's self-influence (the rise of a
sample's own loss if it were removed; memorised, atypical and corrupted samples rank high) and
keeps the least self-influential first; for a batch-coupled loss the own loss is the sample's share
within its chunk of the recorded batch size (docs/method.md §4.7).

Heuristics (``loss``, ``el2n``, ``grand``, ``forgetting``; see :mod:`._heuristics`) carry no sign:
they always keep the highest importance (hardest / most forgotten first, as in their papers);
``random`` keeps a seeded random subset per seed. ``class_balanced`` applies the rule within each
class, keeping the same fraction of every class.

Retrains follow the task's retraining recipe (:meth:`TaskInputs.recipe`: a built-in setup's, or
the one recorded in the user's run, with the user's explicit overrides on top). Each retrain
(method, keep fraction, seed) is saved as it finishes with the key of what made it (recipe, run,
data, kept ids, seed), so an interrupted run resumes and a changed recipe retrains afresh.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._data import fingerprint
from .._errors import ConfigError
from .._io import write_json
from .._optional import require
from ..config import config_field
from ..estimators.base import Estimator
from ..report import Report, curves, format_list, format_sizes, winner
from ._common import (
    Recipe,
    TaskInputs,
    TaskState,
    add_trust,
    cached_score,
    prepare_task,
    retrain_cached,
    write_csv,
)
from ._heuristics import HEURISTICS, importance
from ._self import SELF_EMBED_METHODS, SELF_HORIZON_MIN_N, embedding_of, self_scores

RULES = ("auto", "drop-harmful", "keep-helpful", "keep-influential", "stratified", "cover")
DEFAULT_METHODS = "diffin,tracin,random,loss,el2n,grand,forgetting"
PAIR_METHODS = "diffin,tracin,clip-score,loss,random"
"""The methods of image–text pairs when ``methods`` is left at its default (EL2N, GraNd and
forgetting assume a classifier)."""
SCORES = ("replay", "retrain", "retrain-subset")
SELF_SUFFIX = "-self"
"""``METHOD-self``: select by the estimator's self-influence, keeping the least self-influential."""
STRATIFY_BELOW = 0.0
"""Rule ``auto``: kept fraction below which ``stratified`` is used (see BENCHMARKS.md, "Pruning
that keeps coverage")."""
COVER_BELOW = 0.25
"""Rule ``auto``: kept fraction below which ``cover`` is used by methods with an embedding (measured
on ``mnist5k``: above random and CCS-on-AUM at 5, 10 and 20% kept, below random from 30% on; see
BENCHMARKS.md, "Pruning to 5%")."""
COVER_MAX_CLUSTERS = 4096
"""Rule ``cover``: at most this many k-means clusters; a larger budget is spread over them in
proportion to their sizes (:func:`cover`). Cost measured on unit rows of K = 256, one thread: 4.9 s for
20,000 rows into 1,000 clusters, 45 s for 50,000 into 2,048 (the k-means++ start most of it)."""

@dataclass
class PruneConfig:
    """Options of ``diffin prune``."""

    keep: str = config_field("0.1,0.3,0.5,0.7,0.9", "comma-separated fractions of the training set to keep")
    methods: str = config_field(DEFAULT_METHODS, "comma-separated selection methods: estimators, METHOD-self (by "
                                "self-influence, e.g. diffin-self) and heuristics (default for image-text setups: "
                                f"{PAIR_METHODS}); METHOD:RULE gives one method its own rule (e.g. aum:stratified, "
                                "CCS on AUM)")
    rule: str = config_field("auto", "selection rule of influence methods: auto (cover below --cover-below, "
                             "stratified below --stratify-below, drop-harmful below --switch, keep-influential "
                             "from it on), drop-harmful, keep-helpful, keep-influential, stratified (CCS: drop "
                             "the --hard-cut hardest, sample evenly over --strata bins of the score; heuristics "
                             "too) or cover (drop the harmful, then one sample per k-means cluster of the "
                             "influence embedding)",
                             choices=RULES)
    switch: float = config_field(0.5, "rule auto: kept fraction from which keep-influential replaces drop-harmful")
    stratify_below: float = config_field(STRATIFY_BELOW, "rule auto: kept fraction below which stratified "
                                         "replaces drop-harmful")
    cover_below: float = config_field(COVER_BELOW, "rule auto: kept fraction below which cover replaces "
                                      "drop-harmful (methods with an influence embedding, under 100,000 samples)")
    hard_cut: float = config_field(0.1, "rule stratified: fraction of the training set dropped first, the hardest "
                                   "(the most harmful by influence; the highest of a hardness heuristic)")
    strata: int = config_field(50, "rule stratified: equal-width bins of the score sampled evenly")
    class_balanced: bool = config_field(False, "keep the same fraction of every class")
    scores: str = config_field("replay", "influence scores that predict a replayed run ('replay'), a fresh "
                               "retraining ('retrain': predicts='retrain', diffin scored by diffin-retrain) or a "
                               "fresh retraining on a subset of the kept size ('retrain-subset': as retrain, "
                               "linearised around the run in which every sample weighs the kept fraction, "
                               "removal_fraction = 1 - keep; one scoring per fraction)", choices=SCORES)
    seeds: int = config_field(3, "retrains per (method, fraction), each with its own seed")
    seed: int = config_field(0, "first seed")

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.seeds < 1:
            raise ConfigError("seeds must be >= 1")
        if not 0 < self.switch <= 1:
            raise ConfigError(f"switch must be in (0, 1], got {self.switch}")
        if self.scores not in SCORES:
            raise ConfigError(f"scores must be one of {SCORES}, got {self.scores!r}")
        if not 0 <= self.stratify_below <= 1 or not 0 <= self.hard_cut < 1 or self.strata < 1:
            raise ConfigError("need 0 <= stratify_below <= 1, 0 <= hard_cut < 1 and strata >= 1")
        if not 0 <= self.cover_below <= 1:
            raise ConfigError(f"cover_below must be in [0, 1], got {self.cover_below}")
        self.fractions()
        for m in self.method_list():
            self.rule_of(m)

    def fractions(self) -> list[float]:
        try:
            fr = [float(f) for f in self.keep.split(",") if f.strip()]
        except ValueError as e:
            raise ConfigError(f"keep must be comma-separated numbers, got {self.keep!r}") from e
        bad = [f for f in fr if not 0 < f <= 1]
        if not fr or bad:
            raise ConfigError(f"keep fractions must lie in (0, 1]; got {bad or self.keep!r}")
        return fr

    def method_list(self, pairs: bool = False) -> list[str]:
        """The selection methods (``pairs``: image–text data, whose default is :data:`PAIR_METHODS`)."""
        text = PAIR_METHODS if pairs and self.methods == DEFAULT_METHODS else self.methods
        return [m.strip() for m in text.split(",") if m.strip()]

    def rule_of(self, spec: str) -> tuple[str, str]:
        """``(method, rule)`` of a ``methods`` entry: ``METHOD:RULE`` or ``METHOD`` (``rule``)."""
        name, _, rule = spec.partition(":")
        rule = rule or self.rule
        if rule not in RULES:
            raise ConfigError(f"{spec!r}: rule must be one of {RULES}")
        return name, rule


def auto_rule(fraction: float, switch: float = 0.5, stratify_below: float = 0.0, cover_below: float = 0.0) -> str:
    """The rule ``auto`` applies at a kept ``fraction``: ``cover`` below ``cover_below``,
    ``stratified`` below ``stratify_below``, ``drop-harmful`` below ``switch``, ``keep-influential``
    from ``switch`` on."""
    if fraction < cover_below:
        return "cover"
    if fraction < stratify_below:
        return "stratified"
    return "drop-harmful" if fraction < switch else "keep-influential"


def stratified(difficulty: np.ndarray, n_keep: int, hard_cut: float = 0.1, strata: int = 50,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """Positions (unsorted) of ``n_keep`` of the samples chosen by coverage-centric selection
    (CCS, Zheng et al. 2023) on ``difficulty`` (n,), higher = harder: the ``hard_cut`` hardest
    fraction is dropped first (less when the rest could not fill ``n_keep``), the rest split into
    ``strata`` equal-width bins of difficulty, and the budget spent evenly over the non-empty bins,
    the smallest first (a bin gives ``min(its size, budget left // bins left)``), at random within
    each bin."""
    rng = rng or np.random.default_rng(0)
    d = np.asarray(difficulty, dtype=np.float64)
    n = d.size
    if not 0 <= hard_cut < 1:
        raise ConfigError(f"hard_cut must be in [0, 1), got {hard_cut}")
    if strata < 1:
        raise ConfigError(f"strata must be >= 1, got {strata}")
    n_cut = min(int(round(hard_cut * n)), n - n_keep)
    pool = np.argsort(-d, kind="stable")[n_cut:]
    lo, hi = d[pool].min(), d[pool].max()
    edges = np.linspace(lo, hi, strata + 1)
    bins = np.clip(np.searchsorted(edges, d[pool], side="right") - 1, 0, strata - 1)
    members = sorted((pool[bins == b] for b in np.unique(bins)), key=len)
    kept: list[np.ndarray] = []
    budget = n_keep
    for i, m in enumerate(members):
        take = min(len(m), budget // (len(members) - i))
        kept.append(rng.choice(m, size=take, replace=False))
        budget -= take
    return np.concatenate(kept) if kept else np.array([], dtype=np.int64)


def cover(features: np.ndarray, n_keep: int, rng: np.random.Generator | None = None,
          max_clusters: int = COVER_MAX_CLUSTERS) -> np.ndarray:
    """Positions (unsorted, unique) of ``n_keep`` samples that cover the rows of ``features`` (n, K),
    e.g. trajectory influence embeddings: the rows are scaled to unit length (a sample's direction of
    influence, not its size, which the scores already carry), clustered by k-means into ``k =
    min(n_keep, max_clusters)`` clusters (scikit-learn, k-means++ start, one run seeded from ``rng``),
    and each cluster gives first its member nearest its centroid (the most typical). When ``n_keep
    > k`` each cluster gives a share proportional to its size (largest remainders, at most all it
    has), the rest of its share drawn at random from its members; clusters that come out empty (rows
    repeated more than k-means can split) leave their share to a random draw from the samples not kept."""
    rng = rng or np.random.default_rng(0)
    f = np.asarray(features, dtype=np.float64)
    n = f.shape[0]
    if not 0 < n_keep <= n:
        raise ConfigError(f"cover keeps between 1 and {n} samples, asked for {n_keep}")
    if n_keep == n:
        return np.arange(n)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    k = min(n_keep, max_clusters)
    cluster = require("sklearn.cluster", "scikit-learn", "pruning rule cover")
    with warnings.catch_warnings():  # fewer distinct rows than k: the empty clusters are filled below
        warnings.filterwarnings("ignore", message="Number of distinct clusters")
        km = cluster.KMeans(n_clusters=k, n_init=1, random_state=int(rng.integers(2**31 - 1))).fit(f)
    sizes = np.bincount(km.labels_, minlength=k)
    share = np.minimum(sizes, 1) if n_keep == k else _shares(sizes, n_keep)
    by_cluster = np.split(np.argsort(km.labels_, kind="stable"), np.cumsum(sizes)[:-1])  # members, ascending
    kept: list[np.ndarray] = []
    for c in np.flatnonzero(share):
        members = by_cluster[c]
        first = members[np.argmin(np.linalg.norm(f[members] - km.cluster_centers_[c], axis=1))]
        rest = rng.choice(members[members != first], size=share[c] - 1, replace=False)
        kept.append(np.concatenate([[first], rest]).astype(np.int64))
    out = np.concatenate(kept)
    if out.size < n_keep:
        out = np.concatenate([out, rng.choice(np.setdiff1d(np.arange(n), out), n_keep - out.size, replace=False)])
    return out


def _shares(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Integer shares of ``budget`` proportional to ``sizes`` (largest remainders), each at most its size,
    what a full cluster cannot take handed on to the others."""
    share = np.zeros_like(sizes)
    left = budget
    while left > 0:
        room = sizes - share
        want = left * room / room.sum()
        add = np.minimum(np.floor(want).astype(sizes.dtype), room)
        if add.sum() == 0:  # hand out the remainders, the largest first
            order = np.argsort(-(want - np.floor(want)), kind="stable")
            add[order[: left]] = 1
            add = np.minimum(add, room)
        share += add
        left = budget - int(share.sum())
    return share


def select(values: np.ndarray, fraction: float, rule: str = "auto", labels: np.ndarray | None = None,
           class_balanced: bool = False, signed: bool = True, seed: int = 0, switch: float = 0.5,
           stratify_below: float = 0.0, hard_cut: float = 0.1, strata: int = 50, cover_below: float = 0.0,
           features: np.ndarray | None = None) -> np.ndarray:
    """Ids to keep (sorted): ``fraction`` of the samples chosen by ``values`` (N,) under ``rule``.

    ``signed``: values are influence scores (negative = harmful) and ``rule`` applies; otherwise
    the highest values are kept (a hardness heuristic keeps the hardest). ``switch`` and
    ``stratify_below``: the kept fractions at which rule ``auto`` changes (:func:`auto_rule`).
    Rule ``stratified`` (:func:`stratified`, with ``hard_cut`` and ``strata``) applies to signed
    and unsigned values alike, with the difficulty ``−values`` (the most harmful are the hardest)
    or ``values`` (hardness). Rule ``cover`` (:func:`cover`; ``auto`` below ``cover_below``) needs
    ``features`` (N, K), the samples' influence embeddings; signed values first lose their harmful
    samples (negative, the most harmful first, as many as may go). Under ``class_balanced`` each
    class keeps ``round(fraction · its size)`` samples.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"keep fraction must be in (0, 1], got {fraction}")
    if rule not in RULES:
        raise ConfigError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "auto":
        rule = auto_rule(fraction, switch, stratify_below, cover_below)
    if rule == "cover" and features is None:
        raise ConfigError("rule cover needs the samples' influence embeddings (features); use it with an "
                          f"influence method that has one ({', '.join(SELF_EMBED_METHODS)})")
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if class_balanced:
        if labels is None:
            raise ConfigError("class_balanced selection needs the labels")
        pools = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    else:
        pools = [np.arange(len(values))]
    kept = []
    for pool in pools:
        n_keep = int(round(fraction * len(pool)))
        if n_keep == 0:
            continue
        v = values[pool]
        if rule == "stratified":
            kept.append(pool[stratified(-v if signed else v, n_keep, hard_cut, strata, rng)])
            continue
        if rule == "cover":
            cand = np.arange(len(pool))
            if signed:
                harmful = np.argsort(v, kind="stable")
                cand = np.setdiff1d(cand, harmful[v[harmful] < 0][: len(pool) - n_keep])
            kept.append(pool[cand[cover(features[pool[cand]], n_keep, rng)]])  # type: ignore[index]
            continue
        if not signed or rule == "keep-helpful":
            kept.append(pool[np.argsort(-v, kind="stable")[:n_keep]])
            continue
        if rule == "keep-influential":
            kept.append(pool[np.argsort(-np.abs(v), kind="stable")[:n_keep]])
            continue
        n_drop = len(pool) - n_keep
        harmful = np.argsort(v, kind="stable")
        harmful = harmful[v[harmful] < 0][:n_drop]
        rest = np.setdiff1d(np.arange(len(pool)), harmful)
        extra = rng.choice(rest, size=n_drop - len(harmful), replace=False) if n_drop > len(harmful) else []
        drop = np.union1d(harmful, extra).astype(np.int64)
        kept.append(pool[np.setdiff1d(np.arange(len(pool)), drop)])
    out = np.sort(np.concatenate(kept)) if kept else np.array([], dtype=np.int64)
    if out.size == 0:
        raise ConfigError(f"keeping {fraction} of the data keeps no samples; raise the fraction")
    return out


def scoring(name: str, scores: str, removal_fraction: float = 0.0) -> tuple[str, dict[str, Any]]:
    """The estimator and :class:`~diffin.config.ScoreConfig` options that score influence method
    ``name`` for ``scores`` (:data:`SCORES`; ``removal_fraction``: the fraction a
    ``retrain-subset`` decision removes): the one place where the tasks choose what their scores
    predict."""
    if scores == "replay":
        return name, {}
    if scores == "retrain-subset" and removal_fraction > 0:
        return name, {"predicts": "retrain", "removal_fraction": removal_fraction}
    return name, {"predicts": "retrain"}


def _values(name: str, inp: TaskInputs, state: TaskState, cfg: PruneConfig,
            progress: bool, fraction: float | None = None) -> tuple[np.ndarray, bool]:
    """Selection values of method ``name`` and whether they are signed influence scores;
    ``fraction``: the kept fraction, for scores that depend on it (``retrain-subset``)."""
    if name in HEURISTICS:
        return importance(name, inp, run=state.run), False
    if name.endswith(SELF_SUFFIX) and name[: -len(SELF_SUFFIX)] in Estimator.registry:
        # self-influence: how much a sample's own loss would rise without it (memorised, atypical or
        # corrupted samples rank high); the least self-influential are kept first
        own = self_scores(inp, state, name[: -len(SELF_SUFFIX)], progress)
        return -own.astype(np.float64), False
    if name not in Estimator.registry:
        raise ConfigError(f"unknown selection method {name!r}; use an estimator, METHOD{SELF_SUFFIX} (its "
                          f"self-influence) or one of {HEURISTICS}")
    if inp.val is None:
        raise ConfigError("influence-based pruning scores against validation data; give val")
    per_fraction = cfg.scores == "retrain-subset" and fraction is not None and fraction < 1
    method, options = scoring(name, cfg.scores, 1 - fraction if per_fraction else 0.0)  # type: ignore[operator]
    label = f"keep{fraction:g}" if per_fraction else None
    return cached_score(inp, state, method, inp.val, progress, tag=label, **options).astype(np.float64), True


def _retrain(inp: TaskInputs, state: TaskState, recipe: Recipe, evalset: tuple[Any, Any], tag: str,
             keep_ids: np.ndarray, seed: int) -> dict[str, Any]:
    """Train from scratch on ``keep_ids`` with ``recipe`` and ``seed``; evaluate on ``evalset``
    (cached in ``out/retrains``, :func:`~._common.retrain_cached`)."""
    def measure(model: Any) -> dict[str, Any]:
        ev = inp.evaluate(model, *evalset, loss_fn=inp.loss_fn)
        if "accuracy" not in ev:
            raise ConfigError("pruning compares accuracies: it needs a classifier (2-D outputs, integer labels)")
        return {"accuracy": ev["accuracy"], "loss": ev["loss"], "n_kept": int(np.asarray(keep_ids).size)}

    return retrain_cached(inp, state, recipe, tag, keep_ids, seed, measure, fingerprint(evalset))


def prune(inp: TaskInputs, config: PruneConfig | None = None, out: str | Path | None = None,
          overwrite: bool = False, progress: bool = True, log: Any = None, **options: Any) -> dict[str, Any]:
    """Select, retrain and evaluate; returns the content of ``prune.json`` with ``curves``
    (per method: list of {``keep``, ``test_accuracy_mean``, ``test_accuracy_std``, ...}) and the
    ``recipe`` the retrains followed. ``out`` holding results made from other inputs (another
    config, run, data, setup or recipe) is refused unless ``overwrite``."""
    cfg = config if config is not None else PruneConfig(**options)
    say = log or (lambda *a: None)
    evalset = inp.test if inp.test is not None else inp.val
    if evalset is None:
        raise ConfigError("pruning needs test (or validation) data to evaluate the retrained models")
    which = "test" if inp.test is not None else "val"
    recipe = inp.recipe()
    state = prepare_task(inp, "prune", cfg, out, overwrite, progress, recipe)
    say(f"  retraining recipe: {recipe.describe()}")
    labels = inp.labels
    fractions = cfg.fractions()
    seeds = [cfg.seed + s for s in range(cfg.seeds)]
    t0 = time.perf_counter()
    specs = {m: cfg.rule_of(m) for m in cfg.method_list(inp.pairs)}
    scored = {name: _values(name, inp, state, cfg, progress) for name, _ in specs.values()}
    values = {m: scored[name] for m, (name, _) in specs.items()}
    t_scores = time.perf_counter() - t0
    full = [_retrain(inp, state, recipe, evalset, "full", np.arange(inp.n_train), s) for s in seeds]
    curves_: dict[str, list[dict[str, Any]]] = {}
    features: dict[str, np.ndarray] = {}
    for m, (v, signed) in values.items():
        pts = []
        name, rule = specs[m]
        if name.endswith(SELF_SUFFIX) and rule == "stratified":
            v = -v  # the self-influence itself is the difficulty
        base = name[: -len(SELF_SUFFIX)] if name.endswith(SELF_SUFFIX) else name
        # auto covers only where the embedding is affordable (it costs about 17 sweeps at K = 256)
        cover_below = cfg.cover_below if base in SELF_EMBED_METHODS and inp.n_train < SELF_HORIZON_MIN_N else 0.0
        for f in fractions:
            if signed and cfg.scores == "retrain-subset":
                v = _values(name, inp, state, cfg, progress, f)[0]
            applied = auto_rule(f, cfg.switch, cfg.stratify_below, cover_below) if rule == "auto" else rule
            feats = None
            if applied == "cover" and name != "random":
                if base not in SELF_EMBED_METHODS:
                    raise ConfigError(f"{m!r}: rule cover needs an influence embedding; use it with one of "
                                      f"{SELF_EMBED_METHODS} (or METHOD-self of them)")
                if base not in features:
                    say(f"  {base}: influence embedding for rule cover (built once, kept in OUT/embedding-{base})")
                    features[base] = np.asarray(embedding_of(inp, state, base, progress).values)
                feats = features[base]
            runs = []
            for s in seeds:
                vv = importance("random", inp, seed=s) if name == "random" else v
                kept = select(vv, f, "keep-helpful" if name == "random" else applied, labels, cfg.class_balanced,
                              signed=signed, seed=s, hard_cut=cfg.hard_cut, strata=cfg.strata, features=feats)
                runs.append(_retrain(inp, state, recipe, evalset, f"{m.replace(':', '@')}_keep{f:g}", kept, s))
            accs = np.array([r["accuracy"] for r in runs])
            losses = np.array([r["loss"] for r in runs])
            pts.append({"keep": f, "n_kept": runs[0]["n_kept"], "rule": "random" if name == "random" else applied,
                        "test_accuracy_mean": float(accs.mean()), "test_accuracy_std": float(accs.std()),
                        "test_loss_mean": float(losses.mean()), "accuracies": accs.tolist()})
            say(f"  {m:12s} keep {f:.0%}: {which} accuracy {accs.mean():.4f} ± {accs.std():.4f}")
        curves_[m] = pts
    full_acc = np.array([r["accuracy"] for r in full])
    result: dict[str, Any] = {
        "setup": inp.description,
        "sizes": inp.sizes or {"train": inp.n_train},
        "evaluated_on": which,
        "rule": cfg.rule,
        "class_balanced": cfg.class_balanced,
        "scores": cfg.scores,
        "seeds": seeds,
        "recipe": {"description": recipe.describe(), **recipe.to_json()},
        "full_data": {"test_accuracy_mean": float(full_acc.mean()), "test_accuracy_std": float(full_acc.std())},
        "curves": curves_,
        "seconds": {"scores": t_scores, "total": time.perf_counter() - t0},
        "config": asdict(cfg),
    }
    if inp.flipped is not None:
        result["detection"] = detection(values, inp.flipped)
    if "random" in curves_:
        rnd = {p["keep"]: p["test_accuracy_mean"] for p in curves_["random"]}
        result["vs_random"] = {m: {str(p["keep"]): p["test_accuracy_mean"] - rnd[p["keep"]] for p in pts}
                               for m, pts in curves_.items() if m != "random"}
    result["trust"] = dict(state.trust)
    if state.out is not None:
        _write(state.out, inp, result, values)
    return result


def detection(values: dict[str, tuple[np.ndarray, bool]], corrupted: np.ndarray) -> dict[str, dict[str, float]]:
    """ROC-AUC per method of finding the known corrupted samples (flipped labels, mismatched pairs)
    from its selection values: harm = −score for influence scores (negative = harmful) and for
    ``clip-score`` (low cosine = suspicious), the value itself for the other heuristics (high loss =
    suspicious); ``random`` (drawn per seed) is scored by its first seed's draw."""
    from ..metrics import detection_auc

    out = {}
    for m, (v, signed) in values.items():
        harm = -v if (signed or m == "clip-score" or m.endswith(SELF_SUFFIX)) else v
        out[m] = {"auc": detection_auc(-harm, corrupted)}
    return out


def summary_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the accuracy table: one row per method, one column per keep fraction."""
    fr = [p["keep"] for p in next(iter(result["curves"].values()))]
    header = ["method", *[f"keep {f:.0%}" for f in fr], "mean"]
    rows = []
    for m, pts in result["curves"].items():
        accs = [p["test_accuracy_mean"] for p in pts]
        rows.append([m, *accs, float(np.mean(accs))])
    return header, rows


def _write(out: Path, inp: TaskInputs, result: dict[str, Any], values: dict[str, tuple[np.ndarray, bool]]) -> None:
    write_json(out / "prune.json", result)
    labels = inp.labels
    write_csv(out / "prune.csv", ["id", "label", *[f"score_{m}" for m in values]],
              [[str(i), str(labels[i]), *[f"{v[i]:.9g}" for v, _ in values.values()]] for i in range(inp.n_train)])
    xs = {m: [p["keep"] for p in pts] for m, pts in result["curves"].items()}
    ys = {m: [p["test_accuracy_mean"] for p in pts] for m, pts in result["curves"].items()}
    es = {m: [p["test_accuracy_std"] for p in pts] for m, pts in result["curves"].items()}
    curves(out / "prune_curves.png", xs, ys, es, "fraction of training set kept",
           f"{result['evaluated_on']} accuracy after retraining (mean ± std over seeds)",
           f"coreset selection ({result['rule']})")
    full = result["full_data"]
    rep = Report("diffin prune")
    c = result["config"]
    rule = result["rule"] + (f" (cover below {c.get('cover_below', 0):g}, stratified below {c['stratify_below']:g}, "
                             f"drop-harmful below {c['switch']:g}, keep-influential from there on)"
                             if result["rule"] == "auto" else "")
    predicts = {"replay": "the replayed run", "retrain": "a fresh retraining",
                "retrain-subset": "a fresh retraining on a subset of the kept size"}[result["scores"]]
    balanced = "yes" if result["class_balanced"] else "no"
    rep.text(f"{result['setup']}. Sizes: {format_sizes(result['sizes'])}. Rule for influence methods: "
             f"`{rule}`, with scores that predict {predicts}; class-balanced: {balanced}; "
             f"seeds {format_list(result['seeds'])}.")
    rep.text(f"Retraining recipe: {result['recipe']['description']}.")
    rep.text(f"Each cell: mean {result['evaluated_on']} accuracy of models retrained from scratch on the kept "
             f"subset. Full data: {full['test_accuracy_mean']:.4f} ± {full['test_accuracy_std']:.4f}.")
    header, rows = summary_rows(result)
    what = f"mean {result['evaluated_on']} accuracy over the kept fractions"
    rep.text(winner({r[0]: r[-1] for r in rows}, what)["line"])
    rep.table(header, rows)
    if "detection" in result:
        rep.text("Each method's selection values as a detector of the known corrupted training samples "
                 "(ROC-AUC; influence scores and CLIP score rank low values as suspicious, loss high ones):")
        rep.text(winner({m: d["auc"] for m, d in result["detection"].items()}, "ROC-AUC")["line"])
        rep.table(["method", "ROC-AUC"], [[m, d["auc"]] for m, d in result["detection"].items()])
    rep.figure("prune_curves.png", f"{result['evaluated_on']} accuracy against the fraction kept, per method")
    add_trust(rep, result.get("trust") or {})
    rep.write(out)
