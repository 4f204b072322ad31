"""Finding bad labels where the loss cannot (issue 23): detection and removal on the memorising setups.

For each setup and training seed, ``diffin clean`` flags by every method (the fraction of the setup's
label noise), measures how well each finds the corrupted labels (ROC-AUC, recall when inspecting 5/10/20%
of the data), then trains from scratch without each method's flags (the setup's recipe, the same seed for
every method) and evaluates on the test set. The table gives the mean over the seeds; the JSON every seed.

    OMP_NUM_THREADS=1 python benchmarks/clean_detect.py --setups mnist5k-memorise,mnist5k-asym,mnist5k-human \\
        --seeds 0,1,2 --out bench-out/clean-detect
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diffin.bench.builtin import get_setup
from diffin.report import text_table, winner
from diffin.tasks import CleanConfig, builtin_inputs, clean

BASELINES = ("loss", "aum", "el2n", "forgetting", "cleanlab", "tracin", "tracin-self")
DETECTORS = ("diffin-classes+tracin-classes+cleanlab", "tracin-classes+cleanlab", "tracin-classes", "diffin-classes",
             "diffin")


def run_one(setup: str, seed: int, out: Path, methods: list[str], retrain: bool) -> dict:
    noise = get_setup(setup).noise
    inp = builtin_inputs(setup, None, out / f"{setup}-s{seed}", seed=seed)
    cfg = CleanConfig(method=methods[0], baselines=",".join(methods[1:]), fraction=noise,
                      retrain_seeds=1 if retrain else 0)
    res = clean(inp, cfg, out / f"{setup}-s{seed}", progress=False, log=print)
    res["seed"] = seed
    return res


def table(results: list[dict]) -> tuple[list[str], list[list[object]]]:
    methods = list(results[0]["detection"])
    header = ["method", "ROC-AUC", "± std", "recall @5%", "recall @10%", "recall @20%"]
    fresh = all("retrain_fresh" in r for r in results)
    if fresh:
        header += ["test acc. after removal", "± std"]
    rows = []
    for m in methods:
        aucs = [r["detection"][m]["auc"] for r in results]
        rec = {f: np.mean([r["detection"][m]["recall_at"][f] for r in results]) for f in ("0.05", "0.1", "0.2")}
        row: list[object] = [m, float(np.mean(aucs)), float(np.std(aucs)), *rec.values()]
        if fresh:
            accs = [r["retrain_fresh"]["removals"][m]["test_accuracy_mean"] for r in results]
            row += [float(np.mean(accs)), float(np.std(accs))]
        rows.append(row)
    if fresh:
        for ctrl in ("none", "random", "oracle"):
            accs = [r["retrain_fresh"]["removals"][ctrl]["test_accuracy_mean"] for r in results]
            rows.append([f"({ctrl} removed)", None, None, None, None, None, float(np.mean(accs)), float(np.std(accs))])
    return header, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", default="mnist5k-memorise,mnist5k-asym,mnist5k-human")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(DETECTORS + BASELINES),
                    help="the first flags; all are measured")
    ap.add_argument("--no-retrain", action="store_true", help="detection only")
    ap.add_argument("--out", default="bench-out/clean-detect")
    args = ap.parse_args()
    out = Path(args.out)
    methods = [m for m in args.methods.split(",") if m]
    summary: dict[str, dict] = {}
    for setup in args.setups.split(","):
        results = []
        for seed in (int(s) for s in args.seeds.split(",")):
            t0 = time.perf_counter()
            results.append(run_one(setup, seed, out, methods, not args.no_retrain))
            print(f"{setup} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
        header, rows = table(results)
        aucs = {r[0]: r[1] for r in rows if r[1] is not None}
        print(f"\n{setup} ({len(results)} seeds):\n" + text_table(header, rows))
        print(winner(aucs, "ROC-AUC")["line"], flush=True)
        summary[setup] = {"header": header, "rows": rows, "seeds": [r["seed"] for r in results],
                          "per_seed": [{k: r[k] for k in ("detection", "retrain_fresh", "seconds", "horizon")
                                        if k in r} for r in results]}
        out.mkdir(parents=True, exist_ok=True)
        (out / "clean_detect.json").write_text(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()
