"""Cost of the exact Adam sweep against the SGD sweep (issue 11, item 6: ≤ 1.3×).

The "speed" setup (4,500 MNIST-5k samples, MLP 784-128-10 tanh, float32, batch 128, 5 epochs,
a checkpoint per epoch) is recorded twice by the built-in trainer: as it is (SGD lr 0.1), and
with AdamW (lr 1e-3, weight decay 0.01, everything else the same). ``diffin-exact`` then scores
all samples against the mean validation loss on each run: ``--rounds`` fresh subprocesses, each
warming up on both runs and then timing ``--repeats`` pairs of calls, SGD then AdamW, so that the
two see the same machine load; the reported time of each is the median of all its timed calls.
The ratio AdamW / SGD is the criterion (also given per pair: median and range); the training
runs are timed too (median of ``--repeats``, alternating as well).

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
from diffin.bench.builtin import Setup, get_setup, train
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


def worker(setup_name: str, run_dirs: dict[str, str], repeats: int, threads: int) -> dict:
    """Time ``repeats`` pairs of diffin-exact calls (SGD run, then AdamW run) after a warm-up call
    on each; returns the seconds of each call per run."""
    torch.set_num_threads(threads)
    setup = get_setup(setup_name)
    data = setup.data()
    model = setup.model(data)
    kw = dict(train=(data.x_train, data.y_train), target=(data.x_val, data.y_val), method=METHOD, progress=False)
    variants = {k: diffin.score(run_dirs[k], model, setup.loss_fn, **kw).variant for k in RUNS}
    times: dict[str, list[float]] = {k: [] for k in RUNS}
    for _ in range(repeats):
        for k in RUNS:
            with Measure(poll=False) as m:
                diffin.score(run_dirs[k], model, setup.loss_fn, **kw)
            times[k].append(m.seconds)
    return {"variants": variants, "seconds": times}


def record(setup_name: str, out: Path, repeats: int, threads: int) -> tuple[dict[str, str], dict[str, list[float]]]:
    """Record both runs ``repeats`` times, alternating, each into its folder; returns the folders
    and the training times (s)."""
    torch.set_num_threads(threads)
    data = get_setup(setup_name).data()
    times: dict[str, list[float]] = {k: [] for k in RUNS}
    for _ in range(repeats):
        for k in RUNS:
            setup = recipe(setup_name, k)
            times[k].append(train(setup.model(data), data.x_train, data.y_train, setup.train, out / k,
                                  overwrite=True).seconds)
    return {k: str(out / k) for k in RUNS}, times


def _call(setup_name: str, run_dirs: dict[str, str], repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--setup", setup_name, "--threads", str(threads),
           "--worker", run_dirs["sgd"], run_dirs["adamw"], str(repeats)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="bench-out/adam_speed.json", help="where to write the results")
    ap.add_argument("--setup", default="speed", help="built-in setup (default: speed)")
    ap.add_argument("--repeats", type=int, default=3, help="timed (SGD, AdamW) pairs per subprocess; trainings each")
    ap.add_argument("--rounds", type=int, default=3, help="fresh subprocesses, each timing --repeats pairs of calls")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--worker", nargs=3, metavar=("SGD_RUN", "ADAMW_RUN", "REPEATS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sgd, adamw, reps = args.worker
        print(json.dumps(worker(args.setup, {"sgd": sgd, "adamw": adamw}, int(reps), args.threads)))
        return
    out = Path(tempfile.mkdtemp(prefix="diffin-adam-speed-"))
    runs, train_times = record(args.setup, out, args.repeats, args.threads)
    times: dict[str, list[float]] = {k: [] for k in RUNS}
    variants: dict[str, str] = {}
    for _ in range(args.rounds):
        r = _call(args.setup, runs, args.repeats, args.threads)
        for k in RUNS:
            times[k] += r["seconds"][k]
        variants = r["variants"]
    med = {k: statistics.median(v) for k, v in times.items()}
    train_med = {k: statistics.median(v) for k, v in train_times.items()}
    ratio = med["adamw"] / med["sgd"]
    pairs = [a / b for a, b in zip(times["adamw"], times["sgd"])]
    rows = [[k, recipe(args.setup, k).train.optimizer, variants[k], med[k], train_med[k], med[k] / train_med[k]]
            for k in RUNS]
    header = ["run", "optimizer", "variant", f"{METHOD} seconds", "training seconds", "x its training run"]
    print(f"\n{args.setup}: {get_setup(args.setup).description}\n")
    print(text_table(header, rows))
    print(f"\n{METHOD} on the AdamW run / on the SGD run: {ratio:.3f} (medians of {len(times['sgd'])} calls each); "
          f"per pair of calls: median {statistics.median(pairs):.3f}, range {min(pairs):.3f}–{max(pairs):.3f}")
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
        "ratio_per_pair": pairs,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": args.threads, "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__, "diffin": diffin.__version__},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
