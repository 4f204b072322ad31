"""Cross-fitted (out-of-fold) per-class influence against in-sample per-class influence and cleanlab
(issue 23; a measured negative result, BENCHMARKS.md "Removal that beats the best baseline").

Each of 5 folds (seeded) is held out in turn: a model is trained with the setup's recipe on the other
folds and recorded, and the held-out samples are scored on that run, up to its best-validation
checkpoint, against the mean loss of every validation class. A held-out sample was never trained on, so
its score is the predicted effect of *adding* it (TracIn-CP's gradient alignment at the checkpoint, or
Diff-In's ``diffin-retrain``, which credits every sample its expected share |B|/N of every step): the
flipped label cannot hide behind memorisation, cleanlab's idea applied to influence. Harm: each class
column's percentile, the highest over the classes, ranked over all samples (``global``) or within the
sample's fold (``in-fold``).

    OMP_NUM_THREADS=1 python benchmarks/clean_oof.py --setups mnist5k-asym,mnist5k-memorise --seed 0 \\
        --methods tracin,diffin-retrain --out bench-out/clean-oof
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffin._api import score
from diffin._data import DataSource
from diffin._errors import ConfigError
from diffin._functional import FlatModel
from diffin.config import ScoreConfig
from diffin.metrics import detection_auc
from diffin.recording.run import Run, load_run
from diffin.report import text_table
from diffin.targets import GroupMeanLoss
from diffin.tasks import builtin_inputs
from diffin.tasks._classes import percentile_max
from diffin.tasks._clean import out_of_fold_probs
from diffin.tasks._common import Recipe, TaskInputs, losses_at
from diffin.trajectory import Trajectory


def _best_val_step(inp: TaskInputs, run: Run, seen: np.ndarray) -> tuple[int, list[float]]:
    """The checkpoint with the lowest mean validation loss among those by which every id in
    ``seen`` has been trained on (a fold's run: its kept ids), and the curve."""
    fm = FlatModel(inp.model_factory(), inp.loss_fn, run.trainable)
    traj = Trajectory(run, fm)
    curve = [float(losses_at(fm, traj.theta(c), inp.val).mean()) for c in run.checkpoint_steps]
    first = run.n_steps
    if run.has_batch_ids:
        mask = np.zeros(inp.n_train, dtype=bool)
        mask[seen] = True
        for t in range(run.n_steps):
            mask[run.batch(t)] = False
            if not mask.any():
                first = t + 1
                break
    allowed = [i for i, c in enumerate(run.checkpoint_steps) if c >= max(first, 1)] or [len(curve) - 1]
    best = min(allowed, key=lambda i: curve[i])
    return run.checkpoint_steps[best], curve


def oof_class_scores(method: str, inp: TaskInputs, recipe: Recipe, folds: int, seed: int, horizon: str,
                     progress: bool, notes: dict[str, Any], config: ScoreConfig | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitted per-class influence: split the training ids into ``folds`` (seeded), train a
    model with ``recipe`` on all folds but one, and score the held-out fold's samples on that run
    up to its horizon against each class of the validation set. A held-out sample was never
    trained on, so its score is the predicted effect of *adding* it (credited its expected share
    |B|/N of every step; memorisation cannot hide it). Returns the scores (N, C) (sign as
    ``score``: the validation class loss change if removed) and each sample's fold (N,)."""


    if inp.val is None:
        raise ConfigError(f"{method}-oof needs a validation set with class labels")
    xv, yv = inp.val
    if yv.is_floating_point() or yv.ndim != 1:
        raise ConfigError(f"{method}-oof needs integer class labels in the validation set")
    x, y = inp.train
    N = inp.n_train
    order = np.random.default_rng(seed).permutation(N)
    parts = np.array_split(order, folds)
    labels = yv.detach().cpu().numpy()
    present = np.unique(labels)
    groups = np.searchsorted(present, labels)
    S = np.zeros((N, len(present)))
    fold_of = np.zeros(N, dtype=np.int64)
    info = []
    cfg = config if config is not None else ScoreConfig(method=method)
    with tempfile.TemporaryDirectory() as tmp:
        for k, held in enumerate(parts):
            keep = np.sort(np.setdiff1d(order, held))
            d = Path(tmp) / f"fold{k}"
            recipe.train(inp.model_factory(), x, y, d, keep, recipe.config.seed, inp.loss_fn)
            full = load_run(d)
            if horizon == "best-val":
                step, curve = _best_val_step(inp, full, keep)
            else:
                step, curve = (full.n_steps if horizon == "end" else int(horizon)), None
            run = full.until(step)
            fm = FlatModel(inp.model_factory(), inp.loss_fn, run.trainable)
            tgt = GroupMeanLoss(DataSource(inp.val, fm.dtype, fm.device, name="target"), groups)
            res = score(run, inp.model_factory(), inp.loss_fn, train=inp.train, target=tgt, config=cfg,
                        progress=progress)
            S[held] = res.scores.astype(np.float64)[held]
            fold_of[held] = k
            info.append({"step": step, "of": full.n_steps, "val_loss_at_checkpoints": curve})
    notes.setdefault("horizon", {})[f"{method}-oof"] = {"rule": horizon, "folds": info}
    return S, fold_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", default="mnist5k-asym,mnist5k-memorise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="tracin,diffin-retrain")
    ap.add_argument("--out", default="bench-out/clean-oof")
    args = ap.parse_args()
    from cleanlab.rank import get_label_quality_scores

    rows: list[list[object]] = []
    res: dict[str, Any] = {}
    for setup in args.setups.split(","):
        out = Path(args.out) / f"{setup}-s{args.seed}"
        inp = builtin_inputs(setup, None, out, seed=args.seed)
        recipe = inp.recipe()
        probs = out_of_fold_probs(inp, recipe, 5, 0)
        cl = 1.0 - get_label_quality_scores(inp.labels, probs)
        res[setup] = {"cleanlab": detection_auc(-cl, inp.flipped)}
        rows.append([setup, "cleanlab", res[setup]["cleanlab"], None, None])
        for m in args.methods.split(","):
            cfg = ScoreConfig(method=m, credit_every=1) if m == "diffin-retrain" else ScoreConfig(method=m)
            t0 = time.perf_counter()
            S, fold = oof_class_scores(m, inp, recipe, 5, 0, "best-val", False, {}, cfg)
            secs = time.perf_counter() - t0
            h = percentile_max(S)
            h_in = np.zeros(len(h))
            for k in np.unique(fold):
                h_in[fold == k] = percentile_max(S[fold == k])
            res[setup][f"{m}-oof"] = {"global": detection_auc(-h, inp.flipped),
                                      "in-fold": detection_auc(-h_in, inp.flipped), "seconds": secs}
            rows.append([setup, f"{m}-oof", res[setup][f"{m}-oof"]["global"], res[setup][f"{m}-oof"]["in-fold"], secs])
            print(text_table(["setup", "method", "ROC-AUC (global)", "ROC-AUC (in-fold)", "s"], rows[-1:]), flush=True)
    print(text_table(["setup", "method", "ROC-AUC (global)", "ROC-AUC (in-fold)", "s"], rows))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "clean_oof.json").write_text(json.dumps({"seed": args.seed, "results": res}, indent=1))


if __name__ == "__main__":
    main()
