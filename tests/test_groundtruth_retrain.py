"""Ground truth by retraining (reshuffle / reseed), its noise ceiling, and the LDS bootstraps (float64)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import diffin
from _tiny import assert_close, difference_scale, make_model, record, record_loop
from diffin import metrics
from diffin._data import DataSource
from diffin._errors import ConfigError, DataMismatchError, ReinitError
from diffin._functional import FlatModel
from diffin.groundtruth import (
    fresh_order,
    fresh_theta0,
    lds_ground_truth,
    lds_subsets,
    retrain_truth,
    step_plan,
    truth_seeds,
)

MOM = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """22 samples, batch 6 (steps of 6, 6, 6, 4 per epoch), SGD with momentum and weight decay."""
    return record(tmp_path_factory.mktemp("gt") / "r", n=22, batch=6, epochs=3, opt_kw=MOM)


def _kw(t, masks, **kw):
    return dict(train=(t.X, t.Y), target=(t.Xv, t.Yv), masks=masks, progress=False, **kw)


def _reference(t, theta0: torch.Tensor, order: list[np.ndarray], kept: np.ndarray,
               make_opt) -> tuple[float, torch.Tensor]:
    """A plain torch loop: θ_0, the given batches, removed samples weighted 0 (divisor |B|), the
    optimizer ``make_opt(model)``; returns the mean validation loss at θ_T and θ_T."""
    model = t.make()
    torch.nn.utils.vector_to_parameters(theta0.clone(), model.parameters())
    opt = make_opt(model)
    for ids in order:
        w = torch.as_tensor(kept[ids], dtype=torch.float64) / len(ids)
        loss = (t.loss(model(t.X[ids]), t.Y[ids]) * w).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    with torch.no_grad():
        return float(t.loss(model(t.Xv), t.Yv).mean()), theta


def _scale(t, theta: torch.Tensor, value: float) -> float:
    """Rounding scale of f(θ') − f(θ) for separately trained θ's (see :func:`difference_scale`)."""
    run = diffin.load_run(t.run)
    fm = FlatModel(t.make(), t.loss, run.trainable)
    g = diffin.targets.MeanLoss(DataSource((t.Xv, t.Yv), torch.float64, torch.device("cpu"))).grads(fm, theta)
    return difference_scale(theta, g, value)


def _check_against_loop(t, mode: str, make_opt) -> None:
    run = diffin.load_run(t.run)
    N = len(t.X)
    kept = lds_subsets(N, 2, 0.5, seed=4)[0]
    masks = np.stack([kept, np.ones(N, dtype=bool)])  # a subset, and a removal of nothing
    truth = retrain_truth(t.run, t.make(), t.loss, mode=mode, n_seeds=1, seed=7, **_kw(t, masks))
    seed = int(truth_seeds(7, 1)[0])
    assert truth.seeds.tolist() == [seed]
    population, sizes = step_plan(run, N)
    order = fresh_order(population, sizes, seed)
    if mode == "reseed":
        theta0 = fresh_theta0(t.make(), run.trainable, seed)
    else:
        fm = FlatModel(t.make(), t.loss, run.trainable)
        theta0 = fm.flatten(run.load_checkpoint(0).params)
    f_full, th_full = _reference(t, theta0, order, np.ones(N, dtype=bool), make_opt)
    f_sub, _ = _reference(t, theta0, order, kept, make_opt)
    assert truth.values.shape == (2, 1) and truth.full.shape == (1,)
    assert_close(truth.full, [f_full])
    assert_close(truth.values[0, 0], f_sub - f_full, scale=_scale(t, th_full, f_full))
    assert abs(f_sub - f_full) > 1e-4  # the removal does something
    assert truth.values[1, 0] == 0.0  # common random numbers: removing nothing is exactly the full run


@pytest.mark.parametrize("mode", ["reshuffle", "reseed"])
def test_sgd_retraining_matches_a_plain_loop(tiny, mode):
    _check_against_loop(tiny, mode, lambda m: torch.optim.SGD(m.parameters(), **MOM))


@pytest.mark.parametrize("mode", ["reshuffle", "reseed"])
def test_adam_retraining_matches_a_plain_loop(tmp_path, mode):
    def make_opt(m):
        return torch.optim.Adam(m.parameters(), lr=0.02, weight_decay=1e-3)

    t = record_loop(tmp_path / "a", make_opt, n=20, batch=6, epochs=2)  # steps of 6, 6, 6, 2
    _check_against_loop(t, mode, make_opt)


def test_common_random_numbers_and_width(tiny):
    """An empty removal gives exactly 0 for every seed; all 12 runs side by side, or 3 at a time
    (groups that straddle seeds), give the same values."""
    N = len(tiny.X)
    masks = np.concatenate([np.ones((1, N), dtype=bool), lds_subsets(N, 2, 0.5, seed=2)])
    # one run here: 51 parameters × 8 bytes × (θ, θ', g, momentum) + 2 gathered batches of 6 rows × 40 bytes
    three_runs_mb = 3.5 * (51 * 8 * 4 + 2 * 6 * 40) / 2**20
    for mode in ("reshuffle", "reseed"):
        wide = retrain_truth(tiny.run, tiny.make(), tiny.loss, mode=mode, n_seeds=3, **_kw(tiny, masks))
        narrow = retrain_truth(tiny.run, tiny.make(), tiny.loss, mode=mode, n_seeds=3, memory_mb=three_runs_mb,
                               **_kw(tiny, masks))
        assert wide.values.shape == (3, 3) and wide.full.shape == (3,)
        np.testing.assert_array_equal(wide.values[0], np.zeros(3))
        assert np.all(wide.values[1:] != 0)
        assert len(set(wide.full.tolist())) == 3  # each seed trains differently
        assert_close(narrow.values, wide.values, scale=float(np.abs(wide.full).max()))
        assert_close(narrow.full, wide.full)
        np.testing.assert_array_equal(wide.mean(), wide.values.mean(axis=1))


def test_replay_mode_equals_lds_ground_truth(tiny):
    masks = lds_subsets(len(tiny.X), 4, 0.5, seed=5)
    truth = retrain_truth(tiny.run, tiny.make(), tiny.loss, mode="replay", n_seeds=7, **_kw(tiny, masks))
    expected = lds_ground_truth(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv),
                                masks=masks, progress=False)
    assert truth.values.shape == (4, 1) and truth.seeds.tolist() == [-1]
    np.testing.assert_array_equal(truth.mean(), expected)
    assert math.isnan(truth.noise_ceiling())


def test_pairwise_values_average_to_the_mean_target(tiny):
    masks = lds_subsets(len(tiny.X), 3, 0.5, seed=6)
    mean = retrain_truth(tiny.run, tiny.make(), tiny.loss, mode="reseed", n_seeds=2, **_kw(tiny, masks))
    pair = retrain_truth(tiny.run, tiny.make(), tiny.loss, mode="reseed", n_seeds=2, pairwise=True,
                         **_kw(tiny, masks))
    assert pair.values.shape == (3, 2, len(tiny.Xv)) and pair.full.shape == (2, len(tiny.Xv))
    assert_close(pair.full.mean(axis=-1), mean.full)
    assert_close(pair.values.mean(axis=-1), mean.values, scale=float(np.abs(mean.full).max()))


def test_fresh_order_is_a_permutation_per_epoch(tiny):
    run = diffin.load_run(tiny.run)
    population, sizes = step_plan(run, len(tiny.X))
    np.testing.assert_array_equal(population, np.arange(22))
    assert sizes == [6, 6, 6, 4] * 3
    a, b = fresh_order(population, sizes, 1), fresh_order(population, sizes, 2)
    for order in (a, b):
        for e in range(3):
            np.testing.assert_array_equal(np.sort(np.concatenate(order[4 * e : 4 * e + 4])), population)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))
    assert all(np.array_equal(x, y) for x, y in zip(a, fresh_order(population, sizes, 1)))
    # drop_last: 3 full batches of 6 per epoch, the 4 left over are dropped and a new epoch starts
    c = fresh_order(population, [6] * 9, 3)
    for e in range(3):
        ids = np.concatenate(c[3 * e : 3 * e + 3])
        assert len(np.unique(ids)) == 18


def test_fresh_order_draws_from_the_recorded_ids_only(tmp_path):
    t = record(tmp_path / "r", n=20, batch=5, epochs=1)
    run = diffin.load_run(t.run)
    population, _ = step_plan(run, 25)  # 5 rows of the training set were in no batch
    np.testing.assert_array_equal(population, np.arange(20))


def test_reseed_theta0_fresh_and_reproducible(tiny):
    run = diffin.load_run(tiny.run)
    fm = FlatModel(tiny.make(), tiny.loss, run.trainable)
    recorded = fm.flatten(run.load_checkpoint(0).params)
    rng_before = torch.random.get_rng_state()
    a, b = fresh_theta0(tiny.make(), run.trainable, 11), fresh_theta0(tiny.make(), run.trainable, 12)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is left alone
    assert a.shape == recorded.shape and a.dtype == torch.float64
    assert not torch.equal(a, recorded) and not torch.equal(a, b)
    assert torch.equal(a, fresh_theta0(tiny.make(), run.trainable, 11))
    # an init callable gets the seed (and float32 models are cast to the run's dtype)
    def init(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    c = fresh_theta0(tiny.make(), run.trainable, 11, init=init)
    assert c.dtype == torch.float64 and torch.equal(c, fresh_theta0(tiny.make(), run.trainable, 11, init=init))
    assert not torch.equal(c, fresh_theta0(tiny.make(), run.trainable, 12, init=init))


def test_run_without_batch_ids_needs_a_batch_size(tmp_path):
    t = record(tmp_path / "r", n=18, batch=6, epochs=2, ids=False)
    masks = np.stack([np.ones(18, dtype=bool), lds_subsets(18, 2, 0.5, seed=0)[0]])
    with pytest.raises(DataMismatchError, match="batch_size="):
        retrain_truth(t.run, t.make(), t.loss, mode="reshuffle", n_seeds=2, **_kw(t, masks))
    with pytest.raises(DataMismatchError, match="batch ids"):
        retrain_truth(t.run, t.make(), t.loss, mode="replay", **_kw(t, masks))
    truth = retrain_truth(t.run, t.make(), t.loss, mode="reshuffle", n_seeds=2, batch_size=6, **_kw(t, masks))
    np.testing.assert_array_equal(truth.values[0], np.zeros(2))
    assert np.all(truth.values[1] != 0)


class _Scale(nn.Module):
    """A trainable parameter no ``reset_parameters`` covers."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


def test_errors(tiny, tmp_path):
    masks = lds_subsets(len(tiny.X), 2, 0.5, seed=0)
    kw = _kw(tiny, masks)
    with pytest.raises(ConfigError, match="mode must be one of"):
        retrain_truth(tiny.run, tiny.make(), tiny.loss, mode="retrain", **kw)
    with pytest.raises(ConfigError, match="only mode='reseed'"):
        retrain_truth(tiny.run, tiny.make(), tiny.loss, mode="reshuffle", init=lambda s: tiny.make(), **kw)
    with pytest.raises(ConfigError, match="masks must be"):
        retrain_truth(tiny.run, tiny.make(), tiny.loss, mode="reseed", **_kw(tiny, masks[:, :5]))
    with pytest.raises(ReinitError, match="same architecture"):
        retrain_truth(tiny.run, tiny.make(), tiny.loss, mode="reseed", n_seeds=1,
                      init=lambda s: make_model("mlp", 5, 3), **kw)
    # a trainable parameter without reset_parameters: a named error that says to pass init=
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), _Scale()).double()
    X, Y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with diffin.Recorder(tmp_path / "s", model, optimizer=opt, checkpoint_every=2, n_train=12) as rec:
        for s in range(0, 12, 4):
            ids = torch.arange(s, s + 4)
            opt.zero_grad()
            tiny.loss(model(X[ids]), Y[ids]).mean().backward()
            opt.step()
            rec.step(ids)
    m2 = lds_subsets(12, 2, 0.5, seed=0)
    args = dict(train=(X, Y), target=(X[:4], Y[:4]), masks=m2, progress=False, n_seeds=1)
    with pytest.raises(ReinitError, match=r"\['1.s'\].*init="):
        retrain_truth(tmp_path / "s", model, tiny.loss, mode="reseed", **args)

    def init(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 3), _Scale()).double()

    truth = retrain_truth(tmp_path / "s", model, tiny.loss, mode="reseed", init=init, **args)
    assert truth.values.shape == (2, 1) and np.all(np.isfinite(truth.values))


