"""GPU check: scores on a device against scores on the CPU, and their times (issue 13, point 4).

Trains a small built-in setup (default ``synthetic``: 1,000 samples, MLP 20-32-4 tanh, SGD, no
download) on the CPU and records it, then scores it with ``diffin-exact``, ``diffin-retrain`` and
``tracin`` in float64 and in float32, once on the CPU and once with ``device=--device``, and prints
the largest difference relative to the largest CPU score, the Pearson correlation and both times.
Each device row is timed after one untimed warm-up scoring (CUDA start-up and kernel caches).
Float64 rows must agree within 1e-8 relative (``diffin-exact`` and ``tracin``; ``diffin-retrain``
is reported only): the script exits with status 1 otherwise. With ``--scale N`` it also times the
scale benchmark at N samples on the device when ``diffin.bench.run_scale`` exists.

Speed section (``--speed``, issue 21): for each of ``--speed-setups`` (default ``scale-1m`` at
``--speed-n`` rows, ``mnist5k-resnet``, and ``text-bert``), on the device: the training loop without
recording timed (after an untimed warm-up), its epoch (the loop over the recipe's epochs; for
``text-bert`` the Hugging Face ``Trainer``'s own run, recorded by ``DiffinCallback``; the ``hf``
extra), then the run recorded on the device and every method of ``--speed-methods`` scored
there (whole ``diffin.score`` calls, after one untimed warm-up call), each as a ratio of the epoch,
samples/s and peak memory (CUDA: ``max_memory_allocated`` in MiB; CPU: peak RSS rise in MiB).

Run it on the CPU first (device = CPU: every difference is 0), then once on a GPU:

    python benchmarks/gpu_check.py --device cpu --json bench-out/gpu_check_cpu.json
    python benchmarks/gpu_check.py --device cuda --json bench-out/gpu_check.json [--scale 100000]
    python benchmarks/gpu_check.py --device cuda --speed --json bench-out/gpu_speed.json   # under 5 minutes
"""

from __future__ import annotations

import argparse
import inspect
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffin
from diffin._io import write_json
from diffin.bench.builtin import get_setup, train

METHODS = ("diffin-exact", "diffin-retrain", "tracin")
CHECKED = ("diffin-exact", "tracin")  # float64 rows held to FLOAT64_RTOL
FLOAT64_RTOL = 1e-8


