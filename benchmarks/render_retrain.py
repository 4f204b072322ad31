"""Markdown tables of ``diffin bench --truth ...`` results: LDS of every method against each
truth (replay / reshuffle / reseed) with its 95% bootstrap interval, and the paired difference to
TracIn on the retraining truths.

    python benchmarks/render_retrain.py bench-out/retrain-mnist5k-mlp.json [more.json ...]
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

MODES = ("replay", "reshuffle", "reseed")


def _cell(row: dict[str, Any], mode: str) -> str:
    v = row.get(f"lds_{mode}")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    ci = row.get(f"lds_{mode}_ci")
    return f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{v:.3f}"


def _diff(row: dict[str, Any], mode: str) -> str:
    d = row.get(f"lds_{mode}_vs_tracin")
    if not d:
        return "–"
    return f"{d['diff']:+.3f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def render(result: dict[str, Any]) -> str:
    modes = [m for m in MODES if m in result.get("truth", {})]
    lines = [f"### {result['setup']}: {result['description']}", ""]
    info = [f"`{m}`: {t['n_subsets']} subsets × {t['n_seeds']} seeds, {t['seconds']:.0f} s"
            + (f", noise ceiling {t['noise_ceiling']:.3f}" if not math.isnan(t["noise_ceiling"]) else "")
            for m, t in result["truth"].items()]
    lines += ["Truths: " + "; ".join(info) + ".", ""]
    retrain_modes = [m for m in modes if m != "replay"]
    head = ["method", "runs"] + [f"LDS {m}" for m in modes] + [f"{m} − tracin" for m in retrain_modes] + ["seconds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["results"]:
        if row.get("error"):
            continue
        name = row["method"].split(" ×")[0]
        label = f"`{name}`" + (f" ({row['variant']})" if row.get("variant") not in (None, name) else "")
        cells = [label, str(row.get("runs", 1))] + [_cell(row, m) for m in modes]
        cells += [_diff(row, m) for m in retrain_modes] + [f"{row.get('seconds', float('nan')):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+")
    args = ap.parse_args()
    for path in args.json:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for result in data if isinstance(data, list) else data.get("results_by_setup", [data]):
            print(render(result))


if __name__ == "__main__":
    main()
