"""``diffin bench``: run the named setups (:func:`run_bench`), print their tables, write the JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .._io import write_json
from .harness import BenchConfig, machine_info, run_setup
from .pairs import PAIRS_COLUMNS, PAIRS_SETUP, plot_detection, run_scale_pairs
from .scale import SCALE_COLUMNS, SCALE_SETUP, SIZES_COLUMNS, run_scale

TABLE_COLUMNS = ("method", "variant", "pearson", "spearman", "kendall", "jaccard_top10", "mae", "lds",
                 "lds_per_example", "seconds", "peak_rss_rise_mb")


def table_columns(result: dict[str, Any]) -> tuple[str, ...]:
    """:data:`TABLE_COLUMNS` with ``lds`` replaced by one ``lds_<mode>`` column per truth when a
    retraining truth was measured."""
    if result.get("setup") == SCALE_SETUP:
        return SCALE_COLUMNS
    if result.get("setup") == PAIRS_SETUP:
        return PAIRS_COLUMNS
    modes = list(result.get("truth", {}))
    if not modes or modes == ["replay"]:
        return TABLE_COLUMNS
    i = TABLE_COLUMNS.index("lds")
    return (*TABLE_COLUMNS[:i], *(f"lds_{m}" for m in modes), *TABLE_COLUMNS[i + 1 :])


def table_rows(result: dict[str, Any]) -> list[list[Any]]:
    return [[r.get(c, float("nan")) if c not in ("method", "variant") else r.get(c, "")
             for c in table_columns(result)] for r in result["results"]]


def run_bench(setups: list[str], cfg: BenchConfig, out_json: str | None, workdir: str | None = None,
              progress: bool = False, peers: bool = False, quiet: bool = False,
              peer_methods: list[str] | None = None,
              peer_options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Benchmark each of ``setups`` (names of :data:`diffin.bench.builtin.setups.SETUPS`) with ``cfg``;
    print a table per setup and, with ``out_json``, write the results there after each setup.
    Runs are recorded into ``workdir`` (default: a new temp folder). ``quiet``: only the tables.
    Returns the JSON-ready document (one setup's result, or ``{"machine", "setups", "seconds"}``)."""
    from ..report import text_table

    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="diffin-bench-"))
    results = []
    t0 = time.perf_counter()
    for name in setups:
        if name == SCALE_SETUP:
            plot = Path(out_json).with_suffix(".png") if out_json else work / f"{SCALE_SETUP}-sizes.png"
            r = run_scale(cfg, work, sizes=cfg.size_list(), progress=progress, log=log, plot_path=plot)
        elif name == PAIRS_SETUP:  # contrastive training at a million pairs (docs/method.md §4.7)
            r = run_scale_pairs(cfg, work, n_train=cfg.n_train, progress=progress, log=log)
            if out_json:
                plot_detection(r, work, Path(out_json).with_suffix(".png"))
        else:
            r = run_setup(name, cfg, work, progress=progress, peers=peers, log=log,
                          peer_methods=peer_methods, peer_options=peer_options)
        r["machine"] = machine_info()
        r["config"] = dataclasses.asdict(cfg)
        results.append(r)
        print(f"\n{name}: {r['description']}")
        clipped = (f" (clip_grad_norm {r['clip_grad_norm']:g}: {r['clipped_fraction']:.0%} of the steps clipped)"
                   if r.get("clip_grad_norm") is not None else "")
        print(f"N={r['n_train']}, {r['n_steps']} steps, trained in {r['train_seconds']:.2f}s{clipped}; ground truth: "
              f"{r['ground_truth']['n_removed']} replayed removals in {r['ground_truth']['seconds']:.1f}s\n")
        for mode, tr in r.get("truth", {}).items():
            if mode != "replay":
                print(f"truth {mode}: {tr['n_subsets']} subsets × {tr['n_seeds']} seeds in {tr['seconds']:.1f}s, "
                      f"noise ceiling {tr['noise_ceiling']:.3f}")
        print(text_table(table_columns(r), table_rows(r)))
        mg = r.get("linearisation_ceiling", {}).get("metagradient")
        if mg:
            rel = (f"; differs from diffin's scores by {mg['max_rel_diff_vs_diffin']:.1e} of their largest"
                   if "max_rel_diff_vs_diffin" in mg else "")
            print(f"\nlinearisation ceiling ({mg['kind']}, {mg['n_steps']} steps, {mg['seconds']:.1f}s): Pearson "
                  f"{mg['pearson']:.4f}, Spearman {mg['spearman']:.4f} against the replayed removals{rel}")
        if r.get("spot_check"):
            sc = r["spot_check"]
            print(f"\nspot check ({sc['dtype']}, N={sc['n_train']}, {sc['n_removed']} replayed removals): diffin "
                  f"Pearson {sc['pearson']:.4f} (target >= {sc['target_pearson']}), Spearman {sc['spearman']:.4f}")
        if r.get("sizes"):
            print("\ndiffin against N:")
            print(text_table(SIZES_COLUMNS, [[row.get(c, float("nan")) for c in SIZES_COLUMNS] for row in r["sizes"]]))
        if out_json:  # keep what is done so far (atomic write each time)
            write_json(out_json, results[0] if len(setups) == 1 else
                       {"machine": machine_info(), "setups": results})
    doc = results[0] if len(setups) == 1 else {"machine": machine_info(), "setups": results,
                                               "seconds": time.perf_counter() - t0}
    if out_json:
        write_json(out_json, doc)
        print(f"\nwrote {out_json}")
    return doc


def load_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-setup results of a bench JSON (single- or multi-setup)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return doc.get("setups", [doc])
