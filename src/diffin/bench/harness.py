"""``diffin bench``: every estimator against replayed removal on named setups.

For a setup: train it with the recorder (timed), replay the removal of ``n_removed`` random
training samples (the ground truth, docs/method.md §3) and of the complements of LDS subsets,
then score all samples with each method (timed, peak memory polled) and compare:
Pearson, Spearman, Kendall τ, top-10 Jaccard (10 most helpful + 10 most harmful) and mean
absolute error (loss units) on the removed samples; LDS on the subsets, for the mean validation
loss and per validation example.

LDS truths (``truth``, docs/method.md §3.1): ``replay`` (the subsets replayed), ``reshuffle``
and ``reseed`` (retrained with fresh batch orders, and fresh θ_0, K seeds each): one
``lds_<mode>`` per method with its bootstrap interval and its paired difference to TracIn.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import _tree, metrics
from .._api import score
from .._errors import ConfigError, UnsupportedMethodError
from .._functional import BatchLoss
from .._io import atomic_write
from .._measure import Measure
from .._train_mode import train_mode_modules
from .._version import __version__
from ..config import CONVENTIONS, config_field
from ..groundtruth import TRUTH_MODES, lds_ground_truth, lds_subsets, replay_removal, retrain_truth
from ..recording.run import load_run
from .builtin import get_setup, train

BENCH_SETUPS = ("mnist5k-mlp", "mnist5k-mlp-relu", "mnist5k-mlp-short", "digits-logreg", "mnist5k-mlp-momentum",
                "mnist5k-cnn", "mnist5k-mlp-adamw", "mnist5k-mlp-clip", "mnist5k-mlp-adamw-groups")
DEFAULT_METHODS = ("diffin", "diffin-frozen", "diffin-expected", "diffin-closed-form", "tracin",
                   "tracin-every-step", "if-cg", "if-lissa", "grad-dot", "grad-cos")
UNITLESS = {"grad-cos"}  # not in loss units: no MAE
LDS_SUBSETS_REPLAY = 50  # default number of LDS subsets with the replayed truth only
LDS_SUBSETS_RETRAIN = 200  # ... when a retraining truth (reshuffle, reseed) is asked
# setups trained with a batch-coupled loss (docs/method.md §4.7, e.g. mnist-captions): their default rows are
# the methods that support it, and their linearisation ceiling is measured by a float64 metagradient
# through the unrolled run (:func:`metagradient_ceiling`)
BATCH_LOSS_METHODS = ("diffin", "diffin-frozen", "tracin", "tracin-every-step")


@dataclass
class BenchConfig:
    """What ``diffin bench`` measures."""

    methods: str = config_field(",".join(DEFAULT_METHODS), "comma-separated methods to compare")
    n_removed: int | None = config_field(None, "samples whose removal is replayed (default: the setup's)")
    lds_subsets: int | None = config_field(
        None, f"LDS: random training subsets, the same for every truth (0 = no LDS; default {LDS_SUBSETS_REPLAY} "
              f"with the replay truth only, {LDS_SUBSETS_RETRAIN} when a retraining truth is asked)")
    lds_fraction: float = config_field(0.5, "LDS: fraction of the training set each subset keeps")
    lds_examples: int = config_field(
        0, "LDS per validation example: number of examples (0 = off; costs one solve/sweep per example)"
    )
    convention: str = config_field("keep", "removal convention of ground truth and estimators",
                                    choices=CONVENTIONS)
    seed: int = config_field(0, "seed of the removed samples, LDS subsets and retraining seeds")
    truth: str = config_field(
        "replay", "LDS ground truths, comma-separated: replay (recorded θ_0 and batch order), reshuffle "
                  "(recorded θ_0, fresh orders), reseed (fresh θ_0 and orders)")
    truth_seeds: int = config_field(10, "seeds K per subset of the retraining truths (reshuffle, reseed)")
    runs: int = config_field(
        1, "independently recorded runs M (seeds SEED..SEED+M-1, the same data): with M > 1, each method "
           "of --ensemble gets a row scored on all M runs and averaged")
    ensemble: str = config_field("diffin-retrain,diffin-expected,tracin",
                                 "methods scored on all --runs runs (comma-separated)")
    sizes: str = config_field(
        "", "scale-1m only: comma-separated training-set sizes (e.g. 1e4,1e5,1e6) for a table and a plot (PNG "
            "beside --json) of diffin's time and peak memory against N")
    n_train: int | None = config_field(None, "scale-1m and scale-1m-pairs only: training samples (default 1,000,000)")
    closed_form_m: int = config_field(4, "scale-1m only: evenly spaced checkpoints the closed form uses")

    def __post_init__(self) -> None:
        if self.n_removed is not None and self.n_removed < 2:
            raise ConfigError("n_removed must be >= 2")
        if self.lds_subsets is not None and (self.lds_subsets < 0 or self.lds_subsets == 1):
            raise ConfigError("lds_subsets must be 0 or >= 2")
        if self.lds_examples < 0:
            raise ConfigError("lds_examples must be >= 0")
        modes = self.truth_modes()
        bad = [m for m in modes if m not in TRUTH_MODES]
        if bad or not modes:
            raise ConfigError(f"truth must be a comma-separated subset of {', '.join(TRUTH_MODES)}, got {self.truth!r}")
        if self.truth_seeds < 1:
            raise ConfigError("truth_seeds must be >= 1")
        if self.runs < 1:
            raise ConfigError("runs must be >= 1")
        self.size_list()
        if self.n_train is not None and self.n_train < 2:
            raise ConfigError("n_train must be >= 2")
        if self.closed_form_m < 1:
            raise ConfigError("closed_form_m must be >= 1")

    def size_list(self) -> list[int]:
        """``sizes`` as sorted distinct integers (``1e4`` and ``10000`` both read); a named error for
        anything else."""
        out = set()
        for part in (p.strip() for p in self.sizes.split(",") if p.strip()):
            try:
                v = float(part)
            except ValueError:
                v = float("nan")
            if not (v >= 2 and v == int(v)):
                raise ConfigError(f"sizes must be comma-separated whole numbers >= 2 (e.g. 1e4,1e5,1e6), "
                                  f"got {part!r}")
            out.add(int(v))
        return sorted(out)

    def method_list(self, batch_loss: bool = False) -> list[str]:
        """The methods to score; left at the default, a setup with a batch-coupled loss gets
        :data:`BATCH_LOSS_METHODS`."""
        if batch_loss and self.methods == ",".join(DEFAULT_METHODS):
            return list(BATCH_LOSS_METHODS)
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def truth_modes(self) -> list[str]:
        """The asked LDS truths, in the order of :data:`TRUTH_MODES`."""
        asked = {m.strip() for m in self.truth.split(",") if m.strip()}
        return [m for m in TRUTH_MODES if m in asked] + sorted(asked - set(TRUTH_MODES))

    def n_lds_subsets(self) -> int:
        """S: ``lds_subsets`` when given, else 50 (replay only) or 200 (a retraining truth asked)."""
        if self.lds_subsets is not None:
            return self.lds_subsets
        retrain = any(m != "replay" for m in self.truth_modes())
        return LDS_SUBSETS_RETRAIN if retrain else LDS_SUBSETS_REPLAY

    def lds_masks(self, n_train: int) -> np.ndarray:
        """The LDS subsets of the benchmark, (S, n_train) bool, True = kept (S =
        :meth:`n_lds_subsets`; seed + 1, so they do not share draws with the removed samples)."""
        return lds_subsets(n_train, self.n_lds_subsets(), self.lds_fraction, seed=self.seed + 1)


def machine_info() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "diffin": __version__}


def write_bench_json(path: str | os.PathLike[str], body: dict[str, Any], argv: dict[str, Any], **meta: Any) -> None:
    """Write a benchmark script's JSON, atomically (parent folders made): ``{"meta": {"machine", "load_average"
    (now), **meta, "argv"}, **body}``; values JSON cannot hold are written as their ``str``."""
    doc = {"meta": {"machine": platform.platform(), "load_average": os.getloadavg(), **meta, "argv": argv}, **body}
    text = json.dumps(doc, indent=2, default=str) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _compare(pred: np.ndarray, actual: np.ndarray, unitless: bool) -> dict[str, float]:
    return {
        "pearson": metrics.pearson(pred, actual),
        "spearman": metrics.spearman(pred, actual),
        "kendall": metrics.kendall(pred, actual),
        "jaccard_top10": metrics.topk_jaccard(pred, actual, k=10),
        "mae": float("nan") if unitless else metrics.mae(pred, actual),
    }


def run_setup(name: str, cfg: BenchConfig, workdir: Path, progress: bool = False,
              peers: bool = False, log: Any = print, peer_methods: list[str] | None = None,
              peer_options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Benchmark one named setup; returns the JSON-ready result. With ``peers``: rows of
    ``peer_methods`` (default: every adapter of :mod:`diffin.peers`) with the setup's
    :data:`PEER_OPTIONS` merged with ``peer_options`` (peer → options)."""
    setup = get_setup(name)
    data = setup.data()
    model = setup.model(data)
    run_dir = workdir / name
    t = train(model, data.x_train, data.y_train, setup.train, run_dir, loss=setup.loss_fn, overwrite=True)
    N = data.n_train
    rng = np.random.default_rng(cfg.seed)
    k = min(cfg.n_removed or setup.n_ground_truth, N)
    removed = np.sort(rng.choice(N, size=k, replace=False))
    common = dict(train=(data.x_train, data.y_train), progress=progress)
    val = (data.x_val, data.y_val)
    log(f"[{name}] trained {t.steps} steps in {t.seconds:.2f}s; replaying {k} removals ...")
    with Measure() as m_gt:
        actual = replay_removal(run_dir, setup.model(data), setup.loss_fn, target=val,
                                remove=[int(i) for i in removed], convention=cfg.convention, **common)
    out: dict[str, Any] = {
        "setup": name,
        "description": setup.description,
        "n_train": N,
        "n_val": _tree.batch_len(data.x_val),
        "n_steps": t.steps,
        "train_seconds": t.seconds,
        "optimizer": setup.train.optimizer,
        "clip_grad_norm": setup.train.clip_grad_norm,
        "clipped_fraction": t.clipped_fraction,
        "ground_truth": {"kind": "replayed-removal", "convention": cfg.convention, "n_removed": k,
                         "seconds": m_gt.seconds, "removed_ids": removed.tolist()},
    }
    masks = actual_lds = actual_lds_ex = None
    truths: dict[str, np.ndarray] = {}  # LDS truth mode -> (S,) mean change
    q = min(cfg.lds_examples, _tree.batch_len(data.x_val))
    n_sub = cfg.n_lds_subsets()
    modes = cfg.truth_modes()
    if n_sub:
        masks = cfg.lds_masks(N)
        out["truth"] = {}
        if "replay" in modes:
            log(f"[{name}] replaying {n_sub} LDS subsets ...")
            with Measure() as m_lds:
                actual_lds = lds_ground_truth(run_dir, setup.model(data), setup.loss_fn, target=val,
                                              masks=masks, **common)
                if q:
                    actual_lds_ex = lds_ground_truth(run_dir, setup.model(data), setup.loss_fn,
                                                     target=(data.x_val[:q], data.y_val[:q]), masks=masks,
                                                     pairwise=True, **common)
            out["lds"] = {"n_subsets": n_sub, "fraction": cfg.lds_fraction, "n_examples": q,
                          "seconds": m_lds.seconds}
            truths["replay"] = np.asarray(actual_lds, dtype=np.float64)
            out["truth"]["replay"] = {"n_subsets": n_sub, "n_seeds": 1, "noise_ceiling": float("nan"),
                                      "seconds": m_lds.seconds}
        for mode in (m for m in modes if m != "replay"):
            log(f"[{name}] retraining {n_sub} LDS subsets × {cfg.truth_seeds} seeds ({mode}) ...")
            with Measure() as m_tr:
                tr = retrain_truth(run_dir, setup.model(data), setup.loss_fn, target=val, masks=masks, mode=mode,
                                   n_seeds=cfg.truth_seeds, seed=cfg.seed, convention=cfg.convention, **common)
            truths[mode] = tr.mean()
            out["truth"][mode] = {"n_subsets": n_sub, "n_seeds": cfg.truth_seeds,
                                  "noise_ceiling": tr.noise_ceiling(), "seconds": m_tr.seconds}
    results = []
    all_scores: dict[str, np.ndarray] = {}  # method -> (N,) scores, for the paired bootstraps
    coupled = isinstance(setup.loss_fn, BatchLoss)
    for method in cfg.method_list(coupled):
        row = _scored_row(method, method, run_dir, setup, data, cfg, common, removed, actual, masks, truths, log,
                          all_scores)
        if actual_lds_ex is not None and not row.get("error"):
            rp = score(run_dir, setup.model(data), setup.loss_fn, target=(data.x_val[:q], data.y_val[:q]),
                       method=method, convention=cfg.convention, pairwise=True, **common)
            row["lds_per_example"] = metrics.lds(masks, actual_lds_ex, rp.scores.astype(np.float64))
        results.append(row)
    if cfg.runs > 1:
        results += _ensemble_rows(name, setup, data, run_dir, cfg, removed, actual, masks, truths, common, log,
                                  all_scores, peers=peers, peer_methods=peer_methods, peer_options=peer_options)
    if peers:
        results += _peer_rows(run_dir, setup, data, removed, actual, masks, actual_lds, log,
                              actual_lds_ex=actual_lds_ex, n_examples=q, methods=peer_methods,
                              options=peer_options, truths=truths, scores_out=all_scores)
    if "tracin" in all_scores and masks is not None:
        for row in results:
            s = all_scores.get(row["method"])
            if s is None or row["method"] == "tracin" or row.get("error"):
                continue
            for mode, act in truths.items():
                row[f"lds_{mode}_vs_tracin"] = metrics.lds_bootstrap_diff(masks, act, s, all_scores["tracin"],
                                                                          n_boot=BOOTSTRAPS)
    out["results"] = results
    exact = next((r for r in results if r.get("variant") == "diffin-exact"), None)
    if exact is not None:
        out["linearisation_ceiling"] = {k_: exact[k_] for k_ in ("pearson", "spearman", "kendall")}
    if coupled or train_mode_modules(setup.model(data)):
        log(f"[{name}] float64 metagradient through the unrolled run ...")
        mg = metagradient_ceiling(run_dir, setup, data, removed, actual, all_scores.get("diffin"))
        out.setdefault("linearisation_ceiling", {})["metagradient"] = mg
    return out


