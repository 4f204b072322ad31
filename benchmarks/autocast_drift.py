"""Float32 scoring of a run trained under bf16 / fp16 autocast: what drifts and by how much
(docs/method.md §4.6).

A built-in setup's data and model (default ``synthetic``: 1,000 samples, MLP 20-32-4 tanh; SGD
lr 0.1, batch 32, 5 epochs, a checkpoint every 32 steps), with float32 parameters, trained three times with the same
initialisation and batch order: once in plain float32 (the reference), once with the forward
pass under ``torch.autocast("cpu", dtype=torch.bfloat16)`` and once under ``torch.float16``. Each
run is scored in float32 (diffin replays and differentiates in float32, without autocast) with
``diffin-exact`` and ``tracin`` against the validation loss. Reported per run: the replay drift
(``diagnostics["replay_drift"]``: how far the float32 replay of a segment lands from the recorded
checkpoint, relative to the segment's movement) and whether :class:`diffin.ReplayDriftWarning`
fired; per autocast run, its scores against the reference run's scores (Pearson, Spearman, largest
difference relative to the largest reference score, overlap of the 10% most harmful).

    python benchmarks/autocast_drift.py --json bench-out/autocast_drift.json
    python benchmarks/autocast_drift.py --setup mnist5k-mlp --json bench-out/autocast_drift_mnist.json
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

import diffin
from diffin._io import write_json
from diffin.bench.builtin import get_setup
from diffin.bench.builtin.trainer import batch_order

METHODS = ("diffin-exact", "tracin")
MODES: dict[str, torch.dtype | None] = {"float32": None, "bf16-autocast": torch.bfloat16,
                                        "fp16-autocast": torch.float16}


def record(run_dir: Path, setup: Any, split: Any, autocast: torch.dtype | None) -> None:
    """Train the setup's model in float32 with the user's loop, the forward (model and loss)
    under CPU autocast at ``autocast`` (None: none), and record it."""
    cfg = setup.train
    model = setup.model(split).to(torch.float32)
    x, y = split.x_train.to(torch.float32), split.y_train
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    with diffin.Recorder(run_dir, model, optimizer=opt, checkpoint_every=cfg.checkpoint_every,
                         n_train=len(y), overwrite=True) as rec:
        for ids in batch_order(len(y), cfg.batch_size, cfg.epochs, cfg.seed):
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                loss = setup.loss_fn(model(x[ids]), y[ids]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(ids)


def score(run_dir: Path, setup: Any, split: Any, method: str) -> tuple[np.ndarray, float, bool]:
    """Float32 scores (N,), the replay drift and whether a ReplayDriftWarning fired."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = diffin.score(run_dir, setup.model(split).to(torch.float32), setup.loss_fn,
                           train=(split.x_train.to(torch.float32), split.y_train),
                           target=(split.x_val.to(torch.float32), split.y_val), method=method, progress=False)
    warned = any(issubclass(w.category, diffin.ReplayDriftWarning) for w in caught)
    return res.scores, float(res.diagnostics.get("replay_drift", 0.0)), warned


def compare(s: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    k = max(1, len(ref) // 10)
    worst_s, worst_r = set(np.argsort(s)[:k].tolist()), set(np.argsort(ref)[:k].tolist())
    return {
        "pearson": float(np.corrcoef(s, ref)[0, 1]),
        "spearman": float(spearmanr(s, ref).statistic),
        "max_rel_diff": float(np.abs(s - ref).max() / np.abs(ref).max()),
        "harmful_10pct_overlap": len(worst_s & worst_r) / k,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON here")
    ap.add_argument("--setup", default="synthetic", help="a built-in setup (default: synthetic, no download)")
    ap.add_argument("--workdir", default=None, help="where to record the runs (default: a temp folder)")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="diffin-autocast-"))
    setup = get_setup(args.setup)
    split = setup.data()
    scores: dict[str, dict[str, np.ndarray]] = {}
    rows: list[dict[str, Any]] = []
    for mode, dt in MODES.items():
        record(workdir / mode, setup, split, dt)
        scores[mode] = {}
        for method in METHODS:
            s, drift, warned = score(workdir / mode, setup, split, method)
            scores[mode][method] = s
            row: dict[str, Any] = {"run": mode, "method": method, "replay_drift": drift, "drift_warning": warned}
            if mode != "float32":
                row.update(compare(s, scores["float32"][method]))
            rows.append(row)
    print(f"{'run':14} {'method':13} {'replay drift':>12} {'warn':>5} {'1-pearson':>9} {'1-spearman':>10} "
          f"{'max rel diff':>12} {'worst 10%':>9}")
    for r in rows:
        extra = (f"{1 - r['pearson']:9.1e} {1 - r['spearman']:10.1e} {r['max_rel_diff']:12.2e} "
                 f"{r['harmful_10pct_overlap']:9.2f}" if "pearson" in r else f"{'(reference)':>9}")
        print(f"{r['run']:14} {r['method']:13} {r['replay_drift']:12.2e} {str(r['drift_warning']):>5} {extra}")
    if args.json:
        write_json(Path(args.json), {"setup": setup.name, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
