"""``diffin bench --setup scale-1m``: time and memory of every method on a million samples on
disk (issue 13), against N, with a float64 removal spot check (:func:`removal_spot_check`, shared
with :mod:`diffin.bench.pairs`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import _tree
from .._api import score
from .._data import memmap_arrays
from .._errors import UnsupportedMethodError
from .._measure import Measure
from ..groundtruth import replay_removal
from .builtin import get_setup, train
from .harness import DEFAULT_METHODS, BenchConfig, _compare, _short_error

SCALE_SETUP = "scale-1m"
SCALE_METHODS = ("diffin", "diffin-frozen", "diffin-expected", "diffin-closed-form", "tracin")
SCALE_N_TRAIN = 1_000_000
SCALE_SPOT_N = 100_000  # rows of the float64 fidelity spot check
SCALE_SPOT_REMOVED = 20
SCALE_SPOT_TARGET = 0.95  # Pearson the spot check should reach (issue 13)
SCALE_COLUMNS = ("method", "variant", "processes", "seconds", "x_epoch", "samples_per_second", "peak_rss_mb",
                 "peak_rss_rise_mb")
SIZES_COLUMNS = ("n_train", "train_seconds", "seconds", "x_epoch", "samples_per_second", "peak_rss_mb",
                 "peak_rss_rise_mb")


def _scale_data(workdir: Path, n: int, seed: int) -> Path:
    """The scale data folder of ``n`` training rows under ``workdir`` (generated once, reused)."""
    from .builtin.synthetic_scale import generate

    folder = workdir / "scale-data" / f"n{n}"
    generate(folder, n_train=n, seed=seed)
    return folder


def _val(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation pair of a scale data folder, in memory: (2000, 64) float32, (2000,) int64."""
    return (torch.from_numpy(np.load(folder / "x_val.npy")), torch.from_numpy(np.load(folder / "y_val.npy")))


def _proc_tree_rss_mb(root: int) -> tuple[float, float]:
    """(sum, max) resident memory in MiB of process ``root`` and all its descendants, from
    ``/proc`` (Linux; (0, 0) where it cannot be read)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    parent[int(d)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in tree} - tree
        grew = bool(new)
        tree |= new
    sizes = []
    for p in tree:
        try:
            with open(f"/proc/{p}/statm") as fh:
                sizes.append(int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)
        except (OSError, ValueError, IndexError):
            continue
    return (sum(sizes), max(sizes)) if sizes else (0.0, 0.0)


def _torchrun_row(run_dir: Path, data_dir: Path, out_dir: Path, nproc: int, epoch_s: float, n: int,
                  log: Any) -> dict[str, Any]:
    """``diffin`` (exact) with ``nproc`` gloo processes: ``torchrun --nproc_per_node NPROC -m diffin
    score`` as a subprocess, timed; its memory is the process tree's (launcher and workers),
    polled every 0.2 s: ``peak_rss_mb`` their sum, ``peak_rss_mb_per_process`` the largest one."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "diffin", "score", str(run_dir), "--model", "diffin.bench.builtin.synthetic_scale:scale_model",
           "--data", str(data_dir), "--method", "diffin", "--out", str(out_dir), "--overwrite", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    log(f"[{SCALE_SETUP}] diffin ×{nproc} processes: {' '.join(cmd[2:])}")
    peak_sum = peak_one = 0.0
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        while proc.poll() is None:
            s, m = _proc_tree_rss_mb(proc.pid)
            peak_sum, peak_one = max(peak_sum, s), max(peak_one, m)
            time.sleep(0.2)
        output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {"method": f"diffin ×{nproc} processes", "processes": nproc, "command": " ".join(cmd[2:])}
    if proc.returncode != 0:
        err = f"torchrun exited with {proc.returncode}: {output.strip()[-2000:]}"
        log(f"[{SCALE_SETUP}] {err}")
        return {**row, "variant": _short_error(err), "error": err}
    meta = json.loads((out_dir / "scores.json").read_text(encoding="utf-8"))
    row.update(variant=meta.get("variant", "diffin"), seconds=seconds, x_epoch=seconds / epoch_s,
               samples_per_second=n / seconds, peak_rss_mb=peak_sum, peak_rss_mb_per_process=peak_one)
    return row


def _scale_row(method: str, r: Any, m: Measure, epoch_s: float, n: int) -> dict[str, Any]:
    return {"method": method, "variant": r.variant, "processes": 1, "seconds": m.seconds,
            "x_epoch": m.seconds / epoch_s, "samples_per_second": n / m.seconds, "peak_rss_mb": m.peak_mb,
            "peak_rss_rise_mb": m.rise_mb}


