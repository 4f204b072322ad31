"""What ``diffin verify`` costs against the training it checks (issue 21, item 5).

Trains and records a built-in setup once, then, ``--repeats`` times and interleaved, the same loop
without recording (``diffin.bench.builtin.train(..., record=False)``) and one ``diffin.verify`` call
with ``--n`` removals; reports the medians of the scoring and replay times as multiples of that
repeat's training loop, the replay's cost per removal run, and the correlations.

    python benchmarks/verify_speed.py --setup mnist5k-resnet --n 24 --repeats 1 --json bench-out/verify.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import diffin
from diffin._io import write_json
from diffin.bench.builtin import get_setup, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", default="mnist5k-resnet", help="built-in setup (default mnist5k-resnet)")
    ap.add_argument("--n", type=int, default=24, help="removals replayed (default 24)")
    ap.add_argument("--method", default="diffin", help="method whose scores are checked")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats (medians)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", default="bench-out/verify_speed.json", help="where to write the results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setup = get_setup(args.setup)
    split = setup.data()
    x, y, target = split.x_train, split.y_train, (split.x_val, split.y_val)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        recorded = train(setup.model(split), x, y, setup.train, run_dir, overwrite=True, loss=setup.loss_fn)
        train(setup.model(split), x, y, setup.train, run_dir, record=False, loss=setup.loss_fn)  # warm-up
        for _ in range(args.repeats):
            plain = train(setup.model(split), x, y, setup.train, run_dir, record=False, loss=setup.loss_fn).seconds
            t0 = time.perf_counter()
            res = diffin.verify(str(run_dir), setup.model(split), setup.loss_fn, train=(x, y), target=target,
                                n=args.n, method=args.method, progress=False)
            total = time.perf_counter() - t0
            rows.append({"train_seconds": plain, "verify_seconds": total, "score_seconds": res.score_seconds,
                         "replay_seconds": res.replay_seconds, "x_training": total / plain,
                         "replay_x_training": res.replay_seconds / plain, "pearson": res.pearson,
                         "spearman": res.spearman, "replay_dtype": res.extra.get("replay_dtype")})
            print(res.summary())
    med = {k: statistics.median(r[k] for r in rows) for k in ("train_seconds", "verify_seconds", "score_seconds",
                                                            "replay_seconds", "x_training", "replay_x_training")}
    print(f"{args.setup}, n={args.n}, {recorded.steps} steps: training {med['train_seconds']:.2f} s; verify "
          f"{med['verify_seconds']:.1f} s = {med['x_training']:.1f}x (scoring {med['score_seconds']:.1f} s, "
          f"replay {med['replay_seconds']:.1f} s = {med['replay_x_training']:.1f}x); load {os.getloadavg()}")
    out = {"setup": args.setup, "n": args.n, "method": args.method, "steps": recorded.steps, "repeats": rows,
           "median": med, "torch": torch.__version__, "platform": platform.platform(),
           "loadavg_end": os.getloadavg()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, out)  # atomic
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
