"""Several processes on torch.distributed (gloo, CPU): the same scores as one process.

Each test starts 2 processes (``torch.multiprocessing.spawn``, or ``torchrun`` for the CLI) that
score the same tiny float64 run with ``diffin.score`` inside an initialised process group; the
batch of every step is split across them (``diffin._distributed.ShardedFlatModel``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diffin
from diffin._distributed import ShardedFlatModel, _bounds
from diffin.bench.builtin import get_setup, train

METHODS = ["diffin-exact", "diffin-frozen", "diffin-expected", "diffin-retrain", "diffin-closed-form", "tracin"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _setup_and_run(tmp: Path) -> Path:
    s = get_setup("tiny")
    d = s.data()
    run = tmp / "run"
    train(s.model(d), d.x_train, d.y_train, s.train, run, overwrite=True)
    return run


def _score(run: Path, method: str, **kw: object) -> diffin.ScoreResult:
    s = get_setup("tiny")
    d = s.data()
    return diffin.score(run, s.model(d), s.loss_fn, train=(d.x_train, d.y_train), target=(d.x_val, d.y_val),
                        method=method, progress=False, **kw)


def _worker(rank: int, size: int, port: int, run: str, out: str, methods: list[str], fail_rank: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size, timeout=timedelta(seconds=60))
    if rank == fail_rank:
        os._exit(3)  # this rank dies before its first collective
    try:
        for m in methods:
            r = _score(Path(run), m)
            np.save(Path(out) / f"{m}-rank{rank}.npy", r.scores)
            np.save(Path(out) / f"{m}-rank{rank}-split.npy", np.array(r.diagnostics.get("world_size", 1)))
    except Exception as e:  # noqa: BLE001 - the test reads what the surviving rank saw
        (Path(out) / f"error-rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        raise SystemExit(2) from None
    dist.destroy_process_group()


def test_bounds_cover_the_batch_once() -> None:
    for n in (0, 1, 5, 32, 33):
        for size in (1, 2, 3):
            rows = [i for r in range(size) for i in range(*_bounds(n, r, size))]
            assert rows == list(range(n))


def test_two_processes_give_the_scores_of_one(tmp_path: Path) -> None:
    run = _setup_and_run(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(run), str(out), METHODS, -1), nprocs=2, join=True)
    for m in METHODS:
        ref = _score(run, m).scores
        for rank in (0, 1):
            got = np.load(out / f"{m}-rank{rank}.npy")
            scale = np.abs(ref).max()
            assert scale > 0
            np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * scale, err_msg=f"{m} rank {rank}")
            assert int(np.load(out / f"{m}-rank{rank}-split.npy")) == 2, m


def test_the_wrapper_splits_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a fake 2-rank world the wrapper hands each rank its half of the batch and sums."""
    from diffin._functional import FlatModel

    s = get_setup("tiny")
    d = s.data()
    fm = FlatModel(s.model(d), s.loss_fn)
    theta = fm.theta_from_model()
    x, y = d.x_train[:7], d.y_train[:7]
    v = torch.randn(theta.numel(), dtype=theta.dtype)
    seen: list[int] = []
    inner_hvp = fm.hvp_and_dots

    def spy(th, xx, yy, vv, **kw):  # noqa: ANN001, ANN202
        seen.append(int(xx.shape[0]))
        return inner_hvp(th, xx, yy, vv, **kw)

    fm.hvp_and_dots = spy  # type: ignore[method-assign]
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr("diffin._distributed.world", lambda r=rank: (r, 2))
        sh = ShardedFlatModel(fm)
        monkeypatch.setattr(ShardedFlatModel, "_sum", staticmethod(lambda t: t))
        monkeypatch.setattr(ShardedFlatModel, "_gather_rows", lambda self, p, n: p)
        parts.append(sh.hvp_and_dots(theta, x, y, v, mode="exact"))
    assert seen == [4, 3]
    hv = parts[0][0] + parts[1][0]
    d_all = torch.cat([parts[0][1], parts[1][1]])
    want_hv, want_d = inner_hvp(theta, x, y, v, mode="exact")
    torch.testing.assert_close(hv, want_hv, rtol=1e-10, atol=1e-12 * float(want_hv.abs().max()))
    torch.testing.assert_close(d_all, want_d, rtol=1e-10, atol=1e-12 * float(want_d.abs().max()))


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_cli_writes_the_scores_of_one_process(tmp_path: Path) -> None:
    run = _setup_and_run(tmp_path)
    ref = _score(run, "diffin").scores
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "scores"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "diffin",
                        "score", str(run), "--setup", "tiny", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = np.load(out / "scores.npy")
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    meta = (out / "scores.json").read_text()
    assert '"world_size": 2' in meta
    assert p.stdout.count("scored") == 1  # rank 0 alone reports


def test_a_rank_that_dies_stops_the_others_with_a_named_error(tmp_path: Path) -> None:
    run = _setup_and_run(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    ctx = mp.spawn(_worker, args=(2, _free_port(), str(run), str(out), ["diffin-exact"], 1), nprocs=2, join=False)
    for p in ctx.processes:
        p.join(120)
    codes = [p.exitcode for p in ctx.processes]
    assert codes == [2, 3], codes
    err = (out / "error-rank0.txt").read_text()
    assert err.startswith("DistributedError") and "rank" in err, err
    assert not list(out.glob("*.npy"))  # nothing written as if complete
