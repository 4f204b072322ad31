"""``diffin bench --setup text-bert | text-gpt``: influence on real text, trained by the Hugging Face
``Trainer`` and recorded by :class:`diffin.integrations.huggingface.DiffinCallback`.

For a setup of :data:`diffin.bench.builtin.text_setups.TEXT_SETUPS`: the Trainer trains the model once
without the callback (its own training time, the unit of every ``x_trainer`` column) and once with it
(the recorded run; the two must end at the same θ), the recorded run is replayed with nothing removed
(its drift from the Trainer's θ_T says whether the recording is faithful), then as in
:func:`diffin.bench.run_setup`: replayed removal of ``n_removed`` random samples (same order, same
dropout masks, the sample's weight zero), LDS subsets, each method timed with its peak memory, and the
float64 metagradient through the unrolled run (the linearisation's ceiling).

``text-bert`` adds mislabel detection (ROC-AUC and recall at 10% of the flipped labels) by each
method's harm, by the training loss at θ_T and by cleanlab on out-of-fold probabilities (each fold's
model replayed from the recorded run without that fold). ``text-gpt`` adds per-token targets: the
loss of single held-out tokens (:func:`diffin.integrations.huggingface.token_targets`), scored pairwise
against their replayed removals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import _tree, metrics
from .._api import _eval_mode, score
from .._data import DataSource
from .._functional import FlatModel
from .._measure import Measure
from ..groundtruth import lds_ground_truth, replay_many, replay_removal
from ..recording.run import load_run
from ..trajectory import Trajectory
from .builtin.text_setups import TextSetup, get_text_setup, train_with_trainer
from .harness import DEFAULT_METHODS, BenchConfig, _compare, _scored_row, metagradient_ceiling

TEXT_METHODS = ("diffin", "tracin", "if-cg")
"""The rows of a text setup when ``--methods`` is left at its default."""
DETECTION_AT = (0.05, 0.1, 0.2)
CLEANLAB_FOLDS = 5
TOKEN_PASSAGES = 4  # per-token targets of text-gpt: held-out passages …
TOKENS_PER_PASSAGE = 4  # … and tokens of each, evenly spaced
TEXT_COLUMNS = ("method", "variant", "pearson", "spearman", "kendall", "jaccard_top10", "mae", "lds", "seconds",
                "x_trainer", "peak_rss_mb", "peak_rss_rise_mb")


def _theta_of(model: torch.nn.Module, names: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in names]).double()


def run_text(setup: str | TextSetup, cfg: BenchConfig, workdir: Path, progress: bool = False,
             log: Any = print) -> dict[str, Any]:
    """Benchmark a text setup (its name in :data:`~diffin.bench.builtin.text_setups.TEXT_SETUPS`, or one
    changed from it); returns the JSON-ready result (the fields of :func:`diffin.bench.run_setup`, with
    ``trainer`` and ``detection`` or ``per_token``)."""
    setup = get_text_setup(setup) if isinstance(setup, str) else setup
    name = setup.name
    data = setup.data()
    run_dir = workdir / name
    plain = setup.model(data)
    with Measure() as m_plain:
        t_plain = train_with_trainer(plain, data.x_train, data.y_train, setup.recipe, workdir / f"{name}-trainer")
    log(f"[{name}] Trainer alone: {t_plain.steps} steps in {t_plain.seconds:.1f}s")
    model = setup.model(data)
    with Measure() as m_rec:
        t_rec = train_with_trainer(model, data.x_train, data.y_train, setup.recipe, workdir / f"{name}-trainer",
                                   record_to=run_dir)
    run = load_run(run_dir)
    theta_trainer = _theta_of(model, run.trainable)
    N = data.n_train
    rng = np.random.default_rng(cfg.seed)
    k = min(cfg.n_removed or setup.n_ground_truth, N)
    log(f"[{name}] Trainer with DiffinCallback: {t_rec.seconds:.1f}s; replaying {k} removals ...")
    removed = np.sort(rng.choice(N, size=k, replace=False))
    common = dict(train=(data.x_train, data.y_train), progress=progress)
    val = (data.x_val, data.y_val)
    with Measure() as m_gt:
        actual, theta_replay, thetas = replay_removal(run_dir, setup.model(data), setup.loss_fn, target=val,
                                                      remove=[int(i) for i in removed], convention=cfg.convention,
                                                      return_thetas=True, **common)
    actual = np.asarray(actual, dtype=np.float64)
    drift = float((theta_replay.double() - theta_trainer).norm() / theta_trainer.norm())
    out: dict[str, Any] = {
        "setup": name,
        "description": setup.description,
        "recipe": setup.recipe.describe(),
        "n_train": N,
        "n_val": _tree.batch_len(data.x_val),
        "n_steps": t_rec.steps,
        "train_seconds": t_plain.seconds,
        "optimizer": "adamw",
        "clip_grad_norm": None,  # the Trainer's max_grad_norm is in "trainer" (its clipped share is not measured)
        "clipped_fraction": None,
        "trainer": {"seconds": t_plain.seconds, "max_grad_norm": setup.recipe.max_grad_norm,
                    "train_runtime": t_plain.train_runtime, "peak_rss_mb": m_plain.peak_mb,
                    "recorded_seconds": t_rec.seconds,
                    "recording_overhead": t_rec.seconds / t_plain.seconds, "recorded_peak_rss_mb": m_rec.peak_mb,
                    "train_loss": t_rec.train_loss,
                    "theta_recorded_vs_plain": float((_theta_of(plain, run.trainable) - theta_trainer).abs().max()),
                    "replay_drift": drift},
        "ground_truth": {"kind": "replayed-removal", "convention": cfg.convention, "n_removed": k,
                         "seconds": m_gt.seconds, "removed_ids": removed.tolist(),
                         "abs_mean": float(np.abs(actual).mean())},
    }
    log(f"[{name}] replay drift from the Trainer's θ_T: {drift:.1e}")
    masks = None
    truths: dict[str, np.ndarray] = {}
    n_sub = cfg.lds_subsets if cfg.lds_subsets is not None else setup.lds_subsets
    if n_sub:
        masks = cfg.lds_masks(N)
        log(f"[{name}] replaying {n_sub} LDS subsets ...")
        with Measure() as m_lds:
            truths["replay"] = np.asarray(lds_ground_truth(run_dir, setup.model(data), setup.loss_fn, target=val,
                                                           masks=masks, **common), dtype=np.float64)
        out["lds"] = {"n_subsets": n_sub, "fraction": cfg.lds_fraction, "seconds": m_lds.seconds}
    methods = list(TEXT_METHODS) if cfg.methods == ",".join(DEFAULT_METHODS) else cfg.method_list()
    results, all_scores = [], {}
    for method in methods:
        row = _scored_row(method, method, run_dir, setup, data, cfg, common, removed, actual, masks, truths, log,
                          all_scores)
        if "seconds" in row:
            row["x_trainer"] = row["seconds"] / t_plain.seconds
        results.append(row)
    out["results"] = results
    log(f"[{name}] float64 metagradient through the unrolled run ...")
    out["linearisation_ceiling"] = {"metagradient": metagradient_ceiling(run_dir, setup, data, removed, actual,
                                                                         all_scores.get("diffin"))}
    if setup.task == "classification":
        out["detection"] = detection(setup, data, run_dir, all_scores, log)
    else:
        out["per_token"] = per_token(setup, data, run_dir, removed, theta_replay, thetas, cfg, methods, progress,
                                     log)
        out["per_token"]["replay_seconds"] = m_gt.seconds  # the removals' θ_T are those of the mean target
    return out


def detection(setup: TextSetup, data: Any, run_dir: Path, all_scores: dict[str, np.ndarray],
              log: Any) -> dict[str, Any]:
    """Finding the flipped labels, per signal: each method's harm (−score against the validation
    loss), the training loss at θ_T and cleanlab (``1 −`` label quality of out-of-fold probabilities,
    :data:`CLEANLAB_FOLDS` folds, each fold's model replayed without it); ROC-AUC and recall at
    :data:`DETECTION_AT` of the data inspected. Test accuracy at θ_T too."""
    from .._optional import require

    run = load_run(run_dir)
    fm = FlatModel(setup.model(data), setup.loss_fn, run.trainable)
    src = DataSource((data.x_train, data.y_train), fm.dtype, fm.device)
    traj = Trajectory(run, fm, src)
    flipped = data.flipped
    harms = {m: -s for m, s in all_scores.items()}
    log(f"[{setup.name}] detection: loss, cleanlab ({CLEANLAB_FOLDS} out-of-fold replays) ...")
    with _eval_mode(fm.model), torch.no_grad():
        theta = traj.theta(run.n_steps)
        harms["loss"] = fm.losses(theta, data.x_train, data.y_train).double().numpy()
        test_logits = fm.forward(theta, data.x_test).logits
        order = np.random.default_rng(setup.recipe.seed).permutation(data.n_train)
        folds = np.array_split(order, CLEANLAB_FOLDS)
        with Measure() as m_cl:
            _, thetas = replay_many(traj, [np.sort(f) for f in folds], "renormalize")
            probs = np.zeros((data.n_train, data.n_classes))
            for f, th in zip(folds, thetas):
                idx = torch.as_tensor(np.sort(f))
                probs[idx.numpy()] = fm.forward(th, _tree.index(data.x_train, idx)).logits.softmax(-1).double().numpy()
    quality = require("cleanlab.rank", "cleanlab", "the cleanlab baseline", "clean").get_label_quality_scores
    labels = data.y_train.numpy()
    harms["cleanlab"] = 1.0 - quality(labels, probs)
    rows = {name: {"auc": metrics.detection_auc(-h, flipped),
                   "recall_at": {str(f): r for f, r in metrics.recall_at(-h, flipped, DETECTION_AT).items()}}
            for name, h in harms.items()}
    return {"n_flipped": int(flipped.sum()), "methods": rows, "cleanlab_seconds": m_cl.seconds,
            "cleanlab_out_of_fold_accuracy": float((probs.argmax(1) == labels).mean()),
            "test_accuracy": float((test_logits.argmax(1) == data.y_test).double().mean()),
            "test_loss": float(torch.nn.functional.cross_entropy(test_logits, data.y_test))}


def per_token(setup: TextSetup, data: Any, run_dir: Path, removed: np.ndarray, theta_full: torch.Tensor,
              thetas: torch.Tensor, cfg: BenchConfig, methods: list[str], progress: bool, log: Any) -> dict[str, Any]:
    """Per-token targets of a causal LM: the loss of predicting one held-out token, for
    :data:`TOKENS_PER_PASSAGE` evenly spaced tokens of the first :data:`TOKEN_PASSAGES` held-out
    passages (Q targets); each method scores pairwise (N, Q); the replayed removals' final θ
    (``thetas`` (k, P), ``theta_full`` (P,) the replay with nothing removed) give the truth (k, Q).
    Pearson and Spearman over all (removal, token) pairs, and the median over tokens of each token's
    Pearson."""
    from ..integrations.huggingface import token_targets

    ids = data.x_val["input_ids"][:TOKEN_PASSAGES]
    L = ids.shape[1]
    where = np.linspace(L // TOKENS_PER_PASSAGE, L - 1, TOKENS_PER_PASSAGE).astype(int)
    rows, cols = np.repeat(np.arange(len(ids)), len(where)), np.tile(where, len(ids))
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    mask[torch.arange(len(rows)), torch.as_tensor(cols)] = True
    target = token_targets(ids[torch.as_tensor(rows)], mask)
    fm = FlatModel(setup.model(data), setup.loss_fn, load_run(run_dir).trainable)
    with _eval_mode(fm.model), torch.no_grad():
        base = fm.losses(theta_full, *target)
        actual = torch.stack([fm.losses(th, *target) - base for th in thetas]).double().numpy()  # (k, Q)
    log(f"[{setup.name}] per-token targets: {len(rows)} tokens against {len(removed)} replayed removals ...")
    out: dict[str, Any] = {"n_tokens": len(rows), "passages": int(len(ids)), "positions": where.tolist(),
                           "abs_mean": float(np.abs(actual).mean()), "results": []}
    common = dict(train=(data.x_train, data.y_train), progress=progress)
    for method in methods:
        log(f"[{setup.name}] per-token {method} ...")
        with Measure() as m:
            r = score(run_dir, setup.model(data), setup.loss_fn, target=target, method=method, pairwise=True,
                      convention=cfg.convention, **common)
        s = r.scores.astype(np.float64)[removed]  # (k, Q)
        per = [metrics.pearson(s[:, q], actual[:, q]) for q in range(s.shape[1])]
        out["results"].append({"method": method, "variant": r.variant, "seconds": m.seconds,
                               "peak_rss_mb": m.peak_mb, "median_token_pearson": float(np.median(per)),
                               **{k_: v for k_, v in _compare(s.ravel(), actual.ravel(), False).items()
                                  if k_ in ("pearson", "spearman", "mae")}})
    return out


def summary_text(result: dict[str, Any]) -> str:
    """The text setups' tables beside the main one: the Trainer's run, detection or per-token rows."""
    from ..report import text_table

    tr = result["trainer"]
    parts = [f"Trainer alone {tr['seconds']:.1f}s (train_runtime {tr['train_runtime']:.1f}s), with DiffinCallback "
             f"{tr['recorded_seconds']:.1f}s ({tr['recording_overhead']:.2f}×); θ_T of the two runs differ by "
             f"{tr['theta_recorded_vs_plain']:.1e} (max abs); replay drift from the Trainer's θ_T "
             f"{tr['replay_drift']:.1e} (relative); replayed effects |mean| {result['ground_truth']['abs_mean']:.2e}"]
    if "detection" in result:
        d = result["detection"]
        parts.append(f"\nfinding the {d['n_flipped']} flipped labels (test accuracy at θ_T {d['test_accuracy']:.3f}, "
                     f"cleanlab's out-of-fold accuracy {d['cleanlab_out_of_fold_accuracy']:.3f}):\n")
        rows = [[m, v["auc"], *v["recall_at"].values()] for m, v in d["methods"].items()]
        parts.append(text_table(["signal", "ROC-AUC", *[f"recall @{f:.0%}" for f in DETECTION_AT]], rows))
    if "per_token" in result:
        p = result["per_token"]
        parts.append(f"\nper-token targets ({p['n_tokens']} held-out tokens of {p['passages']} passages, pairwise, "
                     f"against {result['ground_truth']['n_removed']} replayed removals each; |mean| "
                     f"{p['abs_mean']:.2e}):\n")
        cols = ("method", "variant", "pearson", "spearman", "median_token_pearson", "mae", "seconds", "peak_rss_mb")
        parts.append(text_table(list(cols), [[r.get(c, float("nan")) for c in cols] for r in p["results"]]))
    return "\n".join(parts)

