"""What limits ``diffin-retrain`` against a reseeded truth: LDS of estimator variants on one cached truth.

The truth is ``diffin bench``'s reseeded LDS truth (the same subsets and seeds: ``BenchConfig(truth=
"reseed")``), computed once into ``WORK/truth.npz`` and reused. Rows (one recorded run unless said):

* ``diffin-retrain`` as it is, and with the options that touch each suspect: the proxy batches
  (size, seed), exact HVPs instead of finite differences, the credit paid every step instead of once
  per checkpoint segment, several runs averaged;
* the linearisation point: ``diffin-retrain`` on runs recorded at learning rate s·η (under ``keep``,
  the expected run of a subset keeping s of the data trains like that), and ``removal_fraction``.

    python benchmarks/retrain_horizon.py --setup mnist5k-mlp-clean --work bench-out/horizon --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

import diffin
from diffin import metrics
from diffin.bench import BenchConfig
from diffin.bench.builtin import get_setup
from diffin.bench.builtin.trainer import train
from diffin.groundtruth import retrain_truth

VARIANTS: list[tuple[str, dict[str, Any], int]] = [
    ("diffin-retrain", {}, 1),
    ("proxy batch 128", {"proxy_batch_size": 128}, 1),
    ("proxy batch 512", {"proxy_batch_size": 512}, 1),
    ("proxy seed 1", {"seed": 1}, 1),
    ("proxy seed 2", {"seed": 2}, 1),
    ("exact HVPs", {"hvp": "exact"}, 1),
    ("credit every step", {"credit_every": 1}, 1),
    ("removal_fraction 0.5", {"removal_fraction": 0.5}, 1),
    ("diffin-retrain", {}, 5),
    ("removal_fraction 0.5", {"removal_fraction": 0.5}, 5),
]
LR_SCALES = (0.2, 0.35, 0.5, 0.75, 1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", default="mnist5k-mlp-clean")
    p.add_argument("--work", default="bench-out/horizon", help="folder for the runs and the cached truth")
    p.add_argument("--seeds", type=int, default=10, help="truth seeds per subset")
    p.add_argument("--subsets", type=int, default=None, help="LDS subsets (default: the bench's 200)")
    p.add_argument("--runs", type=int, default=5, help="independently recorded runs for the averaged rows")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    work = Path(a.work)
    setup = get_setup(a.setup)
    data = setup.data()
    train_xy, val = (data.x_train, data.y_train), (data.x_val, data.y_val)
    dirs = []
    for k in range(a.runs):
        sk = setup.with_changes(train=replace(setup.train, seed=setup.train.seed + k), noise_seed=setup.train.seed)
        d = work / f"run{k}"
        if not (d / "manifest.json").exists():
            train(sk.model(data), *train_xy, sk.train, d, loss=setup.loss_fn, overwrite=True)
        dirs.append(d)
    cache = work / "truth.npz"
    masks = BenchConfig(truth="reseed", lds_subsets=a.subsets).lds_masks(data.n_train)
    saved = np.load(cache) if cache.exists() else None
    if saved is not None and np.array_equal(saved["masks"], masks) and saved["values"].shape[1] == a.seeds:
        values = saved["values"]
    else:
        tr = retrain_truth(dirs[0], setup.model(data), setup.loss_fn, train=train_xy, target=val, masks=masks,
                           mode="reseed", n_seeds=a.seeds, seed=0, progress=False)
        values = tr.values
        np.savez(cache, masks=masks, values=values)
    truth = values.mean(axis=1)

    def lds(runs: Any, **options: Any) -> tuple[float, float]:
        t0 = time.perf_counter()
        s = diffin.influence(runs, setup.model(data), setup.loss_fn, train=train_xy, target=val,
                             method="diffin-retrain", progress=False, **options)
        return metrics.lds(masks, truth, s.astype(np.float64)), time.perf_counter() - t0

    rows = []
    for label, options, n_runs in VARIANTS:
        if n_runs > len(dirs):
            continue
        v, sec = lds(dirs[0] if n_runs == 1 else dirs[:n_runs], **options)
        rows.append({"variant": label, "runs": n_runs, "options": options, "lds_reseed": v, "seconds": sec})
    for scale in LR_SCALES:
        d = work / f"lr{scale:g}"
        ss = setup.with_changes(train=replace(setup.train, lr=setup.train.lr * scale))
        if not (d / "manifest.json").exists():
            train(ss.model(data), *train_xy, ss.train, d, loss=setup.loss_fn, overwrite=True)
        v, sec = lds(d)
        rows.append({"variant": f"run recorded at lr x {scale:g}", "runs": 1, "options": {}, "lds_reseed": v,
                     "seconds": sec})
    print(f"{setup.name}: reseeded truth, {len(masks)} subsets x {values.shape[1]} seeds\n")
    print("| variant | runs | LDS reseed | seconds |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['runs']} | {r['lds_reseed']:.3f} | {r['seconds']:.1f} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"setup": setup.name, "n_subsets": int(len(masks)),
                                            "n_seeds": int(values.shape[1]), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
