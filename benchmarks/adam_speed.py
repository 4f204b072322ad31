"""Cost of the exact Adam sweep against the SGD sweep (issue 11, item 6: ≤ 1.3×).

The "speed" setup (4,500 MNIST-5k samples, MLP 784-128-10 tanh, float32, batch 128, 5 epochs,
a checkpoint per epoch) is recorded twice by the built-in trainer: as it is (SGD lr 0.1), and
with AdamW (lr 1e-3, weight decay 0.01, everything else the same). ``diffin-exact`` then scores
all samples against the mean validation loss on each run, in fresh subprocesses, alternating
SGD and AdamW for ``--rounds`` rounds of ``--repeats`` timed calls each, so both see the same
machine load; the reported time of each is the median of all its timed calls. The ratio
AdamW / SGD is the criterion; the training runs are timed too (median of ``--repeats``).

    python benchmarks/adam_speed.py --json bench-out/adam_speed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import diffin
from diffin._measure import Measure
from diffin.builtin import Setup, get_setup, train
from diffin.report import text_table

METHOD = "diffin-exact"
RUNS = ("sgd", "adamw")


def recipe(setup_name: str, kind: str) -> Setup:
    """The setup as it is (``sgd``) or trained with AdamW lr 1e-3, weight decay 0.01 (``adamw``)."""
    setup = get_setup(setup_name)
    if kind == "sgd":
        return setup
    return setup.with_changes(train=dataclasses.replace(setup.train, optimizer="adamw", lr=1e-3,
                                                        weight_decay=0.01))


def worker(setup_name: str, kind: str, run_dir: str, repeats: int, threads: int) -> dict:
    """Time ``repeats`` calls of diffin-exact on one run (after a warm-up on 8 targets)."""
    torch.set_num_threads(threads)
    setup = recipe(setup_name, kind)
    data = setup.data()
    model = setup.model(data)
    train_data = (data.x_train, data.y_train)
    diffin.score(run_dir, model, setup.loss_fn, train=train_data, target=(data.x_val[:8], data.y_val[:8]),
                 method="tracin", progress=False)
    times = []
    for _ in range(repeats):
        with Measure(poll=False) as m:
            res = diffin.score(run_dir, model, setup.loss_fn, train=train_data, target=(data.x_val, data.y_val),
                               method=METHOD, progress=False)
        times.append(m.seconds)
    return {"run": kind, "variant": res.variant, "seconds": times}


def record(setup_name: str, kind: str, out: Path, repeats: int, threads: int) -> tuple[str, list[float]]:
    """Record the run ``repeats`` times into one folder; returns it and the training times (s)."""
    torch.set_num_threads(threads)
    setup = recipe(setup_name, kind)
    data = setup.data()
    run_dir = out / kind
    times = [train(setup.model(data), data.x_train, data.y_train, setup.train, run_dir, overwrite=True).seconds
             for _ in range(repeats)]
    return str(run_dir), times


def _call(setup_name: str, kind: str, run_dir: str, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--setup", setup_name, "--threads", str(threads),
           "--worker", kind, run_dir, str(repeats)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="bench-out/adam_speed.json", help="where to write the results")
    ap.add_argument("--setup", default="speed", help="built-in setup (default: speed)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per subprocess")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of SGD and AdamW subprocesses")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--worker", nargs=3, metavar=("RUN", "DIR", "REPEATS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, run_dir, reps = args.worker
        print(json.dumps(worker(args.setup, kind, run_dir, int(reps), args.threads)))
        return
    out = Path(tempfile.mkdtemp(prefix="diffin-adam-speed-"))
    runs, train_times = {}, {}
    for kind in RUNS:
        runs[kind], train_times[kind] = record(args.setup, kind, out, args.repeats, args.threads)
    times: dict[str, list[float]] = {k: [] for k in RUNS}
    variants: dict[str, str] = {}
    for _ in range(args.rounds):
        for kind in RUNS:
            r = _call(args.setup, kind, runs[kind], args.repeats, args.threads)
            times[kind] += r["seconds"]
            variants[kind] = r["variant"]
    med = {k: statistics.median(v) for k, v in times.items()}
    train_med = {k: statistics.median(v) for k, v in train_times.items()}
    ratio = med["adamw"] / med["sgd"]
    rows = [[k, recipe(args.setup, k).train.optimizer, variants[k], med[k], train_med[k], med[k] / train_med[k]]
            for k in RUNS]
    header = ["run", "optimizer", "variant", f"{METHOD} seconds", "training seconds", "x its training run"]
    print(f"\n{args.setup}: {get_setup(args.setup).description}\n")
    print(text_table(header, rows))
    print(f"\n{METHOD} on the AdamW run / on the SGD run: {ratio:.3f} (median of {len(times['sgd'])} calls each)")
    doc = {
        "setup": args.setup,
        "description": get_setup(args.setup).description,
        "adamw_recipe": dataclasses.asdict(recipe(args.setup, "adamw").train),
        "method": METHOD,
        "variants": variants,
        "seconds": med,
        "seconds_all": times,
        "train_seconds": train_med,
        "train_seconds_all": train_times,
        "ratio_adamw_over_sgd": ratio,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": args.threads, "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "diffin": diffin.__version__},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
