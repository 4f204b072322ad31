"""Speed and memory of the Diff-In estimators (issue: Diff-In estimators, item 8; ReLU rows: issue 11,
item 8).

Setup ("speed"): 4,500 MNIST-5k training samples, 500 validation, MLP 784-128-10, float32,
SGD lr 0.1, batch 128, 5 epochs (180 steps), a checkpoint per epoch (5 after θ_0). The built-in
setup has tanh; the same setup with ReLU (built here, ``--activations``) is measured beside it:
with ``hvp="auto"`` a ReLU network gets exact (double-backward) HVPs instead of finite
differences, whose gradients jump where a perturbation crosses a kink.

For each activation, the training run's wall time is the plain loop of ``diffin.bench.builtin.train``
(the user's loop with ``diffin.Recorder``), median of --repeats runs after one untimed warm-up
run, and every ratio is against that activation's own training run. For each method, in a fresh
subprocess (so peak RSS is the method's own): wall time of scoring all samples (median of
--repeats runs) and the rise of peak RSS over the process's footprint when scoring starts (RSS
polled every 2 ms during one extra run; the timed runs are not polled).
Memory is also measured at N/4, N/2 and N (first activation) to show it does not grow with N
beyond the O(N) scores. A per-sample loop that follows the closed form sample by sample is timed
on a few samples and extrapolated, for scale.

    python benchmarks/speed.py --json bench-out/speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import diffin
from diffin._measure import Measure
from diffin.bench.builtin import Setup, get_setup, train
from diffin.bench.builtin.models import mlp
from diffin.report import markdown_table, text_table

METHODS = ["tracin", "diffin-closed-form", "diffin-expected", "diffin-frozen", "diffin-exact"]
ACTIVATIONS = ("tanh", "relu")


def speed_setup(activation: str) -> Setup:
    """The "speed" setup with the MLP's hidden activation replaced (``tanh`` is the built-in one)."""
    base = get_setup("speed")
    if activation == "tanh":
        return base
    hidden = 128
    return base.with_changes(
        name=f"speed-{activation}",
        description=base.description.replace("tanh", activation),
        build=lambda s: mlp(s.input_shape[0], s.n_classes, (hidden,), activation),
    )


