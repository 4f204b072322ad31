"""diffin.embed on several processes (gloo, CPU): the ranks split the chunks of directions, and the
embedding is the one a single process builds, byte for byte, on disk and in memory; a batch-coupled
loss (which batch-split scoring refuses) included."""

from __future__ import annotations

import contextlib
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
from _tiny import record


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny_and_clip(tmp: Path, tag: str):
    from test_batch_loss import CLIP, record_clip

    t = record(tmp / f"tiny-{tag}")
    make, train, _ = record_clip(tmp / f"clip-{tag}")
    return t, (make, CLIP, train)


def _builds(tmp: Path, runs: tuple[Path, Path], tag: str, out: Path) -> dict[str, np.ndarray]:
    """The same three builds on one process and on each rank: gradients basis on disk (chunks of 5),
    Gaussian in memory, the exact embedding of the InfoNCE run on disk."""
    t, (make, clip, train) = _tiny_and_clip(tmp, tag)
    kw = dict(progress=False, chunk=5)
    a = diffin.embed(runs[0], t.make(), t.loss, train=(t.X, t.Y), dim=12, projection="gradients",
                     out=out / "tiny-gradients", **kw)
    b = diffin.embed(runs[0], t.make(), t.loss, train=(t.X, t.Y), dim=9, projection="gaussian", **kw)
    c = diffin.embed(runs[1], make(), clip, train=train, dim=10**9, out=out / "clip-exact", **kw)
    return {"gradients": np.asarray(a.values), "gaussian": np.asarray(b.values), "clip": np.asarray(c.values),
            "self": a.self_influence()}


def _worker(rank: int, size: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size, timeout=timedelta(seconds=120))
    root = Path(tmp)
    got = _builds(root, (root / "tiny-main", root / "clip-main"), f"rank{rank}", root / "multi")
    for name, v in got.items():
        np.save(root / f"{name}-rank{rank}.npy", v)
    dist.destroy_process_group()


@pytest.fixture
def one_thread():
    """This process computes with one torch thread, as every rank does, so that the reductions inside a
    product run in the same order and the embeddings can be compared byte for byte on any machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_processes_build_the_embedding_of_one(tmp_path: Path, one_thread) -> None:
    ref = _builds(tmp_path, (tmp_path / "tiny-main", tmp_path / "clip-main"), "main", tmp_path / "single")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        for name, v in ref.items():
            got = np.load(tmp_path / f"{name}-rank{rank}.npy")
            assert got.shape == v.shape and np.array_equal(got, v), (name, rank)
    # the folders hold finished embeddings (no work folder left), and the manifest has every chunk
    for name in ("tiny-gradients", "clip-exact"):
        folder = tmp_path / "multi" / name
        assert (folder / "embedding.npy").exists() and not (folder / ".embed").exists()
        spans = [c["directions"] for c in diffin.load_embedding(folder).manifest["chunks"]]
        k = np.load(folder / "embedding.npy").shape[1]
        assert spans == [[s, min(s + 5, k)] for s in range(0, k, 5)]


def test_a_killed_multi_process_build_resumes_from_its_gathered_columns(tmp_path: Path) -> None:
    """Columns a rank finished (``cols-NNNNNN.npy``) but rank 0 never gathered are taken on resume."""
    from diffin.embedding import _build

    t = record(tmp_path / "run")
    kw = dict(progress=False, chunk=5, dim=12, projection="gaussian")
    whole = diffin.embed(t.run, t.make(), t.loss, train=(t.X, t.Y), out=tmp_path / "whole", **kw)
    out = tmp_path / "killed"
    real = _build._write_progress

    def die(*a, **k):
        real(*a, **k)
        if a[3]:  # the first chunk is done: leave its columns as a rank of several would, and stop
            raise KeyboardInterrupt

    _build._write_progress = die
    try:
        with contextlib.suppress(KeyboardInterrupt):
            diffin.embed(t.run, t.make(), t.loss, train=(t.X, t.Y), out=out, **kw)
    finally:
        _build._write_progress = real
    work = out / ".embed"
    # move chunk 0 out of the partial file into a rank's column file, as a killed multi-process build leaves it
    import json

    prog = json.loads((work / "progress.json").read_text())
    assert prog["done"] == [0]
    part = np.load(work / "partial.npy")
    np.save(work / "cols-000000.npy", part[:, 0:5])
    part[:, 0:5] = 0
    np.save(work / "partial.npy", part)
    prog["done"] = []
    (work / "progress.json").write_text(json.dumps(prog))
    resumed = diffin.embed(t.run, t.make(), t.loss, train=(t.X, t.Y), out=out, resume=True, **kw)
    assert np.array_equal(np.asarray(resumed.values), np.asarray(whole.values))


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_cli_embed_equals_one_process(tmp_path: Path, one_thread) -> None:
    from diffin.bench.builtin import get_setup, train
    from diffin.cli import main

    s = get_setup("tiny")
    d = s.data()
    run = tmp_path / "run"
    train(s.model(d), d.x_train, d.y_train, s.train, run, overwrite=True)
    args = ["embed", str(run), "--setup", "tiny", "--dim", "8", "--chunk", "3", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    p = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "diffin",
                        *args, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("embedding ") == 1  # rank 0 alone reports
    one, two = (np.load(tmp_path / f / "embedding.npy") for f in ("one", "two"))
    assert one.shape == (d.n_train, 8) and np.array_equal(one, two)
