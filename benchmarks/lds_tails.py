"""Why does the exact sweep's half-data LDS collapse on a setup? Two measurements.

1. Heavy tails: the LDS of the raw scores, of the scores clipped at their 1st / 99th percentiles,
   and of their ranks. If a few huge scores dominate Σ_removed score, clipping lifts the LDS.
2. Trajectory-specific vs position-averaged credit: the Spearman correlation between
   ``diffin-exact`` (credit for the step each sample was actually in) and ``diffin-expected``
   (each sample's expected share of every step). A half-data retrain changes every batch, so a
   sample's position in *this* run says little about its effect there.

    python benchmarks/lds_tails.py --setup mnist5k-cnn --json bench-out/lds-tails-cnn.json   # ~20 s

Prints a table and writes JSON. Uses the LDS subsets of ``diffin bench`` (``BenchConfig.lds_masks``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import diffin
from diffin.bench import BenchConfig
from diffin.bench.builtin import get_setup, train
from diffin.groundtruth import lds_ground_truth
from diffin.metrics import lds
from diffin.report import text_table

METHODS = ("diffin-exact", "diffin-frozen", "diffin-expected", "tracin")


def measure(setup_name: str, workdir: Path, cfg: BenchConfig | None = None) -> dict:
    cfg = cfg or BenchConfig()
    setup = get_setup(setup_name)
    d = setup.data()
    run = workdir / setup_name
    train(setup.model(d), d.x_train, d.y_train, setup.train, run, overwrite=True)
    kw = dict(train=(d.x_train, d.y_train), target=(d.x_val, d.y_val), progress=False)
    masks = cfg.lds_masks(d.n_train)
    actual = lds_ground_truth(run, setup.model(d), setup.loss_fn, masks=masks, **kw)
    rows = []
    scores = {}
    for m in METHODS:
        s = diffin.influence(run, setup.model(d), setup.loss_fn, method=m, **kw)
        scores[m] = s
        lo, hi = np.quantile(s, [0.01, 0.99])
        ranks = np.argsort(np.argsort(s)) / len(s) - 0.5
        top = np.sort(np.abs(s))[::-1]
        rows.append({"method": m, "lds": lds(masks, actual, s),
                     "lds_clipped_1pct": lds(masks, actual, np.clip(s, lo, hi)),
                     "lds_ranks": lds(masks, actual, ranks), "top3_abs": top[:3].tolist(),
                     "median_abs": float(np.median(np.abs(s)))})
    rho = float(spearmanr(scores["diffin-exact"], scores["diffin-expected"])[0])
    return {"setup": setup_name, "n_subsets": cfg.n_lds_subsets(), "fraction": cfg.lds_fraction,
            "actual_change_mean": float(actual.mean()), "actual_change_std": float(actual.std()),
            "spearman_exact_vs_expected": rho, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", default="mnist5k-cnn", help="a named setup of diffin bench")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = measure(args.setup, Path(tmp))
    print(f"{res['setup']}: actual change over {res['n_subsets']} subsets of {res['fraction']:.0%}: "
          f"mean {res['actual_change_mean']:.4f}, std {res['actual_change_std']:.4f}; "
          f"Spearman(diffin-exact, diffin-expected) = {res['spearman_exact_vs_expected']:.3f}")
    print(text_table(["method", "LDS", "LDS clipped 1%", "LDS of ranks", "top-3 |score|", "median |score|"],
                     [[r["method"], r["lds"], r["lds_clipped_1pct"], r["lds_ranks"],
                       " ".join(f"{v:.3g}" for v in r["top3_abs"]), r["median_abs"]] for r in res["rows"]]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