def worker(run_dir: str, activation: str, method: str, n: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    setup = speed_setup(activation)
    data = setup.data()
    x, y = data.x_train[:n], data.y_train[:n]
    model = setup.model(data)
    # warm-up on a tiny slice of the work: imports, allocator, kernels
    diffin.score(run_dir, model, setup.loss_fn, train=(x, y), target=(data.x_val[:8], data.y_val[:8]),
                 method="tracin", progress=False)
    times = []
    for _ in range(repeats):  # timed without the memory poller (it competes for the GIL)
        with Measure(poll=False) as m:
            res = diffin.score(run_dir, model, setup.loss_fn, train=(x, y),
                               target=(data.x_val, data.y_val), method=method, progress=False)
        times.append(m.seconds)
    with Measure(every=0.002) as mem:  # one more run for the peak memory
        diffin.score(run_dir, model, setup.loss_fn, train=(x, y), target=(data.x_val, data.y_val),
                     method=method, progress=False)
    hvp = (res.diagnostics.get("hvp") or {}).get("mode")
    return {"method": method, "activation": activation, "n": n, "seconds": statistics.median(times),
            "all_seconds": times, "variant": res.variant, "hvp": hvp, "peak_rise_mb": mem.rise_mb,
            "scores_mb": res.scores.nbytes / 2**20}


def record_run(out: Path, activation: str, n: int, repeats: int, threads: int) -> tuple[str, float, list[float]]:
    torch.set_num_threads(threads)
    setup = speed_setup(activation)
    data = setup.data()
    times = []
    run_dir = out / f"run-{activation}-{n}"
    x, y = data.x_train[:n], data.y_train[:n]
    for i in range(repeats + 1):  # the first run warms up (kernels, allocator) and is not timed
        model = setup.model(data)
        r = train(model, x, y, setup.train, run_dir, overwrite=True)
        if i:
            times.append(r.seconds)
    return str(run_dir), statistics.median(times), times


def naive_loop_seconds_per_sample(run_dir: str, n: int, k: int = 10) -> float:
    """The closed form computed sample by sample (autograd per sample, finite-difference HVPs),
    as a per-sample implementation would: seconds per sample for all checkpoints (tanh setup)."""
    setup = get_setup("speed")
    data = setup.data()
    model = setup.model(data)
    run = diffin.load_run(run_dir)
    params = [p for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy
    rng = np.random.default_rng(0)
    b = min(setup.train.batch_size, n)

    def grad(xb, yb):
        model.zero_grad()
        loss(model(xb), yb).backward()
        return [p.grad.detach().clone() for p in params]

    def fd_hvp(xb, yb, v, g0, eps=1e-3):
        nv = torch.sqrt(sum((t * t).sum() for t in v))
        with torch.no_grad():
            for p, t in zip(params, v):
                p.add_(t, alpha=eps / nv)
        g1 = grad(xb, yb)
        with torch.no_grad():
            for p, t in zip(params, v):
                p.sub_(t, alpha=eps / nv)
        return [(a - b) * (nv / eps) for a, b in zip(g1, g0)]

    t0 = time.perf_counter()
    for z in range(k):
        xz, yz = data.x_train[z : z + 1], data.y_train[z : z + 1]
        for c in [s for s in run.checkpoint_steps if s > 0]:
            ck = run.load_checkpoint(c)
            with torch.no_grad():
                for (name, p) in model.named_parameters():
                    p.copy_(ck.params[name])
            ids = rng.choice(n, b, replace=False)
            xb, yb = data.x_train[ids], data.y_train[ids]
            gz, gb = grad(xz, yz), grad(xb, yb)
            gv = grad(data.x_val, data.y_val)
            h1 = fd_hvp(xb, yb, gz, gb)
            h2 = fd_hvp(xz, yz, gb, gz)
            float(sum((a * (b + c_)).sum() for a, b, c_ in zip(gv, h1, h2)))
    return (time.perf_counter() - t0) / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="bench-out/speed.json", help="where to write the results")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--activations", default=",".join(ACTIVATIONS),
                    help="comma-separated hidden activations of the MLP (tanh is the built-in setup)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to time")
    ap.add_argument("--n", type=int, default=4500, help="training samples (the setup's first N)")
    ap.add_argument("--naive-samples", type=int, default=10,
                    help="samples of the per-sample closed-form loop to time (0: skip it)")
    ap.add_argument("--no-memory", action="store_true", help="skip peak memory against N")
    ap.add_argument("--worker", nargs=5, metavar=("RUN", "ACT", "METHOD", "N", "REPEATS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_dir, act, method, n, reps = args.worker
        print(json.dumps(worker(run_dir, act, method, int(n), int(reps), args.threads)))
        return
    activations = [a for a in args.activations.split(",") if a]
    methods = [m for m in args.methods.split(",") if m]
    N = args.n
    load_start = list(os.getloadavg())
    out = Path(tempfile.mkdtemp(prefix="diffin-speed-"))
    steps = get_setup("speed").train.epochs * -(-N // get_setup("speed").train.batch_size)
    epochs = get_setup("speed").train.epochs

    header = ["activation", "method", "variant", "HVP", "seconds", "x training run", "x training epoch",
              "peak RSS rise MB"]
    rows = []
    per_act: dict[str, dict] = {}
    run_dirs: dict[str, str] = {}
    for act in activations:
        run_dir, train_s, train_all = record_run(out, act, N, args.repeats, args.threads)
        run_dirs[act] = run_dir
        results = []
        for m in methods:
            r = _call(args.threads, run_dir, act, m, N, args.repeats)
            r["x_training_run"] = r["seconds"] / train_s
            r["x_training_epoch"] = r["seconds"] / (train_s / epochs)
            results.append(r)
            rows.append([act, m, r["variant"], r["hvp"] or "-", r["seconds"], r["x_training_run"],
                         r["x_training_epoch"], r["peak_rise_mb"]])
        per_act[act] = {"train_seconds": train_s, "train_seconds_all": train_all,
                        "epoch_seconds": train_s / epochs, "results": results}
    first = activations[0]
    naive = (naive_loop_seconds_per_sample(run_dirs[first], N, args.naive_samples)
             if args.naive_samples and first == "tanh" else None)
    # memory against N (the setup's data truncated to N samples, one run each), first activation
    mem_rows = []
    memory = []
    if not args.no_memory:
        for n in (N // 4, N // 2, N):
            rd = run_dirs[first] if n == N else record_run(out, first, n, 1, args.threads)[0]
            for m in [m for m in ("diffin-exact", "diffin-closed-form") if m in methods]:
                if n == N:
                    r = next(x for x in per_act[first]["results"] if x["method"] == m)
                else:
                    r = _call(args.threads, rd, first, m, n, 1)
                memory.append({"method": m, "activation": first, "n": n, "peak_rise_mb": r["peak_rise_mb"]})
                mem_rows.append([m, n, r["peak_rise_mb"]])
    for act in activations:
        t = per_act[act]["train_seconds"]
        print(f"\nTraining run, {act} ({epochs} epochs, {steps} steps): {t:.3f} s (median of {args.repeats}); "
              f"one epoch {t / epochs:.3f} s")
    print()
    print(text_table(header, rows))
    if naive is not None:
        print(f"\nPer-sample loop of the closed form: {naive:.3f} s per sample for the checkpoints "
              f"-> {naive * N:.0f} s for all {N:,} samples")
    if mem_rows:
        print(f"\nPeak RSS rise vs number of training samples ({first}):\n")
        print(text_table(["method", "N", "peak RSS rise MB"], mem_rows))
    doc = {
        "setup": get_setup("speed").description,
        "activations": per_act,
        "n": N,
        "repeats": args.repeats,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": args.threads,
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_start": load_start,
                    "load_average_end": list(os.getloadavg())},
        "naive_per_sample_seconds": naive,
        "memory_vs_n": memory,
        "markdown": markdown_table(header, rows),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.json}")


def _call(threads: int, run_dir: str, activation: str, method: str, n: int, reps: int) -> dict:
    """Run one measurement in a fresh interpreter (its peak RSS is its own)."""
    cmd = [sys.executable, __file__, "--threads", str(threads), "--worker", run_dir, activation, method,
           str(n), str(reps)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"worker {activation}/{method} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