def removal_spot_check(label: str, make_model: Any, loss_fn: Any, train_xy: tuple[Any, Any], val: Any,
                       recipe: Any, run_dir: Path, k: int, seed: int, convention: str, methods: tuple[str, ...],
                       progress: bool, log: Any) -> tuple[Any, np.ndarray, np.ndarray, float, dict[str, Any]]:
    """The scale benchmarks' float64 spot check: train ``make_model()`` on ``train_xy`` with
    ``recipe`` (recorded into ``run_dir``), replay the removal of ``k`` random samples (seeded), score
    with each of ``methods``; returns the training result, the removed ids, the replayed effects
    (k,), the replay's seconds and {method: (ScoreResult, seconds, its comparison with the replay)}."""
    n = _tree.batch_len(train_xy[0])
    t = train(make_model(), *train_xy, recipe, run_dir, loss=loss_fn, overwrite=True, progress=progress)
    k = min(k, n)
    removed = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
    log(f"[{label}] spot check (float64, N={n}): trained in {t.seconds:.1f}s; replaying {k} removals ...")
    with Measure() as m_gt:
        actual = replay_removal(run_dir, make_model(), loss_fn, train=train_xy, target=val,
                                remove=[int(i) for i in removed], convention=convention, progress=progress)
    actual = np.asarray(actual, dtype=np.float64)
    scored = {}
    for method in methods:
        with Measure() as m:
            r = score(run_dir, make_model(), loss_fn, train=train_xy, target=val, method=method,
                      convention=convention, progress=progress)
        scored[method] = (r, m.seconds, _compare(r.scores.astype(np.float64)[removed], actual, False))
    return t, removed, actual, m_gt.seconds, scored


def _spot_check(data_dir: Path, n: int, cfg: BenchConfig, workdir: Path, progress: bool,
                log: Any) -> dict[str, Any]:
    """``diffin`` against replayed removal of :data:`SCALE_SPOT_REMOVED` random samples on the
    first ``n`` rows, in float64 (inputs copied to memory: n × 64 × 8 bytes)."""
    from .builtin.synthetic_scale import scale_model

    setup = get_setup(SCALE_SETUP)
    x_mm, y_mm = memmap_arrays(data_dir)
    x = torch.from_numpy(np.asarray(x_mm[:n], dtype=np.float64))
    y = torch.from_numpy(np.array(y_mm[:n]))
    xv, yv = _val(data_dir)
    t, removed, _, replay_s, scored = removal_spot_check(
        SCALE_SETUP, lambda: scale_model().double(), setup.loss_fn, (x, y), (xv.double(), yv), setup.train,
        workdir / f"{SCALE_SETUP}-spot-n{n}", SCALE_SPOT_REMOVED, cfg.seed, cfg.convention, ("diffin",), progress, log)
    r, score_s, cmp = scored["diffin"]
    out = {"n_train": n, "dtype": "float64", "variant": r.variant, "n_removed": len(removed),
           "removed_ids": removed.tolist(), "train_seconds": t.seconds, "replay_seconds": replay_s,
           "score_seconds": score_s, "target_pearson": SCALE_SPOT_TARGET, **cmp}
    log(f"[{SCALE_SETUP}] spot check: Pearson {out['pearson']:.4f} (target ≥ {SCALE_SPOT_TARGET})")
    return out


def _sizes_rows(sizes: list[int], cfg: BenchConfig, workdir: Path, progress: bool, log: Any,
                reuse: dict[int, dict[str, Any]], device: str | None = None) -> list[dict[str, Any]]:
    """One row per N of ``sizes``: the epoch (train with recording, CPU) and ``diffin`` (exact,
    on ``device``) on N rows, timed, peak memory polled; ``reuse`` (N → row) rows already measured."""
    from .builtin.synthetic_scale import scale_model

    setup = get_setup(SCALE_SETUP)
    rows = []
    for n in sizes:
        if n in reuse:
            rows.append(reuse[n])
            continue
        data_dir = _scale_data(workdir, n, cfg.seed)
        x, y = memmap_arrays(data_dir)
        run_dir = workdir / f"{SCALE_SETUP}-n{n}"
        t = train(scale_model(), x, y, setup.train, run_dir, overwrite=True, progress=progress)
        log(f"[{SCALE_SETUP}] N={n}: epoch {t.seconds:.1f}s; diffin ...")
        with Measure() as m:
            r = score(run_dir, scale_model(), setup.loss_fn, train=(x, y), target=_val(data_dir), method="diffin",
                      convention=cfg.convention, progress=progress, **({"device": device} if device else {}))
        rows.append({"n_train": n, "variant": r.variant, "train_seconds": t.seconds, "seconds": m.seconds,
                     "x_epoch": m.seconds / t.seconds, "samples_per_second": n / m.seconds,
                     "peak_rss_mb": m.peak_mb, "peak_rss_rise_mb": m.rise_mb})
    return rows


