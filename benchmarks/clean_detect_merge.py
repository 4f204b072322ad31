"""Tables of detection and removal per method over training seeds, merged from several
``benchmarks/clean_detect.py`` outputs of the same setup (e.g. one run per seed, or new detectors run
beside stored baselines): where two files measure the same method on the same seed their numbers must
agree (the same run, recipe and seed give the same flags and the same retrained model), which is checked.

    python benchmarks/clean_detect_merge.py --setups mnist5k-asym \\
        --inputs docs/bench-clean-detect/{setup}.json bench-out/clean-detect2/{setup}-s1/clean_detect.json \\
        --out docs/bench-clean-detect/removal-bar.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from diffin.report import text_table

BASELINES = ("loss", "aum", "el2n", "forgetting", "cleanlab", "tracin", "tracin-self")
CONTROLS = ("none", "random", "oracle")


def merge(records: list[dict[str, Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    """seed → method → {auc, recall_at, acc}; disagreeing duplicates raise."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for rec in records:
        per = out.setdefault(int(rec["seed"]), {})
        rem = rec.get("retrain_fresh", {}).get("removals", {})
        for m in set(rec.get("detection", {})) | set(rem):
            new = {**({"auc": rec["detection"][m]["auc"], "recall_at": rec["detection"][m]["recall_at"]}
                      if m in rec.get("detection", {}) else {}),
                   **({"acc": rem[m]["test_accuracy_mean"]} if m in rem else {})}
            old = per.setdefault(m, {})
            for k in ("auc", "acc"):
                if k in old and k in new and abs(old[k] - new[k]) > 1e-9:
                    raise SystemExit(f"seed {rec['seed']} {m} {k}: {old[k]} != {new[k]} (not the same run/recipe)")
            old.update(new)
    return out


def rows_of(per: dict[int, dict[str, dict[str, Any]]]) -> tuple[list[str], list[list[object]], dict[str, Any]]:
    seeds = sorted(per)
    methods = [m for m in per[seeds[0]] if all(m in per[s] for s in seeds)]
    header = ["method", "ROC-AUC", "± std", "recall @5%", "recall @10%", "recall @20%", "test acc. after removal",
              "± std"]
    rows, summary = [], {}
    for m in sorted(methods, key=lambda m: (m in CONTROLS, m in BASELINES, m)):
        vals = [per[s][m] for s in seeds]
        auc = [v["auc"] for v in vals if "auc" in v]
        acc = [v["acc"] for v in vals if "acc" in v]
        rec = [float(np.mean([v["recall_at"][f] for v in vals])) if len(auc) == len(seeds) else None
               for f in ("0.05", "0.1", "0.2")]
        row = [m if m not in CONTROLS else f"({m} removed)",
               float(np.mean(auc)) if len(auc) == len(seeds) else None,
               float(np.std(auc)) if len(auc) == len(seeds) else None, *rec,
               float(np.mean(acc)) if len(acc) == len(seeds) else None,
               float(np.std(acc)) if len(acc) == len(seeds) else None]
        rows.append(row)
        summary[m] = {"auc_mean": row[1], "auc_std": row[2], "recall_at": dict(zip(("0.05", "0.1", "0.2"), rec)),
                      "acc_mean": row[6], "acc_std": row[7], "per_seed": {s: per[s][m] for s in seeds}}
    return header, rows, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", required=True)
    ap.add_argument("--inputs", nargs="+", required=True, help="clean_detect.json files; {setup} is replaced")
    ap.add_argument("--detectors", default="tracin-classes+cleanlab,diffin-classes+tracin-classes+cleanlab,"
                    "tracin-classes,diffin-classes", help="compared with the best baseline")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result: dict[str, Any] = {}
    for setup in args.setups.split(","):
        records = []
        for pattern in args.inputs:
            p = Path(pattern.format(setup=setup))
            if p.exists():
                d = json.loads(p.read_text())
                d = d.get(setup, d)
                records += [{**r, "seed": s} for r, s in zip(d["per_seed"], d["seeds"])] if "per_seed" in d else [d]
        header, rows, summary = rows_of(merge(records))
        print(f"\n{setup} (seeds {sorted(merge(records))}):\n" + text_table(header, rows))
        base = {m: v for m, v in summary.items() if m in BASELINES}
        best_auc = max(base, key=lambda m: base[m]["auc_mean"])
        best_acc = max(base, key=lambda m: base[m]["acc_mean"])
        bar = {}
        for det in args.detectors.split(","):
            if det not in summary:
                continue
            s = summary[det]
            bar[det] = {"auc": s["auc_mean"], "lead": s["auc_mean"] - base[best_auc]["auc_mean"],
                        "acc": s["acc_mean"], "acc_vs_best_removal": s["acc_mean"] - base[best_acc]["acc_mean"]}
            print(f"{det}: ROC-AUC {s['auc_mean']:.3f} (best baseline {best_auc} {base[best_auc]['auc_mean']:.3f}, "
                  f"lead {bar[det]['lead']:+.3f}); removal {s['acc_mean']:.3f} (best baseline removal {best_acc} "
                  f"{base[best_acc]['acc_mean']:.3f}, {bar[det]['acc_vs_best_removal']:+.4f})")
        result[setup] = {"header": header, "rows": rows, "methods": summary, "best_baseline_auc": best_auc,
                         "best_baseline_removal": best_acc, "bar": bar}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