def device_name(device: str) -> str:
    """A readable name of the device (the GPU's model for CUDA)."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return f"{dev.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def compare(cpu: np.ndarray, dev: np.ndarray) -> dict[str, float]:
    """Largest |dev − cpu| over the largest |cpu| (one number for the whole score vector), and
    the Pearson correlation of the two."""
    scale = float(np.abs(cpu).max()) or 1.0
    diff = float(np.abs(dev.astype(np.float64) - cpu.astype(np.float64)).max())
    same = np.array_equal(cpu, dev)
    pearson = 1.0 if same else float(np.corrcoef(cpu.ravel(), dev.ravel())[0, 1])
    return {"max_rel_diff": diff / scale, "pearson": pearson}


def score(run: str, setup: Any, split: Any, dtype: torch.dtype, method: str, device: str) -> tuple[np.ndarray, float]:
    """Scores (N,) against the validation loss and the wall time (s) of ``diffin.score``."""
    model = setup.model(split).to(dtype)
    t0 = time.perf_counter()
    res = diffin.score(run, model, setup.loss_fn, train=(split.x_train.to(dtype), split.y_train),
                       target=(split.x_val.to(dtype), split.y_val), method=method, device=device, progress=False)
    seconds = time.perf_counter() - t0
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise RuntimeError("diffin moved the caller's module off the CPU")
    return res.scores, seconds


SCALE_METHODS = "diffin,diffin-frozen,tracin"


def scale_row(n: int, device: str, workdir: Path) -> dict[str, Any]:
    """Time the scale benchmark (``diffin.bench.run_scale``: training with recording, then
    :data:`SCALE_METHODS`, one process) at ``n`` samples, on ``device`` when ``run_scale`` takes a
    ``device`` keyword (else on the CPU, said in the row); skipped when ``run_scale`` is absent."""
    from diffin import bench

    fn = getattr(bench, "run_scale", None)
    if fn is None:
        return {"skipped": "diffin.bench has no run_scale"}
    params = inspect.signature(fn).parameters
    kw: dict[str, Any] = {"n_train": n}
    if "processes" in params:
        kw["processes"] = 0
    on = "cpu"
    if "device" in params:
        kw["device"] = on = device
    t0 = time.perf_counter()
    out = fn(bench.BenchConfig(methods=SCALE_METHODS), workdir, **kw)
    note = "" if on == device else f"run_scale has no device keyword: scored on the CPU, not {device}"
    return {"n": n, "device": on, "note": note, "seconds": time.perf_counter() - t0, "result": out}


SPEED_SETUPS = ("scale-1m", "mnist5k-resnet", "text-bert")
SPEED_METHODS = ("diffin", "diffin-exact", "diffin-frozen", "diffin-expected", "diffin-closed-form", "tracin")


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _speed_inputs(name: str, n: int | None, device: str, workdir: Path) -> tuple[Any, Any, Any, Any] | None:
    """(setup, train pair, target pair, description) on ``device``, or None for an unknown setup.
    ``scale-1m``: the first ``n`` rows of the generated scale data (in memory on the device)."""
    from diffin.bench.builtin.setups import SETUPS

    if name not in SETUPS:
        return None
    setup = get_setup(name)
    if name == "scale-1m":
        from diffin.bench.builtin.synthetic_scale import scale_model
        from diffin.bench.scale import _scale_data, _val

        rows = int(n or 100_000)
        folder = _scale_data(workdir, rows, 0)
        x, y = diffin.memmap_arrays(folder)
        setup = setup.with_changes(build=lambda s: scale_model())
        xv, yv = _val(folder)
        train_xy = (torch.from_numpy(np.array(x)).to(device), torch.from_numpy(np.array(y)).to(device))
        return setup, train_xy, (xv.to(device), yv.to(device)), f"scale-1m at N={rows:,}"
    split = setup.data()
    to = (lambda a: a.to(device)) if isinstance(split.x_train, torch.Tensor) else (lambda a: a)
    x = split.x_train if n is None else split.x_train[:n]
    y = split.y_train if n is None else split.y_train[:n]
    return setup.with_changes(build=lambda s, b=setup.build, sp=split: b(sp)), (to(x), to(y)), \
        (to(split.x_val), to(split.y_val)), setup.description


def _peak_reset(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str, measure: Any) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return float(measure.rise_mb)


def _text_fit(name: str, n: int | None, device: str, workdir: Path) -> tuple[Any, ...] | None:
    """A real-text setup (``text-bert``, ``text-gpt``; the ``hf`` extra) for the speed section: its
    training is the Hugging Face ``Trainer`` on ``device`` (recorded by ``DiffinCallback``), so the
    epoch is the Trainer's. (fit(record) -> (seconds, steps), model(), loss, train, target, epochs,
    description), or None when this diffin has no such setup."""
    try:
        from diffin.bench.builtin.text_setups import TEXT_SETUPS, train_with_trainer
    except ImportError:
        return None
    if name not in TEXT_SETUPS:
        return None
    text = TEXT_SETUPS[name]
    data = text.data()
    rows = slice(None) if n is None else slice(0, n)
    x = {k: v[rows] for k, v in data.x_train.items()}
    y = data.y_train[rows]
    run_dir = workdir / f"speed-{name}"
    on_cpu = torch.device(device).type == "cpu"

    def fit(record: bool) -> tuple[float, int]:
        r = train_with_trainer(text.model(data), x, y, text.recipe, workdir / f"{name}-trainer", use_cpu=on_cpu,
                               record_to=run_dir if record else None)
        return r.seconds, r.steps

    def move(a: Any) -> Any:
        return {k: v.to(device) for k, v in a.items()} if isinstance(a, dict) else a.to(device)

    target = (move(data.x_val), move(data.y_val))
    return (fit, lambda: text.model(data).to(device), text.loss_fn, (move(x), move(y)), target, text.recipe.epochs,
            f"{text.description}; {text.recipe.describe()}")


def speed_rows(name: str, n: int | None, device: str, methods: list[str], workdir: Path) -> dict[str, Any]:
    """The speed section of one setup on ``device`` (see the module docstring)."""
    from diffin._measure import Measure
    from diffin.bench.builtin import train as train_loop

    run_dir = workdir / f"speed-{name}"
    text = _text_fit(name, n, device, workdir)
    if text is not None:
        fit, model, loss_fn, (x, y), target, epochs, desc = text
    else:
        got = _speed_inputs(name, n, device, workdir)
        if got is None:
            return {"setup": name, "skipped": f"no built-in setup {name!r} in this diffin"}
        setup, (x, y), target, desc = got
        loss_fn, epochs = setup.loss_fn, setup.train.epochs

        def model() -> torch.nn.Module:
            torch.manual_seed(setup.train.seed)
            return setup.build(None).to(setup.dtype).to(device)

        def fit(record: bool) -> tuple[float, int]:
            r = train_loop(model(), x, y, setup.train, run_dir, record=record, overwrite=record, loss=setup.loss_fn)
            return r.seconds, r.steps

    fit(False)  # warm-up (kernels, allocator)
    _sync(device)
    plain_seconds, steps = fit(False)
    _sync(device)
    epoch = plain_seconds / epochs
    recorded_seconds, _ = fit(True)
    n_rows = len(y)
    score_kw = dict(train=(x, y), target=target, progress=False, device=device)
    diffin.score(str(run_dir), model(), loss_fn, method="tracin", **score_kw)  # warm-up
    rows = []
    for m in methods:
        _peak_reset(device)
        try:
            with Measure(poll=torch.device(device).type != "cuda") as meas:
                res = diffin.score(str(run_dir), model(), loss_fn, method=m, **score_kw)
                _sync(device)
        except diffin.DiffinError as e:
            rows.append({"method": m, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append({"method": m, "variant": res.variant, "seconds": meas.seconds,
                     "x_epoch": meas.seconds / epoch, "x_training": meas.seconds / plain_seconds,
                     "samples_per_second": n_rows / meas.seconds,
                     "peak_memory_mb": _peak_mb(device, meas)})
    return {"setup": name, "description": desc, "n_train": n_rows, "steps": steps,
            "epochs": epochs, "train_seconds_plain": plain_seconds, "epoch_seconds": epoch,
            "train_seconds_recorded": recorded_seconds, "device": device, "device_name": device_name(device),
            "rows": rows}


def speed_section(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """Every setup of ``--speed-setups``; prints one table per setup."""
    methods = [m.strip() for m in args.speed_methods.split(",") if m.strip()]
    out = []
    for name in [s.strip() for s in args.speed_setups.split(",") if s.strip()]:
        n = args.speed_n if name == "scale-1m" else args.speed_rows
        block = speed_rows(name, n, args.device, methods, workdir / "speed")
        out.append(block)
        if "skipped" in block:
            print(f"speed {name}: skipped ({block['skipped']})")
            continue
        print(f"\nspeed {name} on {block['device_name']}: N={block['n_train']:,}, epoch {block['epoch_seconds']:.3f} s "
              f"(loop without recording, {block['epochs']} epochs, {block['steps']} steps)")
        print(f"{'method':20} {'seconds':>9} {'x epoch':>8} {'x training':>10} {'samples/s':>11} {'peak MiB':>9}")
        for r in block["rows"]:
            if "error" in r:
                print(f"{r['method']:20} {r['error'][:60]}")
                continue
            print(f"{r['method']:20} {r['seconds']:9.2f} {r['x_epoch']:8.2f} {r['x_training']:10.2f} "
                  f"{r['samples_per_second']:11,.0f} "
                  f"{r['peak_memory_mb']:9.1f}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="the device to check against the CPU (default: cuda)")
    ap.add_argument("--setup", default="synthetic", help="a built-in setup (default: synthetic, no download)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated estimators")
    ap.add_argument("--scale", type=int, default=None, metavar="N",
                    help="also time the scale benchmark at N samples on the device (if diffin.bench.run_scale exists)")
    ap.add_argument("--speed", action="store_true", help="also run the speed section (every method against the epoch)")
    ap.add_argument("--speed-only", action="store_true", help="run only the speed section")
    ap.add_argument("--speed-setups", default=",".join(SPEED_SETUPS), help="setups of the speed section")
    ap.add_argument("--speed-methods", default=",".join(SPEED_METHODS), help="methods of the speed section")
    ap.add_argument("--speed-n", type=int, default=200_000, help="scale-1m rows in the speed section")
    ap.add_argument("--speed-rows", type=int, default=None,
                    help="first rows of the other speed setups' training data (default: all)")
    ap.add_argument("--workdir", default=None, help="where to record the run (default: a temp folder)")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON here")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="diffin-gpu-check-"))
    if args.speed_only:
        speed = speed_section(args, workdir)
        if args.json:
            write_json(Path(args.json), {"device": args.device, "device_name": device_name(args.device),
                                         "torch": torch.__version__, "diffin": diffin.__version__, "speed": speed})
        return 0

    setup = get_setup(args.setup)
    split = setup.data()
    t0 = time.perf_counter()
    trained = train(setup.model(split), split.x_train, split.y_train, setup.train, workdir / "run", overwrite=True)
    train_s = time.perf_counter() - t0
    run = trained.run_dir
    print(f"setup {setup.name}: {len(split.y_train)} samples, trained and recorded on the CPU in {train_s:.1f} s")
    print(f"device: {device_name(args.device)}")

    score(run, setup, split, torch.float32, "tracin", args.device)  # warm-up (CUDA start-up), not timed
    rows: list[dict[str, Any]] = []
    header = f"{'dtype':8} {'method':16} {'max rel diff':>13} {'pearson':>10} {'cpu s':>8} {'device s':>9}"
    print(header)
    print("-" * len(header))
    failed = []
    for dtype in (torch.float64, torch.float32):
        for method in methods:
            cpu, cpu_s = score(run, setup, split, dtype, method, "cpu")
            dev, dev_s = score(run, setup, split, dtype, method, args.device)
            c = compare(cpu, dev)
            dt = str(dtype).removeprefix("torch.")
            ok = not (dtype == torch.float64 and method in CHECKED and not c["max_rel_diff"] <= FLOAT64_RTOL)
            if not ok:
                failed.append(f"{dt} {method}")
            rows.append({"dtype": dt, "method": method, **c, "cpu_seconds": cpu_s, "device_seconds": dev_s,
                         "checked": dtype == torch.float64 and method in CHECKED, "ok": ok})
            print(f"{dt:8} {method:16} {c['max_rel_diff']:13.2e} {c['pearson']:10.6f} {cpu_s:8.2f} {dev_s:9.2f}"
                  + ("" if ok else "  FAIL"))

    result: dict[str, Any] = {
        "setup": setup.name, "n_train": len(split.y_train), "device": args.device,
        "device_name": device_name(args.device), "torch": torch.__version__, "diffin": diffin.__version__,
        "train_seconds": train_s, "float64_rtol": FLOAT64_RTOL, "rows": rows, "failed": failed,
    }
    if args.scale:
        result["scale"] = scale_row(args.scale, args.device, workdir / "scale")
        print("scale:", {k: v for k, v in result["scale"].items() if k != "result"})
    if args.speed:
        result["speed"] = speed_section(args, workdir)
    if args.json:
        write_json(Path(args.json), result)
    print("OK: float64 scores agree within 1e-8 relative" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
