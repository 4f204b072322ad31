"""``diffin bench``: every estimator against replayed removal on named setups.

For a setup: train it with the recorder (timed), replay the removal of ``n_removed`` random
training samples (the ground truth, METHOD.md section 3) and of the complements of LDS subsets,
then score all samples with each method (timed, peak memory polled) and compare:
Pearson, Spearman, Kendall τ, top-10 Jaccard (10 most helpful + 10 most harmful) and mean
absolute error (loss units) on the removed samples; LDS on the subsets, for the mean validation
loss and per validation example.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics
from ._api import score
from ._errors import ConfigError
from ._io import write_json
from ._measure import Measure
from ._version import __version__
from .builtin import get_setup, train
from .builtin.setups import SETUPS
from .groundtruth import lds_ground_truth, lds_subsets, replay_removal

BENCH_SETUPS = ("mnist5k-mlp", "mnist5k-mlp-short", "digits-logreg", "mnist5k-mlp-momentum", "mnist5k-cnn")
DEFAULT_METHODS = ("diffin", "diffin-frozen", "diffin-expected", "diffin-closed-form", "tracin",
                   "tracin-every-step", "if-cg", "if-lissa", "grad-dot", "grad-cos")
UNITLESS = {"grad-cos"}  # not in loss units: no MAE


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class BenchConfig:
    """What ``diffin bench`` measures."""

    methods: str = _f(",".join(DEFAULT_METHODS), "comma-separated methods to compare")
    n_removed: int | None = _f(None, "samples whose removal is replayed (default: the setup's)")
    lds_subsets: int = _f(50, "LDS: random training subsets retrained by replay (0 = no LDS)")
    lds_fraction: float = _f(0.5, "LDS: fraction of the training set each subset keeps")
    lds_examples: int = _f(20, "LDS per validation example: number of examples (0 = off)")
    convention: str = _f("keep", "removal convention of ground truth and estimators")
    seed: int = _f(0, "seed of the removed samples and LDS subsets")

    def __post_init__(self) -> None:
        if self.n_removed is not None and self.n_removed < 2:
            raise ConfigError("n_removed must be >= 2")
        if self.lds_subsets and self.lds_subsets < 2:
            raise ConfigError("lds_subsets must be 0 or >= 2")
        if self.lds_examples < 0:
            raise ConfigError("lds_examples must be >= 0")

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


def machine_info() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "diffin": __version__}


def _compare(pred: np.ndarray, actual: np.ndarray, unitless: bool) -> dict[str, float]:
    return {
        "pearson": metrics.pearson(pred, actual),
        "spearman": metrics.spearman(pred, actual),
        "kendall": metrics.kendall(pred, actual),
        "jaccard_top10": metrics.topk_jaccard(pred, actual, k=10),
        "mae": float("nan") if unitless else metrics.mae(pred, actual),
    }


def run_setup(name: str, cfg: BenchConfig, workdir: Path, progress: bool = False,
              peers: bool = False, log: Any = print) -> dict[str, Any]:
    """Benchmark one named setup; returns the JSON-ready result."""
    setup = get_setup(name)
    data = setup.data()
    model = setup.model(data)
    run_dir = workdir / name
    t = train(model, data.x_train, data.y_train, setup.train, run_dir, overwrite=True)
    N = data.n_train
    rng = np.random.default_rng(cfg.seed)
    k = min(cfg.n_removed or setup.n_ground_truth, N)
    removed = np.sort(rng.choice(N, size=k, replace=False))
    common = dict(train=(data.x_train, data.y_train), progress=progress)
    val = (data.x_val, data.y_val)
    log(f"[{name}] trained {t.steps} steps in {t.seconds:.2f}s; replaying {k} removals ...")
    with Measure() as m_gt:
        actual = replay_removal(run_dir, setup.model(data), setup.loss_fn, target=val,
                                remove=[int(i) for i in removed], convention=cfg.convention, **common)
    out: dict[str, Any] = {
        "setup": name,
        "description": setup.description,
        "n_train": N,
        "n_val": int(data.x_val.shape[0]),
        "n_steps": t.steps,
        "train_seconds": t.seconds,
        "ground_truth": {"kind": "replayed-removal", "convention": cfg.convention, "n_removed": k,
                         "seconds": m_gt.seconds, "removed_ids": removed.tolist()},
    }
    masks = actual_lds = actual_lds_ex = None
    q = min(cfg.lds_examples, int(data.x_val.shape[0]))
    if cfg.lds_subsets:
        masks = lds_subsets(N, cfg.lds_subsets, cfg.lds_fraction, seed=cfg.seed + 1)
        log(f"[{name}] replaying {cfg.lds_subsets} LDS subsets ...")
        with Measure() as m_lds:
            actual_lds = lds_ground_truth(run_dir, setup.model(data), setup.loss_fn, target=val,
                                          masks=masks, **common)
            if q:
                actual_lds_ex = lds_ground_truth(run_dir, setup.model(data), setup.loss_fn,
                                                 target=(data.x_val[:q], data.y_val[:q]), masks=masks,
                                                 pairwise=True, **common)
        out["lds"] = {"n_subsets": cfg.lds_subsets, "fraction": cfg.lds_fraction, "n_examples": q,
                      "seconds": m_lds.seconds}
    results = []
    for method in cfg.method_list():
        log(f"[{name}] {method} ...")
        with Measure() as m:
            r = score(run_dir, setup.model(data), setup.loss_fn, target=val, method=method,
                      convention=cfg.convention, **common)
        s = r.scores.astype(np.float64)
        row: dict[str, Any] = {"method": method, "variant": r.variant}
        row.update(_compare(s[removed], actual, method in UNITLESS))
        row["lds"] = metrics.lds(masks, actual_lds, s) if masks is not None else float("nan")
        if actual_lds_ex is not None:
            rp = score(run_dir, setup.model(data), setup.loss_fn, target=(data.x_val[:q], data.y_val[:q]),
                       method=method, convention=cfg.convention, pairwise=True, **common)
            row["lds_per_example"] = metrics.lds(masks, actual_lds_ex, rp.scores.astype(np.float64))
        row.update({"seconds": m.seconds, "peak_rss_mb": m.peak_mb, "peak_rss_rise_mb": m.rise_mb})
        results.append(row)
    if peers:
        results += _peer_rows(run_dir, setup, data, removed, actual, masks, actual_lds, log)
    out["results"] = results
    exact = next((r for r in results if r["variant"] == "diffin-exact"), None)
    if exact is not None:
        out["linearisation_ceiling"] = {k_: exact[k_] for k_ in ("pearson", "spearman", "kendall")}
    return out


def _peer_rows(run_dir: Path, setup: Any, data: Any, removed: np.ndarray, actual: np.ndarray,
               masks: np.ndarray | None, actual_lds: np.ndarray | None, log: Any) -> list[dict[str, Any]]:
    from . import peers  # optional extra
    from .recording.run import load_run

    rows = []
    run = load_run(run_dir)
    for name, status in peers.available_peers().items():
        if status != "ok":
            log(f"[{setup.name}] peer {name} unavailable: {status}")
            rows.append({"method": name, "variant": name, "error": status})
            continue
        log(f"[{setup.name}] peer {name} ...")
        try:
            with Measure() as m:
                pr = peers.run_peer(name, run=run, model_factory=lambda: setup.model(data),
                                    loss_fn=setup.loss_fn, train=(data.x_train, data.y_train),
                                    target=(data.x_val, data.y_val))
        except Exception as e:  # a peer failing must not sink the benchmark: record why
            rows.append({"method": name, "variant": name, "error": f"{type(e).__name__}: {e}"})
            continue
        s = np.asarray(pr.scores, dtype=np.float64)
        row: dict[str, Any] = {"method": name, "variant": name}
        row.update(_compare(s[removed], actual, not getattr(pr, "loss_units", True)))
        row["lds"] = metrics.lds(masks, actual_lds, s) if masks is not None else float("nan")
        row.update({"seconds": m.seconds, "peak_rss_mb": m.peak_mb, "peak_rss_rise_mb": m.rise_mb,
                    "notes": pr.notes})
        rows.append(row)
    return rows


TABLE_COLUMNS = ("method", "variant", "pearson", "spearman", "kendall", "jaccard_top10", "mae", "lds",
                 "lds_per_example", "seconds", "peak_rss_rise_mb")


def table_rows(result: dict[str, Any]) -> list[list[Any]]:
    return [[r.get(c, float("nan")) if c not in ("method", "variant") else r.get(c, "")
             for c in TABLE_COLUMNS] for r in result["results"]]


def run_bench(setups: list[str], cfg: BenchConfig, out_json: str | None, workdir: str | None = None,
              progress: bool = False, peers: bool = False, quiet: bool = False) -> dict[str, Any]:
    from .report import text_table

    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="diffin-bench-"))
    results = []
    t0 = time.perf_counter()
    for name in setups:
        r = run_setup(name, cfg, work, progress=progress, peers=peers, log=log)
        r["machine"] = machine_info()
        r["config"] = dataclasses.asdict(cfg)
        results.append(r)
        print(f"\n{name}: {r['description']}")
        print(f"N={r['n_train']}, {r['n_steps']} steps, trained in {r['train_seconds']:.2f}s; ground truth: "
              f"{r['ground_truth']['n_removed']} replayed removals in {r['ground_truth']['seconds']:.1f}s\n")
        print(text_table(TABLE_COLUMNS, table_rows(r)))
        if out_json:  # keep what is done so far (atomic write each time)
            write_json(out_json, results[0] if len(setups) == 1 else
                       {"machine": machine_info(), "setups": results})
    doc = results[0] if len(setups) == 1 else {"machine": machine_info(), "setups": results,
                                               "seconds": time.perf_counter() - t0}
    if out_json:
        write_json(out_json, doc)
        print(f"\nwrote {out_json}")
    return doc


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from .cli import add_config_args

    s = sub.add_parser("bench", help="compare every estimator with replayed removal on named setups")
    s.add_argument("--setup", required=True, choices=[*BENCH_SETUPS, *sorted(set(SETUPS) - set(BENCH_SETUPS)),
                                                       "all"],
                   help="named setup, or 'all' for the five benchmark setups")
    s.add_argument("--json", default=None, help="write the results as JSON here")
    s.add_argument("--workdir", default=None, help="where to keep the recorded runs (default: a temp dir)")
    s.add_argument("--peers", action="store_true", help="add the peer libraries' rows (diffin[peers])")
    s.add_argument("--quiet", action="store_true", help="only the tables")
    add_config_args(s, BenchConfig)
    s.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .cli import config_from_args

    cfg = config_from_args(BenchConfig, args)
    setups = list(BENCH_SETUPS) if args.setup == "all" else [args.setup]
    run_bench(setups, cfg, args.json, args.workdir, peers=args.peers, quiet=args.quiet)
    return 0


def load_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-setup results of a bench JSON (single- or multi-setup)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return doc.get("setups", [doc])
