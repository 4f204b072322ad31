"""``diffin bench --setup scale-1m-pairs``: contrastive (CLIP-style) training at the scale of a
vision-language corpus, scored by the batch-coupled path (docs/method.md §4.7, batch-coupled losses).

A million synthetic pairs (:mod:`diffin.bench.builtin.synthetic_pairs`: two 64-d views of a latent point,
10% of the pairs mismatched) are written once under the work folder and read memory-mapped; a
two-tower MLP is trained one epoch with the symmetric InfoNCE loss at batch 256
(:func:`diffin.bench.builtin.captions.clip_loss`, every pair a negative for its batch mates), recorded.
Each method (default ``diffin`` and ``tracin``) scores every pair against the clean validation
pairs as one batch, timed against the epoch with its peak resident memory (the limits of the scale
benchmark: 15 minutes and 4 GiB per method, ``diffin`` within 5× the epoch). Mismatched-pair
detection: ROC-AUC of each method's score (low = harmful = mismatched) and of the CLIP score (the
cosine of the pair under the trained model; low = mismatched, the usual data filter). A float64
spot check on the first rows compares ``diffin`` (and ``tracin``) with replayed removal.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._api import score
from .._errors import UnsupportedMethodError
from .._measure import Measure
from ..groundtruth import replay_removal
from .builtin import get_setup, train
from .builtin.captions import CLIP_LOSS, clip_scores
from .builtin.synthetic_pairs import N_TRAIN, PAIRS_TRAIN, generate, memmap_pairs, pairs_model
from .harness import DEFAULT_METHODS, BenchConfig, _compare, _short_error
from .scale import removal_spot_check

PAIRS_SETUP = "scale-1m-pairs"
PAIRS_METHODS = ("diffin", "tracin", "diffin-self")
PAIRS_SPOT_N = 100_000  # pairs of the float64 fidelity spot check
PAIRS_SPOT_REMOVED = 20
PAIRS_SPOT_TARGET = 0.90  # Pearson the spot check should reach (issue 14's bar for contrastive runs)
LIMIT_SECONDS = 15 * 60  # per method (the scale benchmark's limits)
LIMIT_RSS_MB = 4096.0
LIMIT_X_EPOCH = 5.0  # diffin (exact) within 5× the training epoch
PAIRS_COLUMNS = ("method", "variant", "processes", "seconds", "x_epoch", "samples_per_second", "peak_rss_mb",
                 "peak_rss_rise_mb", "auc_mismatched", "auc_mismatched_standardized")


def pairs_data(workdir: Path, n: int, seed: int) -> Path:
    """The pairs folder of ``n`` training pairs under ``workdir`` (generated once, reused)."""
    folder = workdir / "pairs-data" / f"n{n}"
    generate(folder, n_train=n, seed=seed)
    return folder


def recorded_pairs(workdir: Path, n: int, seed: int, log: Any = print
                   ) -> tuple[Path, Any, np.ndarray, float, np.ndarray]:
    """The first ``n`` pairs of the ``scale-1m-pairs`` data (:func:`pairs_data`), trained and recorded
    with its recipe into ``workdir/pairs-run-n{n}``, and the trained model's CLIP score of every pair.

    Returns (run folder, the memory-mapped ``(x, y)`` training data, the mismatched flags (n,) bool,
    the training run's seconds, CLIP scores (n,) float64: cosine of the two towers' embeddings)."""
    data_dir = pairs_data(workdir, n, seed)
    x, y = memmap_pairs(data_dir)
    mismatched = np.load(data_dir / "mismatched.npy")
    run = workdir / f"pairs-run-n{n}"
    model = pairs_model()
    t = train(model, x, y, PAIRS_TRAIN, run, loss=CLIP_LOSS, overwrite=True)
    log(f"[pairs n={n}] trained {t.steps} steps in {t.seconds:.1f}s")
    (xa, xb), _ = memmap_pairs(data_dir, writable_view=True)
    with Measure() as m:
        cos = clip_scores(model, (torch.from_numpy(xa), torch.from_numpy(xb)))
    log(f"[pairs n={n}] CLIP score {m.seconds:.1f}s")
    return run, (x, y), mismatched, t.seconds, np.asarray(cos, dtype=np.float64)


def _val(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The validation pairs in memory: ((2000, 64), (2000, 64)) in ``dtype``, classes (2000,) int64."""
    (va, vb), y = memmap_pairs(folder, "val")
    return ((torch.from_numpy(np.array(va)).to(dtype), torch.from_numpy(np.array(vb)).to(dtype)),
            torch.from_numpy(np.array(y)))


