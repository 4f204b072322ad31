"""The contrastive scale benchmark (``diffin bench --setup scale-1m-pairs``): the on-disk pair
generator, the two-tower model with the batch-coupled InfoNCE loss, and the bench path on a few
hundred pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffin._errors import ConfigError
from diffin.bench import BenchConfig
from diffin.bench.builtin import train
from diffin.bench.builtin.captions import CLIP_LOSS, clip_loss
from diffin.bench.builtin.synthetic_pairs import (
    GRANULE,
    META_JSON,
    N_CLASSES,
    N_FEATURES,
    PAIRS_TRAIN,
    TRAIN_FILES,
    VAL_FILES,
    PairTowers,
    generate,
    load_split,
    memmap_pairs,
    pairs_model,
)
from diffin.bench.builtin.synthetic_pairs import test_pairs as held_out_pairs  # not collected as a test
from diffin.bench.pairs import (
    PAIRS_COLUMNS,
    auc_by_steps_before_end,
    detection_auc,
    removal_check,
    run_scale_pairs,
    step_of_samples,
    table_rows,
)
from diffin.recording.run import load_run

N = 2_000


def _read(folder: Path) -> dict[str, np.ndarray]:
    return {k: np.load(folder / f"{k}.npy") for k in (*TRAIN_FILES, *VAL_FILES)}


def test_generator_is_deterministic_prefix_stable_and_records_the_mismatched_pairs(tmp_path: Path) -> None:
    assert generate(tmp_path / "a", N, 300, seed=3, chunk_rows=GRANULE) is True  # 2 chunks, the last partial
    assert generate(tmp_path / "b", N, 300, seed=3, chunk_rows=10 * N) is True  # one chunk
    a, b = _read(tmp_path / "a"), _read(tmp_path / "b")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["xa_train"].shape == a["xb_train"].shape == (N, N_FEATURES) and a["xa_train"].dtype == np.float32
    assert a["y_train"].dtype == np.int64 and set(np.unique(a["y_train"])) <= set(range(N_CLASSES))
    assert a["xa_val"].shape == (300, N_FEATURES) and a["y_val"].shape == (300,)
    # the second view's class differs from the pair's class exactly where the pair is mismatched, ~10%
    np.testing.assert_array_equal(a["y_train"] != a["yb_train"], a["mismatched"])
    assert 0.07 < a["mismatched"].mean() < 0.13
    # a smaller set is the prefix of a larger one; another seed gives other rows
    generate(tmp_path / "c", 700, 300, seed=3)
    for k in TRAIN_FILES:
        np.testing.assert_array_equal(np.load(tmp_path / "c" / f"{k}.npy"), a[k][:700])
    generate(tmp_path / "d", N, 300, seed=4)
    assert not np.array_equal(np.load(tmp_path / "d" / "xa_train.npy"), a["xa_train"])
    # matched views share their latent point: they correlate across the two maps far more than mismatched ones
    # (measured as the fraction of pairs whose cross-view correlation of class means is explained; here simply
    # that the data carries the pairing, checked through a least-squares map from view a to view b)
    xa, xb, mis = a["xa_train"].astype(np.float64), a["xb_train"].astype(np.float64), a["mismatched"]
    w, *_ = np.linalg.lstsq(xa[~mis], xb[~mis], rcond=None)
    err = ((xa @ w - xb) ** 2).sum(1)
    assert err[mis].mean() > 1.2 * err[~mis].mean()


def test_generator_reuses_a_current_folder_and_regenerates_otherwise(tmp_path: Path) -> None:
    d = tmp_path / "data"
    assert generate(d, N, 300) is True
    before = (d / "xa_train.npy").stat().st_mtime_ns
    assert generate(d, N, 300) is False  # reused: not rewritten
    assert (d / "xa_train.npy").stat().st_mtime_ns == before
    meta = json.loads((d / META_JSON).read_text())
    assert meta["n_train"] == N and meta["seed"] == 0 and meta["mismatch"] == 0.1
    (d / META_JSON).write_text(json.dumps({**meta, "seed": 9}))  # another seed: regenerated
    assert generate(d, N, 300) is True
    assert json.loads((d / META_JSON).read_text()) == meta
    np.save(d / "mismatched.npy", np.zeros(5, dtype=bool))  # a damaged file: regenerated
    assert generate(d, N, 300) is True
    assert np.load(d / "mismatched.npy").shape == (N,)
    with pytest.raises(ConfigError):
        generate(d, 0, 300)


def test_split_reads_the_files_without_a_copy(tmp_path: Path) -> None:
    generate(tmp_path, N, 300)
    split = load_split(tmp_path, n_train=N, n_val=300)
    np.testing.assert_array_equal(split.x_train[0].numpy(), np.load(tmp_path / "xa_train.npy"))
    np.testing.assert_array_equal(split.x_train[1].numpy(), np.load(tmp_path / "xb_train.npy"))
    assert split.n_train == N and split.sizes() == {"train": N, "val": 300, "test": 0}
    np.testing.assert_array_equal(split.flipped, np.load(tmp_path / "mismatched.npy"))
    assert PAIRS_TRAIN.batch_size == 256 and PAIRS_TRAIN.epochs == 1 and PAIRS_TRAIN.checkpoint_every == 500


def test_setup_recipe_uses_the_one_clip_loss() -> None:
    from diffin.bench.builtin.setups import get_setup

    s = get_setup("scale-1m-pairs")
    assert s.name == "scale-1m-pairs" and s.loss_fn is CLIP_LOSS and s.train is PAIRS_TRAIN
    assert s.dtype == torch.float32 and s.noise == 0.0 and "1,000,000" in s.description


def test_towers_give_the_logits_clip_loss_takes() -> None:
    m = PairTowers().double()
    a, b = torch.randn(5, N_FEATURES, dtype=torch.float64), torch.randn(7, N_FEATURES, dtype=torch.float64)
    logits = m(a, b)
    ea, eb, scale = m(a, b, embed=True)
    assert logits.shape == (5, 7)
    torch.testing.assert_close(ea.norm(dim=1), torch.ones(5, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, scale * ea @ eb.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scale, torch.tensor(1 / 0.07, dtype=torch.float64), rtol=1e-6, atol=0)  # a float32 init
    sq = m(a, b[:5])
    loss = clip_loss(sq, None, torch.ones(5, dtype=torch.float64))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_trainer_reads_the_tuple_of_memmaps_as_it_reads_tensors(tmp_path: Path) -> None:
    generate(tmp_path / "d", 600, 300)
    x, y = memmap_pairs(tmp_path / "d")
    m1, m2 = pairs_model(), pairs_model()
    train(m1, x, y, PAIRS_TRAIN, tmp_path / "r1", loss=CLIP_LOSS)  # the memmaps, read by batch
    xt = tuple(torch.from_numpy(np.array(v)) for v in x)
    train(m2, xt, torch.from_numpy(np.array(y)), PAIRS_TRAIN, tmp_path / "r2", loss=CLIP_LOSS)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    assert not all(torch.equal(p, q) for p, q in zip(m1.parameters(), pairs_model().parameters(), strict=True))


def test_detection_auc_ranks_low_scores_as_mismatched() -> None:
    mis = np.array([True, False, False, True, False])
    assert detection_auc(mis, np.array([-2.0, 1.0, 0.5, -1.0, 3.0])) == 1.0
    assert detection_auc(mis, np.array([2.0, -1.0, -0.5, 1.0, -3.0])) == 0.0


def test_auc_by_steps_before_end_bins_pairs_by_their_distance_to_the_end() -> None:
    step = np.repeat(np.arange(600), 2)  # 600 steps of 2 pairs, one mismatched each
    mis = np.tile([True, False], 600)
    s = np.where(mis, -1.0, 1.0) * np.where(step >= 600 - 8, 1.0, -1.0)  # only the last 8 steps rank right
    bins = auc_by_steps_before_end(mis, s, step, 600)
    assert [(b["from"], b["to"], b["n"]) for b in bins] == [(0, 8, 16), (8, 32, 48), (32, 128, 192),
                                                             (128, 512, 768), (512, None, 176)]
    assert [b["auc"] for b in bins] == [1.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.slow
def test_pairs_bench_rows_detection_and_spot_check(tmp_path: Path) -> None:
    logs: list[str] = []
    r = run_scale_pairs(BenchConfig(), tmp_path, n_train=1_024, spot_n=600, device="cpu",
                        log=lambda *a: logs.append(" ".join(map(str, a))))
    assert r["setup"] == "scale-1m-pairs" and r["n_train"] == 1_024 and r["n_steps"] == 4 and r["device"] == "cpu"
    mis = np.load(Path(r["data_dir"]) / "mismatched.npy")
    assert r["n_mismatched"] == int(mis.sum()) > 0
    assert [row["method"] for row in r["results"]] == ["diffin", "tracin", "diffin-self", "clip-score"]
    for row in r["results"]:
        assert row["samples_per_second"] == pytest.approx(1_024 / row["seconds"], rel=1e-12)
        assert row["x_epoch"] == pytest.approx(row["seconds"] / r["train_seconds"], rel=1e-12)
        assert row["peak_rss_mb"] > 0 and 0.0 <= row["auc_mismatched"] <= 1.0
        bins = row["auc_mismatched_by_steps_before_end"]  # 4 steps: every pair within [0, 8) steps of the end
        assert [(b["from"], b["to"], b["n"]) for b in bins] == [(0, 8, 1_024)]
        assert bins[0]["auc"] == pytest.approx(row["auc_mismatched"], rel=1e-12)
        assert len(row["auc_mismatched_by_quarter"]) == 4
    assert r["results"][0]["variant"] == "diffin-exact" and isinstance(r["results"][0]["within_limits"], bool)
    own = r["results"][2]  # the horizon-0 self-influence (docs/method.md §4.11): high flags a pair
    saved = np.load(tmp_path / "scale-1m-pairs-diffin-self-scores.npy")
    assert own["auc_mismatched"] == pytest.approx(detection_auc(mis, saved), rel=1e-12)
    std = np.load(tmp_path / "scale-1m-pairs-diffin-self-standardized.npy")
    assert own["auc_mismatched_standardized"] == pytest.approx(detection_auc(mis, std), rel=1e-12)
    for t in range(4):  # standardised within each batch
        ids = load_run(tmp_path / "scale-1m-pairs").batch(t)
        assert abs(std[ids].mean()) < 1e-9 and std[ids].std() == pytest.approx(1.0, rel=1e-9)
    # the float64 spot check: 3 steps, where the exact sweep matches replayed removal closely
    sc = r["spot_check"]
    assert sc["dtype"] == "float64" and sc["n_removed"] == 20 and sc["n_train"] == 600 and sc["n_steps"] == 3
    assert sc["pearson"] > 0.99 and "pearson" in sc["tracin"]
    assert r["ground_truth"]["removed_ids"] == sc["removed_ids"]
    assert [len(row) for row in table_rows(r)] == [len(PAIRS_COLUMNS)] * 4
    step = step_of_samples(tmp_path / "scale-1m-pairs", 1_024)
    assert sorted(np.bincount(step).tolist()) == [256] * 4
    json.dumps(r)  # JSON-ready


@pytest.mark.slow
def test_removal_check_replays_mismatched_and_matched_pairs(tmp_path: Path) -> None:
    generate(tmp_path / "d", 800, 300)
    rc = removal_check(tmp_path / "d", 800, tmp_path, per_kind=3, log=lambda *a: None)
    assert rc["n_steps"] == 4 and len(rc["removed_ids"]) == 6 and sum(rc["mismatched"]) == 3
    assert rc["removed_ids"] == sorted(rc["removed_ids"]) and all(0 <= b < 4 for b in rc["steps_before_end"])
    mis = np.load(tmp_path / "d" / "mismatched.npy")
    assert [bool(mis[i]) for i in rc["removed_ids"]] == rc["mismatched"]
    assert rc["pearson"] > 0.99  # 4 float64 steps: the exact sweep matches replayed removal
    assert 0.0 <= rc["auc_actual_on_removed"] <= 1.0 and 0.0 <= rc["auc_diffin_all"] <= 1.0
    json.dumps(rc)


def test_held_out_pairs_are_clean_deterministic_and_not_the_validation_pairs(tmp_path: Path) -> None:
    (xa, xb), y = held_out_pairs(3000, seed=3)
    assert xa.shape == xb.shape == (3000, N_FEATURES) and xa.dtype == np.float32 and y.shape == (3000,)
    (xa2, _), y2 = held_out_pairs(3000, seed=3)
    np.testing.assert_array_equal(xa, xa2)
    np.testing.assert_array_equal(y, y2)
    generate(tmp_path / "g", N, 300, seed=3)
    (va, _), _ = memmap_pairs(tmp_path / "g", "val")
    assert not np.isclose(xa[:300], va).all(axis=1).any()
    # every pair matched: under a least-squares map from view a to view b fitted on half the matched training
    # pairs, their error is that of the other half, not that of the mismatched pairs
    t = _read(tmp_path / "g")
    mis = t["mismatched"]
    ta, tb = t["xa_train"].astype(np.float64), t["xb_train"].astype(np.float64)
    fit, held = np.flatnonzero(~mis)[::2], np.flatnonzero(~mis)[1::2]  # matched pairs, fitted / held out
    w, *_ = np.linalg.lstsq(ta[fit], tb[fit], rcond=None)
    err = {"test": ((xa.astype(np.float64) @ w - xb) ** 2).sum(1).mean(),
           "matched": ((ta[held] @ w - tb[held]) ** 2).sum(1).mean(),
           "mismatched": ((ta[mis] @ w - tb[mis]) ** 2).sum(1).mean()}
    assert abs(err["test"] - err["matched"]) < 0.25 * (err["mismatched"] - err["matched"]), err

