"""The scale benchmark (``diffin bench --setup scale-1m``): the on-disk generator and the bench
path, on a few hundred rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffin._errors import ConfigError
from diffin.bench import SCALE_COLUMNS, SIZES_COLUMNS, BenchConfig, run_scale, table_columns
from diffin.bench.builtin import train
from diffin.bench.builtin.setups import get_setup
from diffin.bench.builtin.synthetic_scale import (
    GRANULE,
    META_JSON,
    N_CLASSES,
    N_FEATURES,
    generate,
    load_split,
    scale_model,
)

N = 2_000
ARRAYS = ("x_train", "y_train", "flipped", "y_clean", "x_val", "y_val")


def _read(folder: Path) -> dict[str, np.ndarray]:
    return {k: np.load(folder / f"{k}.npy") for k in ARRAYS}


def test_generator_is_deterministic_and_independent_of_the_chunk_size(tmp_path: Path) -> None:
    assert generate(tmp_path / "a", N, 300, seed=3, chunk_rows=GRANULE) is True  # 2 chunks, the last partial
    assert generate(tmp_path / "b", N, 300, seed=3, chunk_rows=10 * N) is True  # one chunk
    a, b = _read(tmp_path / "a"), _read(tmp_path / "b")
    for k in ARRAYS:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["x_train"].shape == (N, N_FEATURES) and a["x_train"].dtype == np.float32
    assert a["y_train"].dtype == np.int64 and set(np.unique(a["y_train"])) <= set(range(N_CLASSES))
    assert a["x_val"].shape == (300, N_FEATURES)
    # flipped labels differ from the clean ones exactly where flipped, about 5% of them
    np.testing.assert_array_equal(a["y_train"] != a["y_clean"], a["flipped"])
    assert 0.02 < a["flipped"].mean() < 0.08
    # a smaller set is the prefix of a larger one; another seed gives other rows
    generate(tmp_path / "c", 700, 300, seed=3)
    np.testing.assert_array_equal(np.load(tmp_path / "c" / "x_train.npy"), a["x_train"][:700])
    generate(tmp_path / "d", N, 300, seed=4)
    assert not np.array_equal(np.load(tmp_path / "d" / "x_train.npy"), a["x_train"])


def test_generator_reuses_a_current_folder_and_regenerates_otherwise(tmp_path: Path) -> None:
    d = tmp_path / "data"
    assert generate(d, N, 300) is True
    before = (d / "x_train.npy").stat().st_mtime_ns
    assert generate(d, N, 300) is False  # reused: not rewritten
    assert (d / "x_train.npy").stat().st_mtime_ns == before
    meta = json.loads((d / META_JSON).read_text())
    assert meta["n_train"] == N and meta["seed"] == 0
    # the JSON says another seed: regenerated, and the JSON is current again
    (d / META_JSON).write_text(json.dumps({**meta, "seed": 9}))
    assert generate(d, N, 300) is True
    assert json.loads((d / META_JSON).read_text()) == meta
    # a damaged file of the wrong length: regenerated
    np.save(d / "y_train.npy", np.zeros(5, dtype=np.int64))
    assert generate(d, N, 300) is True
    assert np.load(d / "y_train.npy").shape == (N,)
    # another size: regenerated to that size
    assert generate(d, 500, 300) is True
    assert np.load(d / "x_train.npy").shape == (500, N_FEATURES)
    with pytest.raises(ConfigError):
        generate(d, 0, 300)


def test_setup_reads_the_files_without_a_copy(tmp_path: Path) -> None:
    generate(tmp_path, N, 300)
    split = load_split(tmp_path, n_train=N, n_val=300)
    x = np.load(tmp_path / "x_train.npy")
    np.testing.assert_array_equal(split.x_train.numpy(), x)
    assert split.n_train == N and split.flipped.sum() == int((split.y_train != split.y_train_clean).sum())
    s = get_setup("scale-1m")
    assert s.train.batch_size == 256 and s.train.checkpoint_every == 500 and s.train.epochs == 1
    assert s.dtype == torch.float32


def test_trainer_reads_memmap_rows_as_it_reads_tensors(tmp_path: Path) -> None:
    generate(tmp_path / "d", 600, 300)
    x = np.load(tmp_path / "d" / "x_train.npy", mmap_mode="r")
    y = np.load(tmp_path / "d" / "y_train.npy", mmap_mode="r")
    cfg = get_setup("scale-1m").train
    m1, m2 = scale_model(), scale_model()
    train(m1, x, y, cfg, tmp_path / "r1")  # the memmaps, read by batch
    train(m2, torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)), cfg, tmp_path / "r2")
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sizes_are_parsed_and_checked() -> None:
    assert BenchConfig(sizes="1e4, 1e5,10000").size_list() == [10_000, 100_000]
    assert BenchConfig().size_list() == []
    for bad in ("1e4,abc", "1.5", "1"):
        with pytest.raises(ConfigError, match="sizes"):
            BenchConfig(sizes=bad)
    with pytest.raises(ConfigError, match="closed_form_m"):
        BenchConfig(closed_form_m=0)


@pytest.mark.slow
def test_scale_path_rows_spot_check_and_sizes(tmp_path: Path) -> None:
    cfg = BenchConfig(methods="diffin,diffin-closed-form,tracin", closed_form_m=2)
    logs: list[str] = []
    r = run_scale(cfg, tmp_path, sizes=[300, 600], n_train=600, plot_path=tmp_path / "sizes.png",
                  processes=0, device="cpu", log=lambda *a: logs.append(" ".join(map(str, a))))
    assert r["setup"] == "scale-1m" and r["n_train"] == 600 and r["n_steps"] == 3 and r["device"] == "cpu"
    assert [row["method"] for row in r["results"]] == ["diffin", "diffin-closed-form", "tracin"]
    for row in r["results"]:
        assert row["processes"] == 1
        assert row["samples_per_second"] == pytest.approx(600 / row["seconds"], rel=1e-12)
        assert row["x_epoch"] == pytest.approx(row["seconds"] / r["train_seconds"], rel=1e-12)
        assert row["peak_rss_mb"] > 0
    cf = r["results"][1]
    assert cf["checkpoints_used"] == 2 and r["closed_form_checkpoints"] == 2
    # the spot check: float64, 20 replayed removals, diffin-exact matches replay on this tiny run
    sc = r["spot_check"]
    assert sc["dtype"] == "float64" and sc["n_removed"] == 20 and sc["n_train"] == 600
    assert sc["pearson"] > 0.99
    assert r["ground_truth"]["removed_ids"] == sc["removed_ids"]
    # the sizes table: one row per size, the last reusing the main diffin row
    assert [row["n_train"] for row in r["sizes"]] == [300, 600]
    assert r["sizes"][1]["seconds"] == r["results"][0]["seconds"]
    assert all(set(SIZES_COLUMNS) <= set(row) for row in r["sizes"])
    assert (tmp_path / "sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table_columns(r) == SCALE_COLUMNS
    json.dumps(r)  # JSON-ready