def plot_sizes(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Time (s) and peak memory (MiB) of ``diffin`` against N, two panels, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_write

    n = [r["n_train"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.loglog(n, [r["seconds"] for r in rows], "o-", label="diffin (exact)")
    a.loglog(n, [r["train_seconds"] for r in rows], "s--", label="training epoch")
    a.set(xlabel="training samples N", ylabel="seconds", title="time")
    a.legend()
    b.semilogx(n, [r["peak_rss_mb"] for r in rows], "o-", label="peak RSS")
    b.semilogx(n, [r["peak_rss_rise_mb"] for r in rows], "s--", label="rise during scoring")
    b.set(xlabel="training samples N", ylabel="MiB", title="memory", ylim=(0, None))
    b.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def run_scale(cfg: BenchConfig, workdir: Path, sizes: list[int] | None = None, n_train: int | None = None,
              progress: bool = False, log: Any = print, plot_path: str | os.PathLike[str] | None = None,
              processes: int = 2, device: str | None = None) -> dict[str, Any]:
    """The ``scale-1m`` benchmark: data generated once under ``workdir/scale-data`` and read
    memory-mapped; training with recording (timed: the epoch), then each method of
    :data:`SCALE_METHODS` (or ``cfg.methods`` when changed from the default) timed against the
    epoch, with ``samples_per_second``, ``processes`` and ``peak_rss_mb`` (MiB), the closed form
    on ``cfg.closed_form_m`` evenly spaced checkpoints, and ``diffin`` with ``processes`` gloo
    processes under torchrun (0 = no such row); a float64 spot check against replayed removal on
    min(N, 100,000) rows; with ``sizes``, one row per N and a plot at ``plot_path``.

    ``n_train``: training rows (default ``cfg.n_train``, else 1,000,000). ``device``: score the
    method and ``sizes`` rows there (e.g. ``"cuda"``); training, the spot check and the torchrun row
    stay on the CPU, so ``x_epoch`` is then the device's scoring time over the CPU's epoch."""
    from .builtin.synthetic_scale import scale_model

    setup = get_setup(SCALE_SETUP)
    n = int(n_train or cfg.n_train or SCALE_N_TRAIN)
    t0 = time.perf_counter()
    data_dir = _scale_data(workdir, n, cfg.seed)
    log(f"[{SCALE_SETUP}] data: {data_dir} ({time.perf_counter() - t0:.1f}s)")
    x, y = memmap_arrays(data_dir)
    val = _val(data_dir)
    run_dir = workdir / SCALE_SETUP
    t = train(scale_model(), x, y, setup.train, run_dir, overwrite=True, progress=progress)
    epoch = t.seconds
    log(f"[{SCALE_SETUP}] N={n}: trained {t.steps} steps (one epoch, recorded) in {epoch:.1f}s")
    methods = SCALE_METHODS if cfg.methods == ",".join(DEFAULT_METHODS) else tuple(cfg.method_list())
    results = []
    for method in methods:
        log(f"[{SCALE_SETUP}] {method} ...")
        opts: dict[str, Any] = {"device": device} if device else {}
        if method == "diffin-closed-form":
            opts["closed_form_checkpoints"] = cfg.closed_form_m
        try:
            with Measure() as m:
                r = score(run_dir, scale_model(), setup.loss_fn, train=(x, y), target=val, method=method,
                          convention=cfg.convention, progress=progress, **opts)
        except UnsupportedMethodError as e:
            results.append({"method": method, "variant": _short_error(str(e)), "error": str(e), "processes": 1})
            continue
        row = _scale_row(method, r, m, epoch, n)
        if method == "diffin-closed-form":
            row["checkpoints_used"] = cfg.closed_form_m
            row["x_epoch_per_checkpoint"] = row["x_epoch"] / cfg.closed_form_m
        results.append(row)
        log(f"[{SCALE_SETUP}] {method}: {m.seconds:.1f}s = {row['x_epoch']:.2f}× the epoch, "
            f"peak RSS {m.peak_mb:.0f} MiB")
    if processes > 1:
        results.append(_torchrun_row(run_dir, data_dir, workdir / f"{SCALE_SETUP}-scores-{processes}p", processes,
                                     epoch, n, log))
    out: dict[str, Any] = {
        "setup": SCALE_SETUP,
        "description": setup.description.replace("1,000,000", f"{n:,}"),
        "n_train": n,
        "n_val": int(val[0].shape[0]),
        "n_steps": t.steps,
        "train_seconds": epoch,
        "optimizer": setup.train.optimizer,
        "clip_grad_norm": None,
        "clipped_fraction": None,
        "data_dir": str(data_dir),
        "device": device or "cpu",
        "train_device": "cpu",
        "closed_form_checkpoints": cfg.closed_form_m,
        "results": results,
    }
    spot = _spot_check(data_dir, min(n, SCALE_SPOT_N), cfg, workdir, progress, log)
    out["spot_check"] = spot
    out["ground_truth"] = {"kind": "replayed-removal", "convention": cfg.convention, "n_removed": spot["n_removed"],
                           "n_train": spot["n_train"], "dtype": "float64", "seconds": spot["replay_seconds"],
                           "removed_ids": spot["removed_ids"]}
    if sizes:
        exact = next((r for r in results if r["method"] == "diffin" and "error" not in r), None)
        reuse = {} if exact is None else {n: {"n_train": n, "variant": exact["variant"], "train_seconds": epoch,
                                              **{k: exact[k] for k in SIZES_COLUMNS[2:]}}}
        out["sizes"] = _sizes_rows(sorted(set(sizes)), cfg, workdir, progress, log, reuse, device)
        if plot_path is not None:
            plot_sizes(out["sizes"], plot_path)
            out["sizes_plot"] = str(plot_path)
    return out
