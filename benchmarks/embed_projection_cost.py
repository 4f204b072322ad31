"""How much of an embedding build is the projection (issue 22, item 5: would a structured projection pay?).

Builds one ``diffin.embed`` of a built-in setup's run and times, inside it, the generation of the
projection's rows (``Projection._make``, wrapped); prints the build's seconds, the rows' seconds and
their share, and one query (the mean validation loss). A structured (per-layer / Kronecker) R can
only save the rows' share: the sweep carries K full adjoints whatever R's structure.

    python benchmarks/embed_projection_cost.py --setup mnist5k-mlp --dim 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import diffin
from diffin.bench.builtin import get_setup, train
from diffin.embedding import _projection


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", default="mnist5k-mlp")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--projection", default="gaussian", choices=["gaussian", "rademacher"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    setup = get_setup(args.setup)
    data = setup.data()
    spent = {"seconds": 0.0, "calls": 0}
    real = _projection.Projection._make

    def timed(self, *a, **k):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = real(self, *a, **k)
        spent["seconds"] += time.perf_counter() - t
        spent["calls"] += 1
        return out

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        train(setup.model(data), data.x_train, data.y_train, setup.train, run, overwrite=True)
        _projection.Projection._make = timed  # type: ignore[method-assign]
        try:
            t0 = time.perf_counter()
            emb = diffin.embed(run, setup.model(data), setup.loss_fn, train=(data.x_train, data.y_train),
                               dim=args.dim, projection=args.projection, progress=False)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            emb.influence((data.x_val, data.y_val))
            query = time.perf_counter() - t0
        finally:
            _projection.Projection._make = real  # type: ignore[method-assign]
    res = {"setup": args.setup, "dim": args.dim, "projection": args.projection, "n_params": emb.projection.n_params,
           "build_seconds": build, "rows_seconds": spent["seconds"], "rows_calls": spent["calls"],
           "rows_share": spent["seconds"] / build, "query_seconds": query, "load_average": list(os.getloadavg())}
    print(f"{args.setup}: K={args.dim} {args.projection}, P={res['n_params']}: build {build:.2f}s, projection rows "
          f"{spent['seconds']:.3f}s ({100 * res['rows_share']:.2f}% of the build, {spent['calls']} calls); "
          f"query {query:.3f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
