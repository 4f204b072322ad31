"""Pruning a million image–text pairs (``scale-1m-pairs``; issue 23, item 5): keep a fraction of the
training pairs chosen by each method, retrain from scratch, and evaluate on clean held-out pairs.

The setup of ``diffin bench --setup scale-1m-pairs`` (synthetic pairs, 10% mismatched; two-tower MLP
64-256-64, symmetric InfoNCE as a batch loss, float32, SGD lr 0.05, batch 256, one epoch, recorded).
Selection methods, each scored once on the recorded full-data run:

* ``random``: a seeded random subset per seed;
* ``clip-score``: keep the highest CLIP score (the cosine of the pair under the trained model), the
  DataComp filter;
* ``diffin``: Diff-In influence on the InfoNCE of the 2,000 clean validation pairs as one batch, kept
  by ``diffin prune``'s rule ``auto`` at this size (``drop-harmful`` below 50% kept, ``keep-influential``
  from there on; ``cover`` is not used from 100,000 samples on);
* ``diffin-self``: keep the least self-influential pairs, by the horizon-0 self-influence sketched with
  K = 16 directions, standardised within each batch (``diffin prune --methods diffin-self`` at this size).

Each (method, kept fraction, seed): the recipe's one epoch over the kept pairs (so fewer steps), the
model initialised and the batches drawn from the seed; evaluated on 5,000 clean held-out pairs of the
generator (their own stream): **class retrieval accuracy** (a view-a query's nearest view-b by cosine
among the 5,000 has its class) and the symmetric InfoNCE over chunks of 1,000 pairs. Retrains are cached
in ``WORKDIR/prune-pairs-n{N}/`` (one JSON per retrain), scores as ``.npy``, so a rerun resumes.

    python benchmarks/prune_pairs.py --json docs/bench-scale-pairs/prune-1m.json            # 1M pairs
    python benchmarks/prune_pairs.py --n-train 20000 --keep 0.5 --seeds 1                   # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffin
from diffin._io import write_json, write_npy
from diffin._measure import Measure
from diffin.bench import write_bench_json
from diffin.bench.builtin import train
from diffin.bench.builtin.captions import CLIP_LOSS
from diffin.bench.builtin.synthetic_pairs import PAIRS_TRAIN, PairTowers, memmap_pairs, pairs_model, test_pairs
from diffin.bench.pairs import detection_auc, recorded_pairs
from diffin.tasks import select

METHODS = ("random", "clip-score", "diffin", "diffin-self")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return PairTowers()


@torch.no_grad()
def evaluate(model: torch.nn.Module, test: tuple[tuple[np.ndarray, np.ndarray], np.ndarray],
             chunk: int = 1000) -> dict[str, float]:
    """Class retrieval accuracy and mean symmetric InfoNCE (chunks of ``chunk`` pairs) on ``test``."""
    (xa, xb), y = test
    model.eval()
    ea, eb, scale = model(torch.from_numpy(xa), torch.from_numpy(xb), embed=True)
    nearest = (ea @ eb.T).argmax(1).numpy()
    acc = float((y[nearest] == y).mean())
    losses = []
    for lo in range(0, len(y), chunk):
        logits = scale * ea[lo:lo + chunk] @ eb[lo:lo + chunk].T
        tgt = torch.arange(logits.shape[0])
        losses.append(0.5 * (torch.nn.functional.cross_entropy(logits, tgt)
                             + torch.nn.functional.cross_entropy(logits.T, tgt)).item())
    return {"retrieval_accuracy": acc, "infonce": float(np.mean(losses))}


def scores(method: str, run: Path, xy: Any, val: Any, cos: np.ndarray, work: Path,
           log: Any) -> tuple[np.ndarray, float]:
    """Selection values (N,) of ``method`` (higher = keep first under an unsigned rule; influence
    signed) and the seconds they took (cached as ``work/<method>.npy``)."""
    path = work / f"{method}.npy"
    if method == "clip-score":
        return cos, 0.0
    if path.exists() and (work / f"{method}.json").exists():
        meta = json.loads((work / f"{method}.json").read_text())
        return np.load(path), meta["seconds"]
    with Measure() as m:
        if method == "diffin":
            v = np.asarray(diffin.influence(run, pairs_model(), CLIP_LOSS, train=xy, target=val, method="diffin",
                                            progress=False), dtype=np.float64)
        else:  # diffin-self: keep the least self-influential first
            v = -diffin.self_influence(run, pairs_model(), CLIP_LOSS, train=xy, horizon=0, dim=16,
                                       progress=False).standardized
    write_npy(path, v)
    write_json(work / f"{method}.json", {"seconds": m.seconds})
    log(f"  {method}: scored in {m.seconds:.1f}s")
    return v, m.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=1_000_000)
    p.add_argument("--keep", default="0.3,0.5,0.7")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-test", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0, help="seed of the data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default="bench-out/prune-pairs")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    root = Path(args.workdir)
    n = args.n_train
    run, xy, mis, epoch, cos = recorded_pairs(root, n, args.seed)
    work = root / f"prune-pairs-n{n}"
    work.mkdir(parents=True, exist_ok=True)
    (va, vb), _ = memmap_pairs(root / "pairs-data" / f"n{n}", "val")
    val = ((torch.from_numpy(np.array(va)), torch.from_numpy(np.array(vb))), torch.zeros(len(va), dtype=torch.int64))
    test = test_pairs(args.n_test, args.seed)
    fractions = [float(f) for f in args.keep.split(",")]
    seeds = list(range(args.seeds))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    def retrain(tag: str, kept: np.ndarray | None, s: int) -> dict[str, Any]:
        path = work / f"{tag}_seed{s}.json"
        if path.exists():
            return json.loads(path.read_text())
        model = _model(s)
        t = train(model, xy[0], xy[1], dataclasses.replace(PAIRS_TRAIN, seed=s), work / "unused", keep=kept,
                  loss=CLIP_LOSS, record=False)
        r = {**evaluate(model, test), "n_kept": n if kept is None else int(kept.size), "seconds": t.seconds}
        write_json(path, r)
        print(f"  {tag} seed {s}: retrieval {r['retrieval_accuracy']:.4f}, InfoNCE {r['infonce']:.4f} "
              f"({t.seconds:.1f}s)", flush=True)
        return r

    def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        acc = np.array([r["retrieval_accuracy"] for r in rs])
        loss = np.array([r["infonce"] for r in rs])
        return {"retrieval_accuracy_mean": float(acc.mean()), "retrieval_accuracy_std": float(acc.std()),
                "infonce_mean": float(loss.mean()), "infonce_std": float(loss.std()), "n_kept": rs[0]["n_kept"],
                "retrieval_accuracies": acc.tolist()}

    full = summary([retrain("full", None, s) for s in seeds])
    print(f"full data: retrieval {full['retrieval_accuracy_mean']:.4f} ± {full['retrieval_accuracy_std']:.4f}")
    rows: dict[str, Any] = {}
    for m in methods:
        if m == "random":
            v, sec, signed = None, 0.0, False
        else:
            v, sec = scores(m, run, xy, val, cos, work, print)
            signed = m == "diffin"
        pts = []
        for f in fractions:
            rs, kept_of = [], {}
            for s in seeds:
                vals = np.random.default_rng([s, 7]).random(n) if v is None else v
                kept_of[s] = select(vals, f, "auto" if signed else "keep-helpful", signed=signed, seed=s)
                rs.append(retrain(f"{m}_keep{f:g}", kept_of[s], s))
            pt = {"keep": f, **summary(rs)}
            if v is not None:  # the first seed's selection
                pt["mismatched_kept_fraction"] = float(mis[kept_of[seeds[0]]].mean())
            pts.append(pt)
            print(f"  {m:12s} keep {f:.0%}: retrieval {pt['retrieval_accuracy_mean']:.4f} ± "
                  f"{pt['retrieval_accuracy_std']:.4f}, InfoNCE {pt['infonce_mean']:.4f}"
                  + (f", mismatched kept {pt['mismatched_kept_fraction']:.3f}" if "mismatched_kept_fraction" in pt
                     else ""), flush=True)
        # every method's values rank the suspicious pairs low (harmful, dissimilar, self-influential)
        rows[m] = {"score_seconds": sec, "curve": pts, "auc_mismatched": None if v is None else detection_auc(mis, v)}
    result = {"n_train": n, "n_mismatched": int(mis.sum()), "epoch_seconds": epoch, "n_test": args.n_test,
              "seeds": seeds, "keep": fractions, "full_data": full, "methods": rows,
              "total_seconds": time.perf_counter() - t0}
    print(json.dumps(result, indent=2))
    if args.json:
        write_bench_json(args.json, {"result": result}, vars(args), threads=args.threads)


if __name__ == "__main__":
    main()