def test_noise_ceiling_near_theoretical_reliability():
    """values = signal_s + noise_sk: the split-half estimate is near the reliability of the
    K-seed mean. For Gaussian signal and noise the Pearson correlation of two half means is
    ρ_h = σs²/(σs² + σn²/(K/2)), their Spearman (6/π)·asin(ρ_h/2), then Spearman–Brown."""
    from diffin.groundtruth import RetrainTruth

    rng = np.random.default_rng(0)
    S, K, sn = 4000, 10, 2.0
    signal = rng.normal(size=S)
    values = signal[:, None] + sn * rng.normal(size=(S, K))
    truth = RetrainTruth("reseed", np.ones((S, 3), bool), values, np.zeros(K), np.arange(K))
    rho_h = 1 / (1 + sn**2 / (K / 2))
    r = 6 / math.pi * math.asin(rho_h / 2)
    expected = 2 * r / (1 + r)
    # each split's Spearman over S = 4000 subsets has a standard error of about (1 − r²)/√S ≈ 0.012
    assert truth.noise_ceiling(n_splits=20) == pytest.approx(expected, abs=0.03)
    noisier = RetrainTruth("reseed", truth.masks, signal[:, None] + 4.0 * rng.normal(size=(S, K)), truth.full,
                           truth.seeds)
    assert noisier.noise_ceiling(n_splits=20) < truth.noise_ceiling(n_splits=20) - 0.1
    # (S, K, Q): per column, averaged
    three = RetrainTruth("reseed", truth.masks, np.stack([values, values], axis=2), np.zeros((K, 2)), truth.seeds)
    assert three.noise_ceiling(n_splits=20) == pytest.approx(truth.noise_ceiling(n_splits=20), rel=1e-12)
    one = RetrainTruth("reseed", truth.masks, values[:, :1], np.zeros(1), truth.seeds[:1])
    assert math.isnan(one.noise_ceiling())


