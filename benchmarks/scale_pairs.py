"""``scale-1m-pairs`` from the command line, with the options ``diffin bench`` does not have
(docs/method.md §4.7; the same benchmark as ``diffin bench --setup scale-1m-pairs``):

    OMP_NUM_THREADS=1 python benchmarks/scale_pairs.py --workdir WORK --json docs/bench-scale-pairs/scale-1m-pairs.json
    python benchmarks/scale_pairs.py --removal-check --workdir WORK --json docs/bench-scale-pairs/removal-check.json
    python benchmarks/scale_pairs.py --n-train 100000 --device cuda --json gpu-pairs.json
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from diffin._io import write_json
from diffin.bench import BenchConfig, machine_info
from diffin.bench.pairs import (
    N_TRAIN,
    PAIRS_COLUMNS,
    PAIRS_METHODS,
    PAIRS_SETUP,
    PAIRS_SPOT_N,
    REMOVAL_CHECK_PER_KIND,
    pairs_data,
    plot_detection,
    removal_check,
    run_scale_pairs,
    table_rows,
)
from diffin.report import text_table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run :func:`diffin.bench.pairs.run_scale_pairs` (or, with ``--removal-check``,
    :func:`diffin.bench.pairs.removal_check`), print the table, write the JSON (and the detection plot)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=N_TRAIN)
    p.add_argument("--spot-n", type=int, default=None, help=f"pairs of the float64 spot check (default {PAIRS_SPOT_N})")
    p.add_argument("--methods", default=",".join(PAIRS_METHODS))
    p.add_argument("--device", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--removal-check", action="store_true",
                   help="instead of the benchmark: the full-run float64 removal check (removal_check), "
                        f"{REMOVAL_CHECK_PER_KIND} mismatched and {REMOVAL_CHECK_PER_KIND} matched pairs")
    a = p.parse_args(argv)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="diffin-pairs-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.removal_check:
        rc = removal_check(pairs_data(work, a.n_train, 0), a.n_train, work, log=lambda *m: print(*m, flush=True))
        rc["machine"] = machine_info()
        if a.json:
            write_json(a.json, rc)
            print(f"wrote {a.json}")
        return rc
    cfg = BenchConfig(methods=a.methods)
    r = run_scale_pairs(cfg, work, n_train=a.n_train, device=a.device, spot_n=a.spot_n,
                        log=lambda *m: print(*m, flush=True))
    r["machine"] = machine_info()
    r["config"] = dataclasses.asdict(cfg)
    print(f"\n{PAIRS_SETUP}: {r['description']}")
    print(f"N={r['n_train']} ({r['n_mismatched']} mismatched), {r['n_steps']} steps, trained in "
          f"{r['train_seconds']:.2f}s, torch threads {r['torch_threads']}\n")
    print(text_table(PAIRS_COLUMNS, table_rows(r)))
    for row in r["results"]:
        if "auc_mismatched_by_quarter" in row:
            print(f"{row['method']}: AUC by quarter of the epoch "
                  + ", ".join(f"{v:.3f}" for v in row["auc_mismatched_by_quarter"]) + "; by steps before the end "
                  + ", ".join(f"[{c['from']}, {c['to'] if c['to'] is not None else '∞'}): {c['auc']:.3f}"
                              for c in row["auc_mismatched_by_steps_before_end"]))
    sc = r.get("spot_check")
    if sc:
        print(f"\nspot check ({sc['dtype']}, N={sc['n_train']}, {sc['n_steps']} steps, {sc['n_removed']} replayed "
              f"removals): diffin Pearson {sc['pearson']:.4f} (target >= {sc['target_pearson']}), Spearman "
              f"{sc['spearman']:.4f}; tracin Pearson {sc['tracin']['pearson']:.4f}")
    if a.json:
        png = Path(a.json).with_suffix(".png")
        plot_detection(r, work, png)
        r["detection_plot"] = png.name
        write_json(a.json, r)
        print(f"\nwrote {a.json} and {png}")
    return r


if __name__ == "__main__":
    main()
