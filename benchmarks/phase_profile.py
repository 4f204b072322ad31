"""Where the time of a whole ``diffin.score`` call goes, per phase, against the same training loop
without recording (issue 21, item 1).

For each setup the run is trained and recorded once; then, ``--repeats`` times and interleaved,
the same loop WITHOUT recording (``diffin.bench.builtin.train(..., record=False)``) is timed, followed by
one whole ``diffin.score`` call of every method (checks, hashing and probes included), each in this
same process. A method's ratio is the median over the repeats of (its call) / (that repeat's
training loop), so load that changes between repeats moves both alike. Each call's time is split
into exclusive phases by wrapping the library's functions (a function's time, less that of the
wrapped functions it calls):

    checks      model/run/ids checks, NaN/Inf scan, never-trained rows      (fixed per call)
    hashing     content hashes of the data for the result key              (fixed per call)
    probe       model+loss call on two rows, the HVP-mode probe at θ_T      (fixed per call)
    replay      the replayed training steps (Trajectory.step)
    adjoint     the optimizer rule's transpose (Trajectory.adjoint)
    products    batch HVPs with the per-sample inner products, per-sample JVPs/gradients, VJPs
    target      ∇f at the checkpoints (Target.grads)
    I/O         checkpoints, batch ids, rows of the training data
    other       the rest: the estimator's own bookkeeping, score accumulation, result

Setups: ``speed-tanh`` and ``speed-relu`` (benchmarks/speed.py: 4,500 MNIST-5k, MLP 784-128-10,
batch 128, 5 epochs), ``scale-1m`` at ``--scale-n`` rows (default 100,000, the setup's 1,000,000
reduced for the profile; one epoch), ``mnist5k-resnet`` (BatchNorm CNN with dropout, float64),
``text-bert`` (the real-text setup: a small BERT trained by the Hugging Face ``Trainer`` with AdamW,
clipping and accumulation, recorded by ``DiffinCallback``; its unit is the ``Trainer`` without the
callback; needs the ``hf`` extra).

    python benchmarks/phase_profile.py --repeats 3 --json bench-out/profile.json
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import diffin
from diffin._io import write_json
from diffin.bench.builtin import get_setup, train
from diffin.bench.builtin.models import mlp
from diffin.report import markdown_table, text_table

PHASES = ("checks", "hashing", "probe", "replay", "adjoint", "products", "target", "I/O", "other")
SETUP_METHODS = {
    "speed-tanh": ("diffin-exact", "diffin-frozen", "diffin-expected", "diffin-closed-form", "tracin"),
    "speed-relu": ("diffin-exact", "diffin-frozen", "diffin-expected", "diffin-closed-form", "tracin"),
    "scale-1m": ("diffin", "diffin-closed-form", "tracin"),
    "mnist5k-resnet": ("diffin-exact", "tracin"),
    "text-bert": ("diffin", "tracin"),
}
TEXT = ("text-bert", "text-gpt")  # trained by the Hugging Face Trainer (the ``hf`` extra)


class PhaseTimer:
    """Exclusive wall time per phase: wrapped functions push their phase on a stack; time is
    charged to the phase on top of the stack (``other`` when empty)."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.totals: dict[str, float] = defaultdict(float)
        self.last = time.perf_counter()

    def reset(self) -> None:
        self.stack.clear()
        self.totals = defaultdict(float)
        self.last = time.perf_counter()

    def _switch(self, push: str | None) -> None:
        now = time.perf_counter()
        self.totals[self.stack[-1] if self.stack else "other"] += now - self.last
        self.last = now
        if push is None:
            self.stack.pop()
        else:
            self.stack.append(push)

    def wrap(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*a: Any, **k: Any) -> Any:
            self._switch(phase)
            try:
                return fn(*a, **k)
            finally:
                self._switch(None)
        inner.__wrapped_phase__ = True  # type: ignore[attr-defined]
        return inner

    def finish(self) -> dict[str, float]:
        self._switch("other")
        self.stack.clear()
        return dict(self.totals)


