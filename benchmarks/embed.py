"""Trajectory influence embeddings against the exact sweep and replayed removal (issue 22).

For each built-in setup: train and record the run; score the mean validation loss with the exact
sweep (``diffin``, the median of ``--sweep-repeats`` timed calls: "one sweep"); replay the setup's
removals (float64 ground truth, ``keep``); then for each K of ``--dims`` build the embedding
(``diffin.embed``, timed, its ``embedding.npy`` size on disk) and query the same target:
Pearson / Spearman against the exact sweep (all N) and against replayed removal (the removed ids).
With ``--self``: self-influence from the embedding against the exact per-sample self-influence
(``target="self"``, or with ``--self-subset M`` that of the first M training samples, for runs where
the exact path over all N is too slow), and the detection ROC-AUC of the
corrupted samples (flipped labels / mismatched pairs) of both. With ``--queries Q``: Q per-example
targets (the validation examples, then training examples) answered from the embedding at
``--query-dim``, timed in the same process as the sweeps (the criterion: less than 10 sweeps), and
their fidelity against the exact pairwise sweep on the first ``--query-check`` of them.

    python benchmarks/embed.py --setups mnist5k-mlp --dims 64,256,1024,4096 --queries 1000 --json out.json

Timings are wall clock of one process with ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
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
from diffin.bench.builtin import get_setup, train
from diffin.groundtruth import replay_removal
from diffin.report import text_table


def _corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    return metrics.pearson(a, b), metrics.spearman(a, b)


def _exact_self(run: Path, setup: Any, data: Any, subset: int | None,
                seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact self-influence: ids (M,), scores (M,), seconds. ``subset``: the first M training samples
    (whole chunks of the recorded batch size for a batch loss, as ``target="self"`` takes them), their
    self targets swept together by diffin-exact (its self-influence path on those chunks); None:
    ``target="self"`` over all N."""
    train_xy = (data.x_train, data.y_train)
    t0 = time.perf_counter()
    if subset is None:
        s = diffin.score(run, setup.model(data), setup.loss_fn, train=train_xy, target="self", progress=False).scores
        return np.arange(len(s)), s.astype(np.float64), time.perf_counter() - t0
    from diffin._data import DataSource
    from diffin._functional import FlatModel
    from diffin.config import ScoreConfig
    from diffin.estimators import ScoringContext
    from diffin.estimators.diffin_sweep import DiffInExact
    from diffin.recording.run import load_run
    from diffin.targets import SelfLoss

    r = load_run(run)
    model = setup.model(data).eval()
    fm = FlatModel(model, setup.loss_fn, trainable=r.trainable)
    src = DataSource(train_xy, fm.dtype, fm.device)
    chunk = int(r.batch_size_hint()) if fm.coupled else None
    ids = np.arange(min(subset, data.n_train))
    tgt = SelfLoss(src, chunk=chunk)
    ctx = ScoringContext(r, fm, src, tgt, ScoreConfig(), progress=False)
    with torch.no_grad():
        m = DiffInExact().sweep(ctx, tgt.subset(ids))
    return ids, m[torch.as_tensor(ids), torch.arange(len(ids))].double().numpy(), time.perf_counter() - t0


def bench_setup(name: str, args: argparse.Namespace, work: Path, log: Any = print) -> dict[str, Any]:
    setup = get_setup(name)
    data = setup.data()
    run = work / name / "run"
    t = train(setup.model(data), data.x_train, data.y_train, setup.train, run, loss=setup.loss_fn, overwrite=True)
    N = data.n_train
    P = sum(p.numel() for p in setup.model(data).parameters())
    train_xy, val = (data.x_train, data.y_train), (data.x_val, data.y_val)
    log(f"[{name}] N={N} P={P} steps={t.steps}; timing the exact sweep ...")
    sweep_s, exact = [], None
    for _ in range(args.sweep_repeats):
        with Measure(poll=False) as m:
            r = diffin.score(run, setup.model(data), setup.loss_fn, train=train_xy, target=val, progress=False)
        sweep_s.append(m.seconds)
        exact = r.scores.astype(np.float64)
    sweep = float(np.median(sweep_s))
    out: dict[str, Any] = {"setup": name, "description": setup.description, "n_train": N, "n_params": P,
                           "n_steps": t.steps, "sweep_seconds": sweep, "sweep_variant": r.variant,
                           "sweep_hvp": r.diagnostics.get("hvp"), "rows": []}
    rng = np.random.default_rng(args.seed)
    k = min(setup.n_ground_truth, N, args.removals)
    removed = np.sort(rng.choice(N, size=k, replace=False))
    log(f"[{name}] one sweep {sweep:.2f}s ({r.variant}); replaying {k} removals ...")
    actual = None
    if k:
        actual = replay_removal(run, setup.model(data), setup.loss_fn, train=train_xy, target=val,
                                remove=[int(i) for i in removed], progress=False).astype(np.float64)
        out["removal"] = {"n": k, "exact_sweep": dict(zip(("pearson", "spearman"), _corr(exact[removed], actual)))}
    flipped = getattr(data, "flipped", None)
    flipped = flipped if flipped is not None and flipped.any() else None
    exact_self = None
    if args.self:
        log(f"[{name}] exact self-influence ({'all' if not args.self_subset else args.self_subset}) ...")
        ids, s_self, s_sec = _exact_self(run, setup, data, args.self_subset or None, args.seed)
        exact_self = (ids, s_self)
        out["exact_self"] = {"n": len(ids), "seconds": s_sec, "sweeps": s_sec / sweep,
                             "auc": (metrics.detection_auc(-s_self, flipped[ids])
                                     if flipped is not None and flipped[ids].any() else None)}
    for kind in args.projections.split(","):
        for K in [int(d) for d in args.dims.split(",")]:
            folder = work / name / f"emb-{kind}-{K}"
            with Measure() as m:
                emb = diffin.embed(run, setup.model(data), setup.loss_fn, train=train_xy, dim=K, projection=kind,
                                   out=folder, overwrite=True, progress=False)
            est = emb.influence(val)
            row: dict[str, Any] = {
                "projection": emb.projection.kind, "dim": emb.dim, "build_seconds": m.seconds,
                "build_sweeps": m.seconds / sweep, "peak_rss_mb": m.peak_mb_or_none,
                "disk_mb": os.path.getsize(folder / diffin.embedding.EMBED_NPY) / 2**20,
                "chunk_width": emb.manifest["chunk_width"],
            }
            row["pearson_exact"], row["spearman_exact"] = _corr(est, exact)
            if actual is not None:
                row["pearson_removal"], row["spearman_removal"] = _corr(est[removed], actual)
            if args.self:
                with Measure(poll=False) as ms:
                    s_emb = emb.self_influence()
                row["self_seconds"] = ms.seconds
                ids, s_self = exact_self  # type: ignore[misc]
                row["self_pearson"], row["self_spearman"] = _corr(s_emb[ids], s_self)
                if flipped is not None:
                    row["self_auc"] = metrics.detection_auc(-s_emb, flipped)
            log(f"[{name}] {kind} K={emb.dim}: build {m.seconds:.1f}s ({row['build_sweeps']:.0f} sweeps), "
                f"Spearman vs exact {row['spearman_exact']:.4f}")
            out["rows"].append(row)
            if args.queries and args.query_dim == K and kind == args.projections.split(",")[0]:
                out["queries"] = _queries(emb, run, setup, data, args, sweep)
                log(f"[{name}] {args.queries} per-example targets: {out['queries']['seconds']:.2f}s "
                    f"(10 sweeps: {10 * sweep:.2f}s)")
    return out


