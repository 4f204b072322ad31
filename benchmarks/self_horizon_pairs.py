"""Horizon self-influence (``diffin.self_influence``, docs/method.md §4.11) on ``scale-1m-pairs`` (issues 22, 23).

The setup of ``diffin bench --setup scale-1m-pairs`` (synthetic image–text pairs, 10% mismatched;
two-tower MLP 64-256-64, symmetric InfoNCE as a batch loss, float32, SGD batch 256, one epoch).

``--fidelity N``: the recipe on the first N pairs. Every pair's self-influence by the exact whole-run
path (``diffin.score(target="self")``, one sweep per chunk of pairs; ``--exact-cache`` reuses a saved
one), by the horizon path exactly for each H of ``--horizons`` (H = T: the whole run, the share taken
in the pair's own batch), sketched at H = 0 for each K of ``--dims``, and by a K = 16 embedding
(``diffin.embed``, ``gradients`` projection): Pearson / Spearman against the exact whole-run and the
exact H = 0 values, mismatched-pair ROC-AUC as is and standardised within the batch, seconds.

``--n-train N`` (default: the million): data, training (the epoch, timed), CLIP score, and the
sketched H = 0 self-influence with ``--dim`` K directions: seconds, peak RSS, AUC as is and
standardised, AUC by how many steps before the end a pair was used.

    python benchmarks/self_horizon_pairs.py --fidelity 1000 --json docs/bench-scale-pairs/self-horizon-fidelity.json
    python benchmarks/self_horizon_pairs.py --n-train 1000000 --dim 8 --json docs/bench-scale-pairs/self-horizon-1m.json
    python benchmarks/self_horizon_pairs.py --n-train 100000 --segments "371,391;180,200" --dims 8,64 \
        --json docs/bench-scale-pairs/self-horizon-segments.json

``--segments "S0,S1;..."`` (with ``--n-train``): only the pairs used at those steps, exact H = 0 against
the sketch for each K of ``--dims``, and the CLIP score's AUC on the same pairs.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffin
from diffin import metrics
from diffin._measure import Measure
from diffin.bench import write_bench_json
from diffin.bench.builtin.captions import CLIP_LOSS
from diffin.bench.builtin.synthetic_pairs import pairs_model
from diffin.bench.pairs import auc_by_steps_before_end, detection_auc, recorded_pairs, step_of_samples


def _row(name: str, s: np.ndarray, std: np.ndarray | None, seconds: float, mis: np.ndarray,
         refs: dict[str, np.ndarray]) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "seconds": seconds, "auc": detection_auc(mis, -s),
                           "auc_standardized": None if std is None else detection_auc(mis, -std)}
    for k, ref in refs.items():
        row[f"pearson_vs_{k}"] = metrics.pearson(s, ref)
        row[f"spearman_vs_{k}"] = metrics.spearman(s, ref)
    return row


def fidelity(args: argparse.Namespace, work: Path, log: Any = print) -> dict[str, Any]:
    n = args.fidelity
    run, xy, mis, epoch, cos = recorded_pairs(work, n, args.seed, log)
    T = diffin.load_run(run).n_steps
    cache = Path(args.exact_cache) if args.exact_cache else work / f"exact-self-n{n}.npy"
    exact_name = "exact whole run (diffin.score target='self')"
    if args.exact_from_horizon:
        whole = diffin.self_influence(run, pairs_model(), CLIP_LOSS, train=xy, horizon=T, progress=False)
        exact, exact_s = whole.scores, whole.seconds
        exact_name = "exact whole run (horizon >= T - 1: the share in its own batch)"
    elif cache.exists():
        exact, exact_s = np.load(cache), float("nan")
        log(f"[pairs n={n}] exact whole-run self-influence from {cache}")
    else:
        with Measure() as m:
            exact = diffin.score(run, pairs_model(), CLIP_LOSS, train=xy, target="self",
                                 progress=False).scores.astype(np.float64)
        exact_s = m.seconds
        np.save(cache, exact)
    h0 = diffin.self_influence(run, pairs_model(), CLIP_LOSS, train=xy, horizon=0, progress=False)
    refs = {"exact_whole_run": exact, "exact_h0": h0.scores}
    rows = [_row(exact_name, exact, None, exact_s, mis, {}),
            {"name": "CLIP score", "auc": detection_auc(mis, cos)}]
    for H in [int(h) for h in args.horizons.split(",")]:
        r = h0 if H == 0 else diffin.self_influence(run, pairs_model(), CLIP_LOSS, train=xy, horizon=H,
                                                    progress=False)
        rows.append(_row(f"horizon {min(H, T)} exact", r.scores, r.standardized, r.seconds, mis, refs))
        log(f"[pairs n={n}] {rows[-1]}")
    for K in [int(k) for k in args.dims.split(",")]:
        r = diffin.self_influence(run, pairs_model(), CLIP_LOSS, train=xy, horizon=0, dim=K, progress=False)
        rows.append(_row(f"horizon 0 sketch K={K}", r.scores, r.standardized, r.seconds, mis, refs))
        log(f"[pairs n={n}] {rows[-1]}")
    with Measure() as m:
        emb = diffin.embed(run, pairs_model(), CLIP_LOSS, train=xy, dim=16, projection="gradients", power_iters=0,
                           out=work / f"emb-n{n}-16", overwrite=True, progress=False)
        own = emb.self_influence()
    rows.append(_row("embedding K=16 (gradients)", own, None, m.seconds, mis, refs))
    log(f"[pairs n={n}] {rows[-1]}")
    return {"n": n, "n_steps": T, "epoch_seconds": epoch, "rows": rows}


def full(args: argparse.Namespace, work: Path, log: Any = print) -> dict[str, Any]:
    n = args.n_train
    run, xy, mis, epoch, cos = recorded_pairs(work, n, args.seed, log)
    T = diffin.load_run(run).n_steps
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    with Measure() as m:
        r = diffin.self_influence(run, pairs_model(), CLIP_LOSS, train=xy, horizon=0, dim=args.dim,
                                  progress=False)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    np.save(work / f"pairs-n{n}-self-h0-K{args.dim}.npy", np.stack([r.scores, r.standardized]))
    step = step_of_samples(run, n)
    out = {"n": n, "n_steps": T, "dim": args.dim, "epoch_seconds": epoch, "seconds": m.seconds,
           "x_epoch": m.seconds / epoch, "cpu_seconds": cpu, "peak_rss_mb": m.peak_mb_or_none,
           "within_limits": bool(m.seconds <= 900 and (m.peak_mb_or_none or 0) <= 4096),
           "auc": detection_auc(mis, -r.scores), "auc_standardized": detection_auc(mis, -r.standardized),
           "auc_clip_score": detection_auc(mis, cos),
           "auc_by_steps_before_end": auc_by_steps_before_end(mis, -r.scores, step, T),
           "auc_standardized_by_steps_before_end": auc_by_steps_before_end(mis, -r.standardized, step, T),
           "auc_clip_by_steps_before_end": auc_by_steps_before_end(mis, cos, step, T)}
    log(f"[pairs n={n}] self-influence H=0 K={args.dim}: {m.seconds:.1f}s, CPU {cpu:.1f}s "
        f"({out['x_epoch']:.1f}× the epoch), "
        f"peak RSS {out['peak_rss_mb']} MiB, AUC {out['auc']:.4f}, standardised {out['auc_standardized']:.4f}, "
        f"CLIP score {out['auc_clip_score']:.4f}")
    return out


def segments(args: argparse.Namespace, work: Path, log: Any = print) -> dict[str, Any]:
    """On the run of ``--n-train`` pairs, the uses at each step range of ``--segments`` only: exact H = 0
    against the sketch for each K of ``--dims``, and the CLIP score's AUC on the same pairs."""
    n = args.n_train
    run, xy, mis, epoch, cos = recorded_pairs(work, n, args.seed, log)
    out: dict[str, Any] = {"n": n, "n_steps": diffin.load_run(run).n_steps, "segments": []}
    for seg in args.segments.split(";"):
        s0, s1 = (int(v) for v in seg.split(","))
        exact = diffin.self_influence(run, pairs_model(), CLIP_LOSS, train=xy, steps=(s0, s1), progress=False)
        sel = exact.step >= 0
        m = mis[sel]
        rows = [{"name": "CLIP score", "auc": detection_auc(m, cos[sel])},
                _row("horizon 0 exact", exact.scores[sel], exact.standardized[sel], exact.seconds, m, {})]
        for K in [int(k) for k in args.dims.split(",")]:
            r = diffin.self_influence(run, pairs_model(), CLIP_LOSS, train=xy, steps=(s0, s1), dim=K, progress=False)
            rows.append(_row(f"horizon 0 sketch K={K}", r.scores[sel], r.standardized[sel], r.seconds, m,
                             {"exact_h0": exact.scores[sel]}))
        out["segments"].append({"steps": [s0, s1], "n_pairs": int(sel.sum()), "rows": rows})
        log(f"[pairs n={n}] steps {s0}..{s1 - 1}: {rows}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--fidelity", type=int, default=0, metavar="N")
    p.add_argument("--horizons", default="0,1,4,1000000")
    p.add_argument("--dims", default="4,8,16,64")
    p.add_argument("--segments", default=None, metavar="S0,S1;S0,S1",
                   help="score only the uses at these step ranges of the --n-train run (exact against sketches)")
    p.add_argument("--exact-from-horizon", action="store_true",
                   help="--fidelity: take the whole-run reference from the exact horizon path with H >= T - 1 "
                        "(the share in the pair's own batch) instead of diffin.score(target='self')")
    p.add_argument("--exact-cache", default=None, help="a saved exact whole-run self-influence (.npy) of this run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default="bench-out/self-horizon-pairs")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    t0 = time.perf_counter()
    result = fidelity(args, work) if args.fidelity else segments(args, work) if args.segments else full(args, work)
    result["total_seconds"] = time.perf_counter() - t0
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        write_bench_json(args.json, {"result": result}, vars(args), threads=args.threads)


if __name__ == "__main__":
    main()