def instrument(timer: PhaseTimer) -> None:
    """Wrap the library's functions of each phase (module attributes and methods, in place)."""
    from diffin import _api, _data, _functional, targets
    from diffin.estimators import base as est_base
    from diffin.recording import run as run_mod
    from diffin.trajectory import _trajectory as traj_mod

    plan: list[tuple[Any, str, str]] = [
        (_api, "check_inputs", "checks"), (_api, "warn_untrained_rows", "checks"),
        (run_mod.Run, "check_model", "checks"), (run_mod.Run, "check_ids", "checks"),
        (_data.DataSource, "check_finite", "checks"),
        (_api, "result_key", "hashing"), (_data, "fingerprint", "hashing"),
        (_api, "probe_model_and_loss", "probe"), (est_base.ScoringContext, "_resolve_hvp", "probe"),
        (traj_mod.Trajectory, "step", "replay"), (traj_mod.Trajectory, "graph_step", "replay"),
        (traj_mod.Trajectory, "adjoint", "adjoint"),
        (_functional.FlatModel, "hvp_and_dots", "products"), (_functional.FlatModel, "hvp", "products"),
        (_functional.FlatModel, "dots", "products"), (_functional.FlatModel, "dots_many", "products"),
        (_functional.FlatModel, "step_vjp", "products"), (_functional.FlatModel, "graph_hvp_and_dots", "products"),
        (_functional.FlatModel, "step_graph_vjp", "products"), (_functional.FlatModel, "mixed_second", "products"),
        (_functional.FlatModel, "per_sample_grads", "products"),
        (targets.Target, "grads", "target"), (targets.Target, "stat_grads", "target"),
        (run_mod.Run, "load_checkpoint", "I/O"), (run_mod.Run, "batch", "I/O"),
        (_data.DataSource, "get", "I/O"),
    ]
    for tcls in vars(targets).values():  # every Target subclass's own grads
        if isinstance(tcls, type) and issubclass(tcls, targets.Target) and tcls is not targets.Target:
            for name in ("grads", "stat_grads"):
                if name in vars(tcls):
                    plan.append((tcls, name, "target"))
    for owner, name, phase in plan:
        fn = getattr(owner, name, None)
        if fn is None or getattr(fn, "__wrapped_phase__", False):
            continue
        setattr(owner, name, timer.wrap(fn, phase))


def speed_setup(activation: str) -> Any:
    base = get_setup("speed")
    if activation == "tanh":
        return base
    return base.with_changes(name=f"speed-{activation}", build=lambda s: mlp(s.input_shape[0], s.n_classes,
                                                                          (128,), activation))


def load(name: str, workdir: Path, scale_n: int) -> tuple[Any, Any, Any, Any]:
    """(setup, train data, target data, description) of a profiled setup."""
    if name.startswith("speed-"):
        setup = speed_setup(name.split("-", 1)[1])
        d = setup.data()
        return setup, (d.x_train, d.y_train), (d.x_val, d.y_val), f"{setup.description}; {name}"
    if name == "scale-1m":
        from diffin.bench.builtin.synthetic_scale import scale_model
        from diffin.bench.scale import _scale_data, _val

        setup = get_setup("scale-1m").with_changes(build=lambda s: scale_model())
        folder = _scale_data(workdir, scale_n, 0)
        return setup, diffin.memmap_arrays(folder), _val(folder), f"scale-1m at N={scale_n:,} (memory-mapped)"
    setup = get_setup(name)
    d = setup.data()
    return setup, (d.x_train, d.y_train), (d.x_val, d.y_val), setup.description