def _queries(emb: diffin.Embedding, run: Path, setup: Any, data: Any, args: argparse.Namespace,
             sweep: float) -> dict[str, Any]:
    """Q per-example targets from the embedding (timed, after one warm-up query), and their
    fidelity against the exact pairwise sweep on the first ``query_check`` examples."""
    xs = torch.cat([data.x_val, data.x_train])[: args.queries]
    ys = torch.cat([data.y_val, data.y_train])[: args.queries]
    emb.influence((xs[:2], ys[:2]), pairwise=True)  # θ_T read once, R cached
    with Measure(poll=False) as m:
        S = emb.influence((xs, ys), pairwise=True)
    q = min(args.query_check, len(xs))
    with Measure(poll=False) as me:
        ref = diffin.score(run, setup.model(data), setup.loss_fn, train=(data.x_train, data.y_train),
                           target=(xs[:q], ys[:q]), pairwise=True, progress=False).scores.astype(np.float64)
    per = [_corr(S[:, j], ref[:, j]) for j in range(q)]
    return {"n": len(xs), "dim": emb.dim, "seconds": m.seconds, "ten_sweeps_seconds": 10 * sweep,
            "ratio_to_sweep": m.seconds / sweep, "check_examples": q, "check_sweep_seconds": me.seconds,
            "pearson_median": float(np.median([p for p, _ in per])),
            "spearman_median": float(np.median([s for _, s in per]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default="mnist5k-mlp")
    p.add_argument("--dims", default="64,256,1024,4096")
    p.add_argument("--projections", default="gaussian", help="comma list: gaussian, rademacher")
    p.add_argument("--removals", type=int, default=100, help="replayed removals (at most the setup's)")
    p.add_argument("--self", action="store_true", help="compare self-influence with the exact path")
    p.add_argument("--self-subset", type=int, default=0, metavar="M",
                   help="exact self-influence of the first M samples instead of all")
    p.add_argument("--queries", type=int, default=0, metavar="Q")
    p.add_argument("--query-dim", type=int, default=1024)
    p.add_argument("--query-check", type=int, default=20)
    p.add_argument("--sweep-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default="bench-out/embed")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    results = [bench_setup(s, args, work) for s in args.setups.split(",")]
    for r in results:
        print(f"\n{r['setup']}: N={r['n_train']} P={r['n_params']} steps={r['n_steps']}, one sweep "
              f"{r['sweep_seconds']:.2f}s ({r['sweep_variant']}); exact sweep vs removal: {r.get('removal')}")
        if "exact_self" in r:
            print(f"exact self-influence: {r['exact_self']}")
        cols = ["projection", "dim", "build_seconds", "build_sweeps", "disk_mb", "pearson_exact", "spearman_exact",
                "pearson_removal", "spearman_removal", "self_pearson", "self_spearman", "self_auc", "self_seconds"]
        cols = [c for c in cols if any(c in row for row in r["rows"])]
        print(text_table(cols, [[row.get(c, "") for c in cols] for row in r["rows"]]))
        if "queries" in r:
            print(f"queries: {r['queries']}")
    if args.json:
        write_bench_json(args.json, {"results": results}, vars(args), threads=args.threads, torch=torch.__version__)


if __name__ == "__main__":
    main()