def detection_auc(mismatched: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of finding the mismatched pairs (N,) bool by ranking ``scores`` (N,) ascending (a low
    score flags a pair: harmful for influence scores, dissimilar for CLIP score); 0.5 = chance."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(mismatched, dtype=bool), -np.asarray(scores, dtype=np.float64)))


def step_of_samples(run_dir: Path, n: int) -> np.ndarray:
    """The (first) step at which each of the ``n`` training samples was used, (n,) int64 (−1: never)."""
    from ..recording.run import load_run

    run = load_run(run_dir)
    step = np.full(n, -1, dtype=np.int64)
    for t in reversed(range(run.n_steps)):
        step[np.asarray(run.batch(t), dtype=np.int64)] = t
    return step


def auc_by_phase(mismatched: np.ndarray, scores: np.ndarray, step: np.ndarray, n_steps: int,
                 phases: int = 4) -> list[float]:
    """:func:`detection_auc` within each of ``phases`` equal parts of the run, by the step at which a
    sample was used (``step`` (N,) from :func:`step_of_samples`): separates how well a score ranks pairs
    seen at the same time from how its scale drifts along the run. NaN for a part without both kinds."""
    out = []
    for k in range(phases):
        sel = (step >= k * n_steps // phases) & (step < (k + 1) * n_steps // phases)
        m = mismatched[sel]
        out.append(detection_auc(m, scores[sel]) if 0 < m.sum() < m.size else float("nan"))
    return out


STEPS_BEFORE_END = (0, 8, 32, 128, 512)  # lower edges of the bins of auc_by_steps_before_end


def auc_by_steps_before_end(mismatched: np.ndarray, scores: np.ndarray, step: np.ndarray,
                            n_steps: int) -> list[dict[str, Any]]:
    """:func:`detection_auc` of the pairs binned by how many steps before the end of the run they
    were used (``n_steps − 1 − step``), bins [0, 8), [8, 32), [32, 128), [128, 512), [512, ∞):
    a removal's effect on θ_T passes through every later step, so this shows how far back a pair's
    mismatch still shows in its score. One ``{"from", "to", "n", "auc"}`` per non-empty bin (``to``
    None for the last; ``auc`` NaN without both kinds of pair)."""
    before = n_steps - 1 - step
    out = []
    for lo, hi in zip(STEPS_BEFORE_END, (*STEPS_BEFORE_END[1:], None)):
        sel = (before >= lo) & (step >= 0) if hi is None else (before >= lo) & (before < hi) & (step >= 0)
        m = mismatched[sel]
        if m.size:
            auc = detection_auc(m, scores[sel]) if 0 < m.sum() < m.size else float("nan")
            out.append({"from": lo, "to": hi, "n": int(m.size), "auc": auc})
    return out


def _spot_check(data_dir: Path, n: int, cfg: BenchConfig, workdir: Path, progress: bool,
                log: Any) -> dict[str, Any]:
    """``diffin`` and ``tracin`` against replayed removal of :data:`PAIRS_SPOT_REMOVED` random pairs
    on the first ``n`` pairs, in float64 (views copied to memory: 2 · n · 64 · 8 bytes); the same
    recipe and loss as the large run, so it has ceil(n / 256) steps."""
    (xa_mm, xb_mm), y_mm = memmap_pairs(data_dir)
    x = (torch.from_numpy(np.asarray(xa_mm[:n], dtype=np.float64)),
         torch.from_numpy(np.asarray(xb_mm[:n], dtype=np.float64)))
    y = torch.from_numpy(np.array(y_mm[:n]))
    t, removed, _, replay_s, scored = removal_spot_check(
        PAIRS_SETUP, lambda: pairs_model().double(), CLIP_LOSS, (x, y), _val(data_dir, torch.float64), PAIRS_TRAIN,
        workdir / f"{PAIRS_SETUP}-spot-n{n}", PAIRS_SPOT_REMOVED, cfg.seed, "keep", ("diffin", "tracin"), progress, log)
    out: dict[str, Any] = {"n_train": n, "n_steps": t.steps, "dtype": "float64", "n_removed": len(removed),
                           "removed_ids": removed.tolist(), "train_seconds": t.seconds, "replay_seconds": replay_s,
                           "target_pearson": PAIRS_SPOT_TARGET}
    r, score_s, cmp = scored["diffin"]
    out.update(variant=r.variant, score_seconds=score_s, **cmp)
    r, score_s, cmp = scored["tracin"]
    out["tracin"] = {"variant": r.variant, "seconds": score_s, **cmp}
    log(f"[{PAIRS_SETUP}] spot check: diffin Pearson {out['pearson']:.4f} (target ≥ {PAIRS_SPOT_TARGET}), "
        f"tracin Pearson {out['tracin']['pearson']:.4f}")
    return out


REMOVAL_CHECK_PER_KIND = 10  # mismatched and matched pairs each, in the full-run removal check


def removal_check(data_dir: Path, n: int, workdir: Path, seed: int = 1, per_kind: int = REMOVAL_CHECK_PER_KIND,
                  progress: bool = False, log: Any = print) -> dict[str, Any]:
    """The run of ``n`` pairs trained again in float64 (views copied to memory: 2 · n · 64 · 8 bytes), and
    the removal of ``per_kind`` random mismatched and ``per_kind`` random matched pairs (``seed``) replayed
    over the whole run: ``diffin``'s float64 scores against the replayed effects (Pearson, Spearman, ...),
    and the detection AUC of the replayed effects themselves on these pairs (does the actual change of the
    validation loss tell mismatched pairs apart?) beside ``diffin``'s on them and on all ``n``.

    Returns per removed pair its id, kind, steps before the end, replayed effect and score (loss units),
    the comparison, the AUCs and the seconds. At n = 1,000,000: about 2 GB and 10–15 minutes."""
    (xa_mm, xb_mm), y_mm = memmap_pairs(data_dir)
    x = (torch.from_numpy(np.asarray(xa_mm[:n], dtype=np.float64)),
         torch.from_numpy(np.asarray(xb_mm[:n], dtype=np.float64)))
    y = torch.from_numpy(np.array(y_mm[:n]))
    mis = np.load(data_dir / "mismatched.npy")[:n]
    val = _val(data_dir, torch.float64)
    run_dir = workdir / f"{PAIRS_SETUP}-removal-check-n{n}"
    t = train(pairs_model().double(), x, y, PAIRS_TRAIN, run_dir, loss=CLIP_LOSS, overwrite=True, progress=progress)
    rng = np.random.default_rng(seed)
    ids = np.sort(np.concatenate([rng.choice(np.flatnonzero(mis), per_kind, replace=False),
                                  rng.choice(np.flatnonzero(~mis), per_kind, replace=False)]))
    log(f"[{PAIRS_SETUP}] removal check (float64, N={n}): trained in {t.seconds:.1f}s; replaying {len(ids)} "
        "removals over the whole run ...")
    with Measure() as m_gt:
        actual = replay_removal(run_dir, pairs_model().double(), CLIP_LOSS, train=(x, y), target=val,
                                remove=[int(i) for i in ids], convention="keep", progress=progress)
    actual = np.asarray(actual, dtype=np.float64)
    with Measure() as m:
        r = score(run_dir, pairs_model().double(), CLIP_LOSS, train=(x, y), target=val, method="diffin",
                  convention="keep", progress=progress)
    s = r.scores.astype(np.float64)
    before = t.steps - 1 - step_of_samples(run_dir, n)[ids]
    out: dict[str, Any] = {
        "n_train": n, "n_steps": t.steps, "dtype": "float64", "variant": r.variant, "seed": seed,
        "removed_ids": ids.tolist(), "mismatched": mis[ids].tolist(), "steps_before_end": before.tolist(),
        "actual": actual.tolist(), "diffin": s[ids].tolist(), "train_seconds": t.seconds,
        "replay_seconds": m_gt.seconds, "score_seconds": m.seconds, **_compare(s[ids], actual, False),
        "auc_actual_on_removed": detection_auc(mis[ids], actual),
        "auc_diffin_on_removed": detection_auc(mis[ids], s[ids]), "auc_diffin_all": detection_auc(mis, s),
    }
    log(f"[{PAIRS_SETUP}] removal check: diffin Pearson {out['pearson']:.4f}; AUC of the replayed effects on these "
        f"{len(ids)} pairs {out['auc_actual_on_removed']:.3f} (diffin {out['auc_diffin_on_removed']:.3f}, diffin "
        f"on all {n}: {out['auc_diffin_all']:.4f})")
    return out


SELF_SUFFIX = "-self"
PAIRS_SELF_DIM = 16
"""Directions of the sketched horizon-0 self-influence of the ``diffin-self`` row (docs/method.md §4.11):
measured at a million pairs (BENCHMARKS.md, "Horizon self-influence at a million pairs"), K = 16 took
630 s (395 s of CPU) at load 3–6 with AUC 0.725 standardised, K = 8 696 s at load 13–17 with 0.686."""


def _self_row(method: str, run_dir: Path, train_xy: Any, mismatched: np.ndarray, step: np.ndarray, n_steps: int,
              epoch: float, workdir: Path, device: str | None, log: Any) -> dict[str, Any]:
    """The ``diffin-self`` row: every pair's horizon-0 self-influence (:func:`diffin.self_influence`,
    sketched with :data:`PAIRS_SELF_DIM` directions), its AUC as is (a high self-influence flags a pair)
    and standardised within the batch the pair trained in; scores saved like the other rows."""
    from .._self_horizon import self_influence

    if method != "diffin" + SELF_SUFFIX:
        raise UnsupportedMethodError(f"{method}: the pairs bench scores self-influence with diffin-self only")
    n = len(mismatched)
    with Measure() as m:
        r = self_influence(run_dir, pairs_model(), CLIP_LOSS, train=train_xy, horizon=0, dim=PAIRS_SELF_DIM,
                           progress=False, device=device)
    np.save(workdir / f"{PAIRS_SETUP}-{method}-scores.npy", -r.scores)
    np.save(workdir / f"{PAIRS_SETUP}-{method}-standardized.npy", -r.standardized)
    row = {"method": method, "variant": f"horizon 0, sketch K={PAIRS_SELF_DIM}", "processes": 1,
           "seconds": m.seconds, "x_epoch": m.seconds / epoch, "samples_per_second": n / m.seconds,
           "peak_rss_mb": m.peak_mb, "peak_rss_rise_mb": m.rise_mb,
           "auc_mismatched": detection_auc(mismatched, -r.scores),
           "auc_mismatched_standardized": detection_auc(mismatched, -r.standardized),
           "auc_mismatched_by_quarter": auc_by_phase(mismatched, -r.scores, step, n_steps),
           "auc_mismatched_by_steps_before_end": auc_by_steps_before_end(mismatched, -r.scores, step, n_steps),
           "mean_score_mismatched": float(r.scores[mismatched].mean()),
           "mean_score_matched": float(r.scores[~mismatched].mean())}
    row["within_limits"] = bool(m.seconds <= LIMIT_SECONDS and m.peak_mb <= LIMIT_RSS_MB)
    log(f"[{PAIRS_SETUP}] {method}: {m.seconds:.1f}s = {row['x_epoch']:.2f}× the epoch, peak RSS {m.peak_mb:.0f} MiB, "
        f"mismatched-pair AUC {row['auc_mismatched']:.4f} (standardised within its batch "
        f"{row['auc_mismatched_standardized']:.4f})")
    return row


def run_scale_pairs(cfg: BenchConfig, workdir: Path, n_train: int | None = None, progress: bool = False,
                    log: Any = print, device: str | None = None, spot_n: int | None = None) -> dict[str, Any]:
    """The ``scale-1m-pairs`` benchmark (see the module docstring).

    Args:
        cfg: ``cfg.methods`` when changed from the bench default picks the methods (each must support
            batch-coupled losses), else :data:`PAIRS_METHODS`; ``cfg.seed`` seeds the data and the
            spot check's removed pairs; ``cfg.n_train`` (when set) the number of pairs.
        workdir: data under ``workdir/pairs-data``, runs and spot check under ``workdir``.
        n_train: training pairs (default ``cfg.n_train``, else 1,000,000).
        device: score the method rows there (e.g. ``"cuda"``); training, CLIP score and the spot check
            stay on the CPU, so ``x_epoch`` is then the device's scoring time over the CPU's epoch.
        spot_n: pairs of the float64 spot check (default min(N, :data:`PAIRS_SPOT_N`); 0 = none).

    Returns the JSON-ready result: ``results`` one row per method (``seconds``, ``x_epoch``,
    ``samples_per_second``, ``peak_rss_mb`` / ``peak_rss_rise_mb`` in MiB, ``auc_mismatched`` and
    ``auc_mismatched_by_quarter`` (within each quarter of the epoch, by the step a pair was used),
    ``auc_mismatched_by_steps_before_end`` (:func:`auc_by_steps_before_end`),
    ``within_limits``) plus a ``clip-score`` row, ``spot_check``, ``ground_truth`` and ``limits``.
    Each method's scores (N,) float64 are saved as ``workdir/scale-1m-pairs-<method>-scores.npy``, the
    CLIP scores as ``workdir/scale-1m-pairs-clip-score.npy``.
    """
    n = int(n_train or getattr(cfg, "n_train", None) or N_TRAIN)
    t0 = time.perf_counter()
    data_dir = pairs_data(workdir, n, cfg.seed)
    log(f"[{PAIRS_SETUP}] data: {data_dir} ({time.perf_counter() - t0:.1f}s)")
    x, y = memmap_pairs(data_dir)
    mismatched = np.load(data_dir / "mismatched.npy")
    val = _val(data_dir)
    run_dir = workdir / PAIRS_SETUP
    model = pairs_model()
    t = train(model, x, y, PAIRS_TRAIN, run_dir, loss=CLIP_LOSS, overwrite=True, progress=progress)
    epoch = t.seconds
    log(f"[{PAIRS_SETUP}] N={n}: trained {t.steps} steps (one epoch, recorded) in {epoch:.1f}s")
    step = step_of_samples(run_dir, n)
    methods = PAIRS_METHODS if cfg.methods == ",".join(DEFAULT_METHODS) else tuple(cfg.method_list())
    results: list[dict[str, Any]] = []
    for method in methods:
        log(f"[{PAIRS_SETUP}] {method} ...")
        opts: dict[str, Any] = {"device": device} if device else {}
        if method.endswith(SELF_SUFFIX):
            results.append(_self_row(method, run_dir, (x, y), mismatched, step, t.steps, epoch, workdir, device, log))
            continue
        try:
            with Measure() as m:
                r = score(run_dir, pairs_model(), CLIP_LOSS, train=(x, y), target=val, method=method,
                          convention="keep", progress=progress, **opts)
        except UnsupportedMethodError as e:
            results.append({"method": method, "variant": _short_error(str(e)), "error": str(e), "processes": 1})
            continue
        s = r.scores.astype(np.float64)
        np.save(workdir / f"{PAIRS_SETUP}-{method}-scores.npy", s)
        row = {"method": method, "variant": r.variant, "processes": 1, "seconds": m.seconds,
               "x_epoch": m.seconds / epoch, "samples_per_second": n / m.seconds, "peak_rss_mb": m.peak_mb,
               "peak_rss_rise_mb": m.rise_mb, "auc_mismatched": detection_auc(mismatched, s),
               "auc_mismatched_by_quarter": auc_by_phase(mismatched, s, step, t.steps),
               "auc_mismatched_by_steps_before_end": auc_by_steps_before_end(mismatched, s, step, t.steps),
               "mean_score_mismatched": float(s[mismatched].mean()), "mean_score_matched": float(s[~mismatched].mean())}
        ok = m.seconds <= LIMIT_SECONDS and m.peak_mb <= LIMIT_RSS_MB
        if method == "diffin":
            ok = ok and row["x_epoch"] <= LIMIT_X_EPOCH
        row["within_limits"] = bool(ok)
        results.append(row)
        log(f"[{PAIRS_SETUP}] {method}: {m.seconds:.1f}s = {row['x_epoch']:.2f}× the epoch, peak RSS "
            f"{m.peak_mb:.0f} MiB, mismatched-pair AUC {row['auc_mismatched']:.4f}")
    (xa_c, xb_c), _ = memmap_pairs(data_dir, writable_view=True)
    with Measure() as m:
        cos = clip_scores(model, (torch.from_numpy(xa_c), torch.from_numpy(xb_c)))
    results.append({"method": "clip-score", "variant": "cosine of the pair under the trained model", "processes": 1,
                    "seconds": m.seconds, "x_epoch": m.seconds / epoch, "samples_per_second": n / m.seconds,
                    "peak_rss_mb": m.peak_mb, "peak_rss_rise_mb": m.rise_mb,
                    "auc_mismatched": detection_auc(mismatched, cos),
                    "auc_mismatched_by_quarter": auc_by_phase(mismatched, cos, step, t.steps),
                    "auc_mismatched_by_steps_before_end": auc_by_steps_before_end(mismatched, cos, step, t.steps)})
    np.save(workdir / f"{PAIRS_SETUP}-clip-score.npy", cos)
    log(f"[{PAIRS_SETUP}] clip-score: mismatched-pair AUC {results[-1]['auc_mismatched']:.4f}")
    setup = get_setup(PAIRS_SETUP)
    out: dict[str, Any] = {
        "setup": PAIRS_SETUP,
        "description": setup.description.replace("1,000,000", f"{n:,}"),
        "n_train": n,
        "n_val": int(val[1].shape[0]),
        "n_mismatched": int(mismatched.sum()),
        "n_steps": t.steps,
        "train_seconds": epoch,
        "optimizer": PAIRS_TRAIN.optimizer,
        "clip_grad_norm": None,
        "clipped_fraction": None,
        "loss": "symmetric InfoNCE (diffin.bench.builtin.captions.clip_loss), batch-coupled",
        "target": "InfoNCE of the validation pairs as one batch",
        "data_dir": str(data_dir),
        "device": device or "cpu",
        "train_device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "limits": {"seconds": LIMIT_SECONDS, "peak_rss_mb": LIMIT_RSS_MB, "diffin_x_epoch": LIMIT_X_EPOCH},
        "results": results,
    }
    k = min(n, PAIRS_SPOT_N) if spot_n is None else min(n, spot_n)
    if k > 0:
        spot = _spot_check(data_dir, k, cfg, workdir, progress, log)
        out["spot_check"] = spot
        out["ground_truth"] = {"kind": "replayed-removal", "convention": "keep", "n_removed": spot["n_removed"],
                               "n_train": spot["n_train"], "dtype": "float64", "seconds": spot["replay_seconds"],
                               "removed_ids": spot["removed_ids"]}
    else:
        out["ground_truth"] = {"kind": "none", "n_removed": 0, "seconds": 0.0}
    return out


def table_rows(result: dict[str, Any]) -> list[list[Any]]:
    """Rows of :data:`PAIRS_COLUMNS` for a result of :func:`run_scale_pairs`."""
    return [[r.get(c, "") if c in ("method", "variant") else r.get(c, float("nan")) for c in PAIRS_COLUMNS]
            for r in result["results"]]


def plot_detection(result: dict[str, Any], workdir: Path, path: str | Path) -> None:
    """ROC curves of mismatched-pair detection (one per row of ``result`` whose scores were saved in
    ``workdir`` by :func:`run_scale_pairs`) and AUC within each quarter of the epoch, PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    from .._io import atomic_write

    mis = np.load(Path(result["data_dir"]) / "mismatched.npy")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ticks: list[str] = []
    for row in result["results"]:
        name = row["method"]
        f = workdir / (f"{PAIRS_SETUP}-clip-score.npy" if name == "clip-score" else f"{PAIRS_SETUP}-{name}-scores.npy")
        if "error" in row or not f.exists():
            continue
        fpr, tpr, _ = roc_curve(mis, -np.load(f))
        a.plot(fpr, tpr, label=f"{name} (AUC {row['auc_mismatched']:.3f})")
        q = row.get("auc_mismatched_by_steps_before_end")
        if q:
            b.plot(range(len(q)), [c["auc"] for c in q], "o-", label=name)
            ticks = [f"{c['from']}–{c['to'] - 1}" if c["to"] is not None else f"≥ {c['from']}" for c in q]
    a.plot([0, 1], [0, 1], ":", color="gray")
    a.set(xlabel="false positive rate (matched pairs flagged)", ylabel="true positive rate (mismatched found)",
          title=f"mismatched pairs, N={result['n_train']:,}")
    a.legend(loc="lower right")
    b.axhline(0.5, ls=":", color="gray")
    if ticks:
        b.set_xticks(range(len(ticks)), ticks)
    b.set(xlabel="steps between the pair's step and the end of the run", ylabel="ROC-AUC within the bin",
          title="detection by when a pair was used", ylim=(0.3, 1.0))
    b.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