def metagradient_ceiling(run_dir: Path, setup: Any, data: Any, removed: np.ndarray, actual: np.ndarray,
                         diffin_scores: np.ndarray | None = None) -> dict[str, Any]:
    """The ceiling of the exact linearisation, measured independently of the sweep: −∂f/∂ω_z for every
    training sample by reverse-mode autograd through the whole recorded run unrolled as one float64
    program (:func:`diffin._reference.metagradient`; models with BatchNorm / dropout run each step in
    the recorded modes), f the validation loss (for a batch loss the whole validation set as one
    batch, weights of ones). Compared with the replayed removals ``actual`` of ``removed``
    (Pearson, Spearman, Kendall) and, given ``diffin_scores`` (N,), with diffin's own scores (largest
    absolute difference relative to the largest score). Seconds of the autograd pass included."""
    from .._data import DataSource
    from .._functional import FlatModel
    from .._reference import metagradient

    run = load_run(run_dir)
    fm = FlatModel(setup.model(data).double().eval(), setup.loss_fn, run.trainable)  # f in eval mode, as scored
    src = DataSource((data.x_train, data.y_train), torch.float64, torch.device("cpu"))
    xv = _tree.place(data.x_val, torch.float64, torch.device("cpu"))
    t0 = time.perf_counter()
    # f reads the running statistics r_T of train-mode BatchNorm layers (docs/method.md §4.8)
    mg = metagradient(run, fm, src, lambda th, r=None: fm.batch_loss(th, xv, data.y_val, stats=r)).double().numpy()
    out: dict[str, Any] = {"kind": "float64 metagradient through the unrolled run", "n_steps": run.n_steps,
                           "seconds": time.perf_counter() - t0,
                           **{k: v for k, v in _compare(mg[removed], actual, False).items() if k != "jaccard_top10"}}
    if diffin_scores is not None:
        d = np.asarray(diffin_scores, dtype=np.float64)
        out["max_rel_diff_vs_diffin"] = float(np.abs(d - mg).max() / max(np.abs(mg).max(), 1e-300))
        out["pearson_vs_diffin"] = metrics.pearson(d, mg)
    return out