def _synthetic_lds(S: int, seed: int, N: int = 60):
    """Subsets of N samples, an additive truth plus noise, a good and a worse score vector."""
    rng = np.random.default_rng(seed)
    true = np.random.default_rng(99).normal(size=N)
    masks = rng.random((S, N)) < 0.5
    actual = (~masks) @ true + 2.0 * rng.normal(size=S)
    worse = true + 1.5 * np.random.default_rng(98).normal(size=N)
    return masks, actual, true, worse


def test_bootstrap_interval_covers_the_difference_and_shrinks():
    masks, actual, good, worse = _synthetic_lds(200, 1)
    d = metrics.lds_bootstrap_diff(masks, actual, good, worse, n_boot=1000)
    assert d["diff"] == pytest.approx(metrics.lds(masks, actual, good) - metrics.lds(masks, actual, worse), rel=1e-12)
    assert d["low"] < d["diff"] < d["high"]
    # the population difference, from many more subsets, lies inside the 95% interval
    big = _synthetic_lds(20000, 2)
    pop = metrics.lds(big[0], big[1], good) - metrics.lds(big[0], big[1], worse)
    assert pop > 0 and d["low"] <= pop <= d["high"]
    d4 = metrics.lds_bootstrap_diff(*_synthetic_lds(800, 3)[:2], good, worse, n_boot=1000)
    assert d4["high"] - d4["low"] < 0.7 * (d["high"] - d["low"])  # width ∝ 1/√S: about half
    iv = metrics.lds_interval(masks, actual, good, n_boot=1000)
    assert iv["lds"] == metrics.lds(masks, actual, good) and iv["low"] < iv["lds"] < iv["high"]
    # the same scores: a difference of exactly 0 in every resample
    same = metrics.lds_bootstrap_diff(masks, actual, good, good, n_boot=200)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(ConfigError):
        metrics.lds_interval(masks, actual, good, level=1.5)
    with pytest.raises(ConfigError):
        metrics.lds_bootstrap_diff(masks, actual, good, good[:5])