def profile_setup(name: str, workdir: Path, repeats: int, scale_n: int, timer: PhaseTimer,
                  methods: tuple[str, ...]) -> dict[str, Any]:
    run_dir = workdir / f"run-{name}"
    if name in TEXT:  # the Trainer's run, recorded by DiffinCallback; the unit is the Trainer without it
        from diffin.bench.builtin.text_setups import get_text_setup, train_with_trainer

        text = get_text_setup(name)
        data = text.data()
        loss_fn, train_xy, target = text.loss_fn, (data.x_train, data.y_train), (data.x_val, data.y_val)
        desc = f"{text.description}; {text.recipe.describe()}"

        def model() -> torch.nn.Module:
            return text.model(data)

        def fit(record: bool) -> tuple[float, int]:
            r = train_with_trainer(model(), data.x_train, data.y_train, text.recipe, workdir / f"{name}-trainer",
                                   record_to=run_dir if record else None)
            return r.seconds, r.steps
    else:
        setup, (x, y), target, desc = load(name, workdir, scale_n)
        split = None if name == "scale-1m" else setup.data()
        loss_fn, train_xy = setup.loss_fn, (x, y)

        def model() -> torch.nn.Module:
            if split is None:
                torch.manual_seed(setup.train.seed)
                return setup.build(None).to(setup.dtype)
            return setup.model(split)

        def fit(record: bool) -> tuple[float, int]:
            r = train(model(), x, y, setup.train, run_dir, record=record, overwrite=record, loss=setup.loss_fn)
            return r.seconds, r.steps

    recorded_seconds, steps = fit(True)
    fit(False)  # warm-up, untimed
    diffin.score(str(run_dir), model(), loss_fn, train=train_xy, target=target, method="tracin",
                 progress=False)  # warm-up: imports, kernels
    plain: list[float] = []
    calls: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for _ in range(repeats):
        plain.append(fit(False)[0])
        for m in methods:
            timer.reset()
            t0 = time.perf_counter()
            diffin.score(str(run_dir), model(), loss_fn, train=train_xy, target=target, method=m, progress=False)
            total = time.perf_counter() - t0
            phases = timer.finish()
            calls[m].append({"total": total, "ratio": total / plain[-1], **phases})
    rows = []
    for m in methods:
        med = {k: statistics.median(c.get(k, 0.0) for c in calls[m]) for k in ("total", "ratio", *PHASES)}
        rows.append({"method": m, "seconds": med["total"], "x_training": med["ratio"],
                     "ratios": [c["ratio"] for c in calls[m]],
                     "phases_seconds": {p: med[p] for p in PHASES},
                     "phases_share": {p: med[p] / med["total"] for p in PHASES}})
    run = diffin.load_run(run_dir)
    n_ck = len([s for s in run.checkpoint_steps if s > 0])
    return {"setup": name, "description": desc, "n_train": len(train_xy[1]),
            "steps": steps, "checkpoints": n_ck, "train_plain_seconds": plain,
            "train_recorded_seconds": recorded_seconds, "methods": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default=",".join(SETUP_METHODS), help="comma-separated: " + ", ".join(SETUP_METHODS))
    ap.add_argument("--methods", default=None, help="comma-separated methods for every setup (default: per setup)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians)")
    ap.add_argument("--scale-n", type=int, default=100_000, help="rows of the scale-1m profile")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--workdir", default=None, help="where runs and data go (default: a temp folder)")
    ap.add_argument("--json", default="bench-out/profile.json", help="where to write the results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="diffin-profile-"))
    timer = PhaseTimer()
    instrument(timer)
    load_start = list(os.getloadavg())
    results = []
    header = ["setup", "method", "seconds", "x training", *[f"{p} %" for p in PHASES]]
    table = []
    for name in [s for s in args.setups.split(",") if s]:
        if name in TEXT and importlib.util.find_spec("transformers") is None:
            print(f"{name}: skipped (needs the hf extra: pip install -e '.[hf]')")
            continue
        methods = tuple(args.methods.split(",")) if args.methods else SETUP_METHODS[name]
        r = profile_setup(name, workdir, args.repeats, args.scale_n, timer, methods)
        results.append(r)
        print(f"{name}: N={r['n_train']:,}, {r['steps']} steps, {r['checkpoints']} checkpoints; training loop "
              f"without recording {statistics.median(r['train_plain_seconds']):.3f} s (median), with recording "
              f"{r['train_recorded_seconds']:.3f} s", flush=True)
        for m in r["methods"]:
            table.append([name, m["method"], m["seconds"], m["x_training"],
                          *[100 * m["phases_share"][p] for p in PHASES]])
    load_end = list(os.getloadavg())
    print()
    print(text_table(header, table))
    print(f"\nload average at start {load_start}, at end {load_end}")
    doc = {"results": results, "repeats": args.repeats, "phases": PHASES,
           "machine": {"cpu_count": os.cpu_count(), "torch_threads": args.threads, "platform": platform.platform(),
                       "torch": torch.__version__, "load_average_start": load_start, "load_average_end": load_end},
           "markdown": markdown_table(header, table)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, doc)  # atomic
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
