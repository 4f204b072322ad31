"""Self-influence of every pair of ``scale-1m-pairs`` from a trajectory influence embedding (issue 22).

The setup of ``diffin bench --setup scale-1m-pairs`` (synthetic image–text pairs of a fixed generator,
10% mismatched; two-tower MLP 64-256-64 per view, symmetric InfoNCE as a batch loss, float32, SGD
batch 256, one epoch): the run is recorded (timed: "the epoch"), the CLIP score (cosine of each pair
under the trained model) is computed, and ``diffin.embed`` (``gradients`` projection, ``--dim`` K)
gives every pair's self-influence (its own share of its batch's loss, docs/method.md §4.7). Reported:
the detection ROC-AUC of the mismatched pairs, seconds and peak RSS of embedding + self-influence.

``--fidelity N``: the same recipe on the first N pairs, where the exact per-pair self-influence
(``target="self"``, one sweep per chunk of pairs) is affordable: Pearson / Spearman of the embedding's
self-influence against it, and both AUCs, for each K of ``--dims``.

    python benchmarks/embed_pairs.py --fidelity 5000 --dims 8,16,32,64 --json out/fid.json
    python benchmarks/embed_pairs.py --n-train 1000000 --dim 16 --json out/1m.json
"""

from __future__ import annotations

import argparse
import json
import os
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
from diffin.bench.pairs import detection_auc, recorded_pairs


def _embed_self(run: Path, train_xy: Any, K: int, out: Path, basis_samples: int | None,
                power_iters: int) -> tuple[np.ndarray, dict[str, Any]]:
    with Measure() as m:
        emb = diffin.embed(run, pairs_model(), CLIP_LOSS, train=train_xy, dim=K, projection="gradients",
                           out=out, overwrite=True, progress=False, basis_samples=basis_samples,
                           power_iters=power_iters)
        t_build = time.perf_counter()
        own = emb.self_influence()
    return own, {"dim": emb.dim, "seconds": m.seconds, "self_seconds": time.perf_counter() - t_build,
                 "peak_rss_mb": m.peak_mb_or_none, "disk_mb": os.path.getsize(out / "embedding.npy") / 2**20}


def fidelity(args: argparse.Namespace, work: Path, log: Any = print) -> dict[str, Any]:
    n = args.fidelity
    run, train_xy, mismatched, epoch, cos = recorded_pairs(work, n, args.seed, log)
    cache = work / f"exact-self-n{n}.npy"
    with Measure() as m:
        if cache.exists():
            exact = np.load(cache)
        else:
            exact = diffin.score(run, pairs_model(), CLIP_LOSS, train=train_xy, target="self",
                                 progress=False).scores.astype(np.float64)
            np.save(cache, exact)
    log(f"[pairs n={n}] exact self-influence {m.seconds:.1f}s")
    out = {"n": n, "epoch_seconds": epoch, "exact_self_seconds": m.seconds,
           "auc_exact_self": detection_auc(mismatched, -exact), "auc_clip_score": detection_auc(mismatched, cos),
           "rows": []}
    for K in [int(k) for k in args.dims.split(",")]:
        own, row = _embed_self(run, train_xy, K, work / f"emb-n{n}-{K}", args.basis_samples, args.power_iters)
        row.update(pearson=metrics.pearson(own, exact), spearman=metrics.spearman(own, exact),
                   auc=detection_auc(mismatched, -own))
        log(f"[pairs n={n}] K={K}: {row['seconds']:.1f}s, Spearman {row['spearman']:.4f}, AUC {row['auc']:.4f}")
        out["rows"].append(row)
    return out


def full(args: argparse.Namespace, work: Path, log: Any = print) -> dict[str, Any]:
    n = args.n_train
    t0 = time.perf_counter()
    run, train_xy, mismatched, epoch, cos = recorded_pairs(work, n, args.seed, log)
    log(f"[pairs n={n}] data + training + CLIP score {time.perf_counter() - t0:.1f}s")
    own, row = _embed_self(run, train_xy, args.dim, work / f"emb-n{n}-{args.dim}", args.basis_samples,
                           args.power_iters)
    row.update(x_epoch=row["seconds"] / epoch, auc=detection_auc(mismatched, -own),
               auc_clip_score=detection_auc(mismatched, cos), epoch_seconds=epoch, n=n,
               within_limits=bool(row["seconds"] <= 15 * 60 and (row["peak_rss_mb"] or 0) <= 4096))
    np.save(work / f"pairs-n{n}-embed-self.npy", own)
    log(f"[pairs n={n}] embedding self-influence K={args.dim}: {row['seconds']:.1f}s, peak RSS "
        f"{row['peak_rss_mb']:.0f} MiB, AUC {row['auc']:.4f} (CLIP score {row['auc_clip_score']:.4f})")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--fidelity", type=int, default=0, metavar="N")
    p.add_argument("--dims", default="8,16,32,64")
    p.add_argument("--basis-samples", type=int, default=20000)
    p.add_argument("--power-iters", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default="bench-out/embed-pairs")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    result = fidelity(args, work) if args.fidelity else full(args, work)
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        write_bench_json(args.json, {"result": result}, vars(args), threads=args.threads)


if __name__ == "__main__":
    main()