BOOTSTRAPS = 2000  # resamples of the LDS intervals and paired differences


def method_options(spec: str) -> tuple[str, dict[str, Any]]:
    """``METHOD`` or ``METHOD:option=value[:option=value]`` (ScoreConfig options, e.g.
    ``diffin-retrain:removal_fraction=0.5``) → the method and its options (numbers parsed)."""
    name, *parts = spec.split(":")
    options: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ConfigError(f"method {spec!r}: options are written METHOD:option=value")
        try:
            options[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            options[key] = value
    return name, options


def retrain_removal_fraction(method: str, options: dict[str, Any], cfg: BenchConfig, masks: np.ndarray | None,
                             truths: dict[str, np.ndarray]) -> float | None:
    """The ``removal_fraction`` the bench gives ``diffin-retrain`` when the user did not: with a
    retraining truth (``reshuffle`` / ``reseed``) the rows are judged by LDS on subsets that each
    remove ``1 - lds_fraction`` of the training set, so the estimator is told that share, as a user
    tells it the share their decision removes (docs/method.md §4.4). ``None``: leave the options be
    (another method, an explicit ``removal_fraction``, or no retraining truth)."""
    if method != "diffin-retrain" or "removal_fraction" in options or masks is None:
        return None
    if not any(mode != "replay" for mode in truths):
        return None
    return float(1.0 - cfg.lds_fraction)


def _scored_row(label: str, method: str, run: Path | list[Path], setup: Any, data: Any, cfg: BenchConfig,
                common: dict[str, Any], removed: np.ndarray, actual: np.ndarray, masks: np.ndarray | None,
                truths: dict[str, np.ndarray], log: Any, all_scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Score ``method`` on ``run`` (one run folder, or several whose scores are averaged), timed and
    measured, against the validation loss; the row ``label`` of its metrics: the single removals,
    ``lds`` (the replayed truth, NaN without it), ``lds_<mode>`` per truth. Its scores go to
    ``all_scores[label]``. A method refused for this run gives a row with its ``error``."""
    log(f"[{setup.name}] {label} ...")
    method, options = method_options(method)
    fraction = retrain_removal_fraction(method, options, cfg, masks, truths)
    if fraction is not None:
        options["removal_fraction"] = fraction
    try:
        with Measure() as m:
            r = score(run, setup.model(data), setup.loss_fn, target=(data.x_val, data.y_val), method=method,
                      convention=cfg.convention, **common, **options)
    except UnsupportedMethodError as e:  # refused by name for this run (e.g. an SGD formula on Adam)
        log(f"[{setup.name}] {label}: {e}")
        return {"method": label, "variant": _short_error(str(e)), "error": str(e)}
    s = r.scores.astype(np.float64)
    all_scores[label] = s
    row: dict[str, Any] = {"method": label, "variant": r.variant}
    if fraction is not None:
        row["variant"] = f"{r.variant}, removal_fraction={fraction:g} (the LDS subsets' removed share)"
        row["removal_fraction"] = fraction
    row.update(_compare(s[removed], actual, method in UNITLESS))
    row["lds"] = metrics.lds(masks, truths["replay"], s) if masks is not None and "replay" in truths else float("nan")
    row.update(_lds_columns(masks, truths, s))
    row.update({"seconds": m.seconds, "peak_rss_mb": m.peak_mb, "peak_rss_rise_mb": m.rise_mb})
    return row


def _ensemble_rows(name: str, setup: Any, data: Any, run_dir: Path, cfg: BenchConfig, removed: np.ndarray,
                   actual: np.ndarray, masks: np.ndarray | None, truths: dict[str, np.ndarray],
                   common: dict[str, Any], log: Any, all_scores: dict[str, np.ndarray], peers: bool = False,
                   peer_methods: list[str] | None = None,
                   peer_options: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Rows ``METHOD ×M runs``: the method scored on the bench's run and M − 1 more runs of the same
    data recorded with seeds SEED+1 … (fresh initialisation and batch order), scores averaged
    (``diffin.score(run=[...])``). The single-removal columns compare with the first run's replay.

    With ``peers`` and ``trak`` among ``peer_methods`` (default: every peer), a row ``trak ×M runs``:
    TRAK with the final models of the M runs as its ensemble (its option ``runs``), the rest of its
    options as in its own row."""
    from dataclasses import replace as _replace

    dirs = [run_dir]
    with Measure() as m_train:
        for k in range(1, cfg.runs):
            sk = setup.with_changes(train=_replace(setup.train, seed=setup.train.seed + k),
                                    noise_seed=setup.train.seed)
            d = run_dir.parent / f"{name}-seed{setup.train.seed + k}"
            train(sk.model(data), data.x_train, data.y_train, sk.train, d, overwrite=True)
            dirs.append(d)
    log(f"[{name}] recorded {cfg.runs - 1} more runs in {m_train.seconds:.1f}s")
    rows = []
    for method in [m.strip() for m in cfg.ensemble.split(",") if m.strip()]:
        row = _scored_row(f"{method} ×{cfg.runs} runs", method, dirs, setup, data, cfg, common, removed, actual,
                          masks, truths, log, all_scores)
        if not row.get("error"):
            row["runs"] = cfg.runs
        rows.append(row)
    if peers and (peer_methods is None or "trak" in peer_methods):
        rows += _trak_runs_row(dirs, setup, data, removed, actual, masks, truths, log, all_scores, peer_options)
    return rows


def _trak_runs_row(dirs: list[Path], setup: Any, data: Any, removed: np.ndarray, actual: np.ndarray,
                   masks: np.ndarray | None, truths: dict[str, np.ndarray], log: Any,
                   all_scores: dict[str, np.ndarray],
                   options: dict[str, dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The row ``trak ×M runs`` (:func:`_peer_rows` with TRAK's option ``runs`` = ``dirs``, the
    first being the bench's run); its scores go to ``all_scores`` under the row's name."""
    label = f"trak ×{len(dirs)} runs"
    # every run's segment ends, as TRAK uses one run's: five final models alone are too few for
    # TRAK (LDS 0.43 against 0.55 for one run's checkpoints and 0.66 for all, on mnist5k-mlp)
    per_run = len(load_run(dirs[0]).segments)
    trak = {**(options or {}).get("trak", {}), "runs": [str(d) for d in dirs], "n_checkpoints": per_run}
    scores: dict[str, np.ndarray] = {}
    rows = _peer_rows(dirs[0], setup, data, removed, actual, masks, truths.get("replay"), log, methods=["trak"],
                      options={**(options or {}), "trak": trak}, truths=truths, scores_out=scores)
    for row in rows:
        row.update(method=label, runs=len(dirs))
    if "trak" in scores:
        all_scores[label] = scores["trak"]
    return rows


def _lds_columns(masks: np.ndarray | None, truths: dict[str, np.ndarray], s: np.ndarray) -> dict[str, Any]:
    """``lds_<mode>`` and ``lds_<mode>_ci`` [low, high] (95% bootstrap over subsets) of scores
    ``s`` (N,) against each truth (S,)."""
    out: dict[str, Any] = {}
    if masks is None:
        return out
    for mode, act in truths.items():
        iv = metrics.lds_interval(masks, act, s, n_boot=BOOTSTRAPS)
        out[f"lds_{mode}"] = iv["lds"]
        out[f"lds_{mode}_ci"] = [iv["low"], iv["high"]]
    return out


# Peers (``--peers``): options per setup, chosen so that each peer finishes in about a minute
# or two on 2 CPU cores. "*" applies to every setup; a setup's entry is merged over it, and
# ``--peer-options`` over both. Two keys are the benchmark's, not the adapter's: "skip" (a
# reason: the peer is not run and its row carries the reason as its error) and
# "lds_per_example" (True / False; default: only when the peer's main run took at most
# PEER_LDS_EXAMPLE_MAX_SECONDS, since it runs the peer a second time on the LDS examples).
PEER_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "*": {
        "kronfluence-ekfac": {"damping_factor": None},
        "kronfluence-kfac": {"damping_factor": None},
        "trak": {"proj_dim": 512},
        "dattri-if-explicit": {"regularization": 1e-2, "batch_size": 512},
        "dattri-if-cg": {"regularization": 1e-2, "max_iter": 10, "batch_size": 64},
        "dattri-tracin": {"train_batch_size": 1024},
    },
    # convex: the training objective's own Hessian adds the weight decay 1e-3
    "digits-logreg": {
        "kronfluence-ekfac": {"damping_factor": 1e-3},
        "kronfluence-kfac": {"damping_factor": 1e-3},
        "trak": {"proj_dim": 256},
        "dattri-if-explicit": {"regularization": 1e-3, "batch_size": 512},
        "dattri-if-cg": {"regularization": 1e-3, "max_iter": 20, "batch_size": 128},
    },
    "mnist5k-cnn": {
        "dattri-if-explicit": {"skip": (
            "dattri's explicit Hessian (torch.func.hessian: jacfwd over all P=2,202 tangents at once "
            "through the 1,000-sample CNN) runs out of memory (RuntimeError: DefaultCPUAllocator: "
            "can't allocate memory, under a 16 GB cap)")},
        "dattri-if-cg": {"skip": (
            "too slow on this CNN: dattri vmaps CG over the targets and conv double-backward is slow "
            "under vmap (16 targets, 250 Hessian samples, 5 iterations: 70 s); one target at a time, "
            "32 targets with 500 Hessian samples took 38 s at 11.7 GB peak RSS, so the 500 targets "
            "would need about 10 min)")},
    },
    "speed": {
        "dattri-if-cg": {"regularization": 1e-2, "max_iter": 5, "batch_size": 32,
                         "hessian_samples": 1000},
        "dattri-tracin": {"train_batch_size": 1500},
    },
}
PEER_BENCH_KEYS = ("skip", "lds_per_example")
PEER_LDS_EXAMPLE_MAX_SECONDS = 90.0


def peer_options(setup: str, override: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The options each peer gets on ``setup``: ``PEER_OPTIONS["*"]``, then the setup's entry,
    then ``override`` (peer → options), merged option by option."""
    out: dict[str, dict[str, Any]] = {}
    for layer in (PEER_OPTIONS["*"], PEER_OPTIONS.get(setup, {}), override or {}):
        for peer, opts in layer.items():
            if not isinstance(opts, dict):
                raise ConfigError(f"peer options for {peer!r} must be a JSON object, got {opts!r}")
            out[peer] = {**out.get(peer, {}), **opts}
    return out


def _short_error(text: str, width: int = 72) -> str:
    """``error: `` and the first words of ``text`` that fit in ``width`` characters."""
    short = " ".join(text.split())
    if len(short) > width:
        short = short[: width - 2].rsplit(" ", 1)[0] + " …"
    return "error: " + short


def _peer_rows(run_dir: Path, setup: Any, data: Any, removed: np.ndarray, actual: np.ndarray,
               masks: np.ndarray | None, actual_lds: np.ndarray | None, log: Any,
               actual_lds_ex: np.ndarray | None = None, n_examples: int = 0,
               methods: list[str] | None = None,
               options: dict[str, dict[str, Any]] | None = None,
               truths: dict[str, np.ndarray] | None = None,
               scores_out: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """One row per peer method (``diffin.peers``), with the metrics of diffin's rows
    (``lds_<mode>`` against each of ``truths``; their scores are added to ``scores_out``).

    A peer that is not installed, is skipped by its options, or raises, gets a row whose
    ``error`` holds the exact text (its ``variant`` shows the first words in the table).
    """
    from importlib import metadata

    from .. import peers  # optional extra
    from ..peers._base import get_peer
    from ..recording.run import load_run

    opts_all = peer_options(setup.name, options)
    status = peers.available_peers()
    units = peers.peer_units()
    names = methods or list(status)
    unknown = sorted(set(names) - set(status)) + sorted(set(opts_all) - set(status))
    if unknown:
        raise ConfigError(f"unknown peers {unknown}; available: {', '.join(status)}")
    run = load_run(run_dir)
    common = dict(run=run, model_factory=lambda: setup.model(data), loss_fn=setup.loss_fn,
                  train=(data.x_train, data.y_train))
    rows = []
    for name in names:
        opts = dict(opts_all.get(name, {}))
        bench_opts = {k: opts.pop(k) for k in PEER_BENCH_KEYS if k in opts}
        package = get_peer(name).package
        try:
            version = metadata.version("traker" if package == "trak" else package)
        except metadata.PackageNotFoundError:
            version = "not installed"
        row: dict[str, Any] = {"method": name, "variant": f"{package} {version}", "peer": True,
                               "units": units[name], "options": opts}
        error = None
        if status[name] != "ok":
            error = f"not installed: {status[name]}"
        elif bench_opts.get("skip"):
            error = f"skipped: {bench_opts['skip']}"
        if error is None:
            log(f"[{setup.name}] peer {name} {opts} ...")
            try:
                with Measure() as m:
                    pr = peers.run_peer(name, target=(data.x_val, data.y_val), **common, **opts)
            except Exception as e:  # a peer failing must not sink the benchmark: record why
                error = f"{type(e).__name__}: {e}"
        if error is not None:
            log(f"[{setup.name}] peer {name}: {error}")
            row.update(variant=_short_error(error), error=error)
            rows.append(row)
            continue
        s = pr.scores
        row.update(_compare(s[removed], actual, units[name] != "loss"))
        row["lds"] = metrics.lds(masks, actual_lds, s) if masks is not None and actual_lds is not None else float("nan")
        row.update(_lds_columns(masks, truths or {}, np.asarray(s, dtype=np.float64)))
        if scores_out is not None:
            scores_out[name] = np.asarray(s, dtype=np.float64)
        if actual_lds_ex is not None:
            want = bench_opts.get("lds_per_example")
            if want is None:
                want = m.seconds <= PEER_LDS_EXAMPLE_MAX_SECONDS
            if want:
                try:
                    rp = peers.run_peer(name, target=(data.x_val[:n_examples], data.y_val[:n_examples]),
                                        pairwise=True, **common, **opts)
                    row["lds_per_example"] = metrics.lds(masks, actual_lds_ex, rp.scores)
                except Exception as e:
                    row["lds_per_example_error"] = f"{type(e).__name__}: {e}"
            else:
                row["lds_per_example_skipped"] = (
                    f"the main run took {m.seconds:.0f}s > {PEER_LDS_EXAMPLE_MAX_SECONDS:.0f}s; "
                    "pass lds_per_example=true in --peer-options to run it")
        row.update({"seconds": m.seconds, "peak_rss_mb": m.peak_mb, "peak_rss_rise_mb": m.rise_mb,
                    "notes": pr.notes, "warnings": pr.warnings})
        rows.append(row)
    return rows
