"""Render the JSON of `diffin bench` (one or all setups) as Markdown tables.

    python benchmarks/render_bench.py bench-out/all.json > tables.md
"""

from __future__ import annotations

import argparse
import math

from diffin.bench import load_results
from diffin.report import markdown_table

COLUMNS = [("method", "method"), ("variant", "variant"), ("pearson", "Pearson"), ("spearman", "Spearman"),
           ("kendall", "Kendall τ"), ("jaccard_top10", "top-10 Jaccard"), ("mae", "MAE"), ("lds", "LDS"),
           ("lds_per_example", "LDS per example"), ("seconds", "seconds"), ("peak_rss_rise_mb", "peak RSS rise MB")]


def render(path: str) -> str:
    out = []
    for r in load_results(path):
        gt = r["ground_truth"]
        lds = r.get("lds")
        head = (f"### {r['setup']}\n\n{r['description']}. N = {r['n_train']}, {r['n_steps']} steps, trained in "
                f"{r['train_seconds']:.2f} s. Ground truth: {gt['n_removed']} replayed removals "
                f"(`{gt['convention']}`) in {gt['seconds']:.1f} s")
        if lds:
            head += (f"; LDS: {lds['n_subsets']} subsets of {lds['fraction']:.0%}, per-example LDS on "
                     f"{lds['n_examples']} validation examples, replayed in {lds['seconds']:.1f} s")
        rows = []
        for row in r["results"]:
            if "error" in row:
                rows.append([row["method"], "error: " + row["error"][:60]] + [""] * (len(COLUMNS) - 2))
                continue
            rows.append([row.get(k, math.nan) if k not in ("method", "variant") else row.get(k, "")
                         for k, _ in COLUMNS])
        text = head + ".\n\n" + markdown_table([c for _, c in COLUMNS], rows) + "\n"
        errors = [f"- `{row['method']}`: `{row['error']}`" for row in r["results"] if "error" in row]
        if errors:  # the table cuts them short; the full text is what a reader needs
            text += "\nRows without numbers, with the exact error text from the JSON:\n\n" + "\n".join(errors) + "\n"
        out.append(text)
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json", help="output of diffin bench --json")
    print(render(ap.parse_args().json))