def test_bench_config_truth():
    from diffin.bench import BenchConfig

    assert BenchConfig().n_lds_subsets() == 50
    assert BenchConfig(truth="replay,reseed").n_lds_subsets() == 200
    assert BenchConfig(truth="reseed", lds_subsets=20).n_lds_subsets() == 20
    assert BenchConfig(truth="reseed,replay").truth_modes() == ["replay", "reseed"]
    with pytest.raises(ConfigError, match="truth must be"):
        BenchConfig(truth="replay,retrain")
    with pytest.raises(ConfigError):
        BenchConfig(truth_seeds=0)


def test_bench_smoke_reseed(tmp_path, capsys):
    from diffin.cli import main

    out = tmp_path / "b.json"
    code = main(["bench", "--setup", "tiny", "--json", str(out), "--methods", "diffin,tracin", "--n-removed", "6",
                 "--lds-subsets", "6", "--truth", "replay,reseed", "--truth-seeds", "3", "--quiet",
                 "--workdir", str(tmp_path / "w")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "lds_reseed" in printed and "noise ceiling" in printed
    doc = json.loads(out.read_text())
    assert set(doc["truth"]) == {"replay", "reseed"}
    rs = doc["truth"]["reseed"]
    assert rs["n_subsets"] == 6 and rs["n_seeds"] == 3 and -1 <= rs["noise_ceiling"] <= 1 and rs["seconds"] > 0
    diffin_row, tracin_row = doc["results"]
    for row in (diffin_row, tracin_row):
        assert row["lds"] == row["lds_replay"]
        for mode in ("replay", "reseed"):
            low, high = row[f"lds_{mode}_ci"]
            assert -1 <= low <= row[f"lds_{mode}"] <= high <= 1
    vs = diffin_row["lds_reseed_vs_tracin"]
    assert vs["diff"] == pytest.approx(diffin_row["lds_reseed"] - tracin_row["lds_reseed"], abs=1e-12)
    assert vs["low"] <= vs["diff"] <= vs["high"]
    assert "lds_reseed_vs_tracin" not in tracin_row
