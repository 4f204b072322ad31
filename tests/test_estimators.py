"""Estimators against exact references in float64 on tiny models (docs/method.md §3–5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import diffin
from _tiny import assert_close, difference_scale, record
from diffin import _reference as ref
from diffin._data import DataSource
from diffin._errors import UnsupportedOptimizerWarning
from diffin._functional import FlatModel
from diffin.groundtruth import replay_removal
from diffin.targets import MeanLoss, Target

OPTS = {
    "sgd": {"lr": 0.1},
    "momentum-wd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2},
    "nesterov-damp": {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 1e-3},
    "dampening": {"lr": 0.05, "momentum": 0.7, "dampening": 0.3},
}


def _fm(tiny):
    run = diffin.load_run(tiny.run)
    fm = FlatModel(tiny.make(), tiny.loss, run.trainable)
    train = DataSource((tiny.X, tiny.Y), torch.float64, torch.device("cpu"))
    return run, fm, train


def _target_grad(fm, tiny, theta):
    return MeanLoss(DataSource((tiny.Xv, tiny.Yv), torch.float64, torch.device("cpu"))).grads(
        fm, theta)[0]


# ------------------------------------------------------------------ the sweep is the recursion
@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sweep_equals_forward_recursion(tmp_path, opt, kind):
    tiny = record(tmp_path / "r", kind=kind, opt_kw=OPTS[opt], n=18, epochs=2, every=4)
    run, fm, train = _fm(tiny)
    thetas = ref.sgd_trajectory(run, tiny.make(), tiny.loss, train)
    # our replay lands on torch.optim.SGD's trajectory
    assert_close(thetas[-1], fm.flatten(run.load_checkpoint(run.n_steps).params))
    g = _target_grad(fm, tiny, thetas[-1])
    sweep = tiny.score("diffin-exact", hvp="exact").scores
    zs = [0, 5, 11, 17]
    assert_close(sweep[zs], [ref.forward_recursion(run, fm, train, thetas, g, z) for z in zs])


def test_frozen_sweep_equals_recursion_at_checkpoints(tmp_path):
    tiny = record(tmp_path / "r", opt_kw=OPTS["momentum-wd"], n=18, epochs=2, every=4)
    run, fm, train = _fm(tiny)
    frozen = []
    for c0, c1 in run.segments:
        th = fm.flatten(run.load_checkpoint(c0).params)
        frozen += [th] * (c1 - c0)
    frozen.append(fm.flatten(run.load_checkpoint(run.n_steps).params))
    g = _target_grad(fm, tiny, frozen[-1])
    got = tiny.score("diffin-frozen", hvp="exact").scores
    zs = [1, 9, 14]
    assert_close(got[zs], [ref.forward_recursion(run, fm, train, frozen, g, z) for z in zs])


@pytest.mark.parametrize("batch", [6, 5])  # 5: last batch of each epoch is smaller
def test_renormalize_convention_equals_recursion(tmp_path, batch):
    tiny = record(tmp_path / "r", n=16, batch=batch, epochs=2, every=3)
    run, fm, train = _fm(tiny)
    thetas = ref.sgd_trajectory(run, tiny.make(), tiny.loss, train)
    g = _target_grad(fm, tiny, thetas[-1])
    got = tiny.score("diffin-exact", hvp="exact", convention="renormalize").scores
    zs = [0, 7, 15]
    assert_close(got[zs], [ref.forward_recursion(run, fm, train, thetas, g, z, "renormalize") for z in zs])


@pytest.mark.parametrize("convention", ["keep", "renormalize"])
def test_group_removal_in_one_sweep_equals_group_recursion(tmp_path, convention):
    tiny = record(tmp_path / "r", n=16, batch=4, epochs=2, every=3, opt_kw=OPTS["momentum-wd"])
    run, fm, train = _fm(tiny)
    thetas = ref.sgd_trajectory(run, tiny.make(), tiny.loss, train)
    g = _target_grad(fm, tiny, thetas[-1])
    groups = [[0, 1, 2], [5], list(range(6, 14)), [3, 3, 15]]
    r = tiny.score("diffin-exact", hvp="exact", convention=convention, groups=groups)
    want = [ref.forward_recursion(run, fm, train, thetas, g, np.array(grp), convention) for grp in groups]
    assert_close(r.group_scores, want)
    if convention == "keep":  # additive: the group effect is the sum of its members' scores
        assert_close(r.group_scores, [r.scores[np.unique(grp)].sum() for grp in groups])


def test_finite_difference_sweep_close_to_exact(tmp_path):
    tiny = record(tmp_path / "r", opt_kw=OPTS["momentum-wd"])
    exact = tiny.score("diffin-exact", hvp="exact").scores
    assert_close(tiny.score("diffin-exact", hvp="central").scores, exact, computation="fd")
    # forward differences: truncation O(step) with a step of about √ε relative
    err = np.sqrt(np.finfo(np.float64).eps)
    assert_close(tiny.score("diffin-exact", hvp="forward").scores, exact, rtol=1e4 * err, floor=1e3 * err)


# ------------------------------------------------------------------ exactness on least squares
class _Linear(Target):
    """f(θ) = ⟨c, θ⟩: the linearisation is exact for it."""

    kind = "mean"
    size = 1

    def __init__(self, c):
        self.c = c

    def grads(self, fm, theta):
        return self.c[None]

    def values(self, fm, theta):
        return (self.c @ theta).reshape(1)


@pytest.mark.parametrize("opt", ["sgd", "momentum-wd", "nesterov-damp"])
def test_least_squares_sweep_equals_replayed_removal(tmp_path, opt):
    """Linear model, squared loss, one epoch: θ_T is affine in each sample's weight, so the sweep
    is exact for a linear target; for the validation MSE the only gap is ½ΔᵀH_fΔ."""
    tiny = record(tmp_path / "r", kind="linear", regression=True, n=20, batch=5, epochs=1, every=2,
                  opt_kw=OPTS[opt])
    run, fm, train = _fm(tiny)
    c = torch.randn(fm.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ids = list(range(20))
    gt, theta_T, thetas = replay_removal(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y),
                                         target=_Linear(c), remove=ids, progress=False,
                                         return_thetas=True)
    got = tiny.score("diffin-exact", hvp="exact", target=_Linear(c)).scores
    assert_close(got, gt, scale=difference_scale(theta_T, c, c @ theta_T))
    # validation mean squared loss: f(θ+Δ) − f(θ) = ⟨∇f, Δ⟩ + ½ΔᵀH_fΔ exactly (f quadratic)
    val = tiny.score("diffin-exact", hvp="exact").scores
    real = replay_removal(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y),
                          target=(tiny.Xv, tiny.Yv), remove=ids, progress=False)
    Hf = ref.dense_hessian(fm, theta_T, tiny.Xv, tiny.Yv)
    delta = thetas - theta_T
    quad = 0.5 * torch.einsum("kp,pq,kq->k", delta, Hf, delta).numpy()
    f_T = float(fm.losses(theta_T, tiny.Xv, tiny.Yv).mean())
    assert_close(val + quad, real, scale=difference_scale(theta_T, _target_grad(fm, tiny, theta_T), f_T))


# ------------------------------------------------------------------ closed form and TracIn
@pytest.mark.parametrize("mode", ["exact", "central"])
def test_closed_form_equals_naive(tmp_path, mode):
    tiny = record(tmp_path / "r", n=14, epochs=2, every=3)
    run, fm, train = _fm(tiny)
    want = ref.closed_form(run, fm, train, lambda th: _target_grad(fm, tiny, th), batch=6,
                           n_batches=2, seed=4)
    got = tiny.score("diffin-closed-form", hvp=mode, proxy_batches=2, seed=4).scores
    assert_close(got, want, computation="exact" if mode == "exact" else "fd")


def test_closed_form_first_order_adds_tracin(tmp_path):
    tiny = record(tmp_path / "r", n=14, epochs=2, every=3)
    base = tiny.score("diffin-closed-form", hvp="exact").scores
    both = tiny.score("diffin-closed-form", hvp="exact", first_order=True).scores
    tr = tiny.score("tracin").scores
    assert_close(both - base, tr)


def test_tracin_equals_naive(tmp_path):
    tiny = record(tmp_path / "r", n=14, epochs=2, every=3)
    run, fm, train = _fm(tiny)
    want = ref.tracin_cp(run, fm, train, lambda th: _target_grad(fm, tiny, th))
    assert_close(tiny.score("tracin").scores, want)


def test_tracin_every_step_equals_naive(tmp_path):
    tiny = record(tmp_path / "r", n=14, epochs=2, every=3)
    run, fm, train = _fm(tiny)
    thetas = ref.sgd_trajectory(run, tiny.make(), tiny.loss, train)
    want = np.zeros(14)
    for t in range(run.n_steps):
        ids = run.batch(t)
        G = ref.loop_grads(fm, thetas[t], *train.get(ids))
        g = _target_grad(fm, tiny, thetas[t])
        np.add.at(want, ids, float(run.lrs[t]) / len(ids) * (G @ g).numpy())
    assert_close(tiny.score("tracin-every-step").scores, want)


def test_expected_equals_frozen_for_full_batch_training(tmp_path):
    """With full-batch training every sample is in every batch (|B|/N = 1), so the expected
    credit is the actual one and proxy batches of size N are the real batches."""
    tiny = record(tmp_path / "r", n=12, batch=12, epochs=6, every=2, opt_kw=OPTS["momentum-wd"])
    frozen = tiny.score("diffin-frozen", hvp="exact").scores
    expected = tiny.score("diffin-expected", hvp="exact", proxy_batch_size=12).scores
    assert_close(expected, frozen)


def _two_sample_toy(tmp_path, steps: int):
    """1-D least squares y = θx, two samples in one batch, plain SGD."""
    x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([[3.0], [-1.0]], dtype=torch.float64)
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.5)
    eta = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    rec = diffin.Recorder(tmp_path / "toy", model, optimizer=opt, checkpoint_every=1)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (model(x) - y) ** 2).sum(1).mean().backward()
        opt.step()
        rec.step([0, 1], lr=eta)
    rec.close()
    return x, y, eta


def test_self_influence_two_sample_toy_by_hand(tmp_path):
    x, y, eta = _two_sample_toy(tmp_path, steps=2)
    loss = lambda o, t: 0.5 * ((o - t) ** 2).sum(1)  # noqa: E731
    x1, x2 = 1.0, 2.0
    y1, y2 = 3.0, -1.0
    th0 = 0.5
    th1 = th0 - eta / 2 * (x1 * (th0 * x1 - y1) + x2 * (th0 * x2 - y2))
    th2 = th1 - eta / 2 * (x1 * (th1 * x1 - y1) + x2 * (th1 * x2 - y2))
    H = (x1**2 + x2**2) / 2
    want = []
    for xi, yi in ((x1, y1), (x2, y2)):
        u2 = (th2 * xi - yi) * xi  # ∇ of its own loss at θ_T
        u1 = u2 * (1 - eta * H)
        want.append(eta / 2 * (u2 * (th1 * xi - yi) * xi + u1 * (th0 * xi - yi) * xi))
    model = nn.Linear(1, 1, bias=False).double()
    got = diffin.influence(tmp_path / "toy", model, loss, train=(x, y), target="self",
                           method="diffin-exact", hvp="exact", progress=False)
    assert_close(got, want)
    # sign and size against replayed removal of each sample from its own loss
    real = replay_removal(tmp_path / "toy", model, loss, train=(x, y), target="self", remove=[0, 1],
                          progress=False)
    assert np.all(np.sign(real) == np.sign(got))
    np.testing.assert_allclose(got, real, rtol=0.3)  # linearisation of a large removal


# ------------------------------------------------------------------ choosing a variant
def test_diffin_picks_exact_with_ids_and_expected_without(tmp_path):
    with_ids = record(tmp_path / "a")
    r = with_ids.score("diffin")
    assert r.variant == "diffin-exact"
    np.testing.assert_array_equal(r.scores, with_ids.score("diffin-exact").scores)
    without = record(tmp_path / "b", ids=False)
    assert without.score("diffin").variant == "diffin-expected"
    with pytest.raises(diffin.UnsupportedMethodError, match="batch ids"):
        without.score("diffin-exact")
    with pytest.raises(diffin.UnsupportedMethodError, match="batch ids"):
        without.score("tracin-every-step")


def test_diffin_tracks_replayed_removal_better_than_tracin(tmp_path):
    tiny = record(tmp_path / "r", n=30, epochs=3, every=5, opt_kw={"lr": 0.2})
    real = replay_removal(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y),
                          target=(tiny.Xv, tiny.Yv), remove=list(range(30)), progress=False)
    d = np.corrcoef(tiny.score("diffin").scores, real)[0, 1]
    t = np.corrcoef(tiny.score("tracin").scores, real)[0, 1]
    assert d > 0.99 and d > t


# ------------------------------------------------------------------ errors
def test_error_paths(tmp_path):
    tiny = record(tmp_path / "r")
    with pytest.raises(diffin.UnknownMethodError, match="available"):
        tiny.score("nope")
    with pytest.raises(diffin.DataMismatchError, match="samples"):
        diffin.influence(tiny.run, tiny.make(), tiny.loss, train=(tiny.X[:10], tiny.Y[:10]),
                         target=(tiny.Xv, tiny.Yv), progress=False)
    with pytest.raises(diffin.DataMismatchError, match="target"):
        diffin.influence(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y), target=None)
    with pytest.raises(diffin.ConfigError, match="unknown option"):
        tiny.score("tracin", hvp_mode="exact")
    with pytest.raises(diffin.ConfigError, match="hvp"):
        tiny.score("tracin", hvp="second")
    with pytest.raises(diffin.DiffinError, match="reduction='none'"):
        diffin.influence(tiny.run, tiny.make(), lambda o, y: nn.functional.cross_entropy(o, y),
                         train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv), progress=False)


def _record_in_order(path, model, opt, X, Y, batch):
    """One epoch of cross-entropy training over X in order, recorded with a checkpoint every 2 steps."""
    with diffin.Recorder(path, model, optimizer=opt, checkpoint_every=2) as rec:
        for s in range(0, len(X), batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[s : s + batch]), Y[s : s + batch]).backward()
            opt.step()
            rec.step(list(range(s, s + batch)))


def test_optimizers_without_a_rule_refuse_the_sweep_by_name_but_allow_tracin(tmp_path):
    X = torch.randn(12, 4, dtype=torch.float64)
    Y = torch.randint(0, 3, (12,))
    model = nn.Linear(4, 3).double()
    opt = torch.optim.Adagrad(model.parameters(), lr=1e-2)
    with pytest.warns(UnsupportedOptimizerWarning, match="Adagrad"):
        _record_in_order(tmp_path / "adagrad", model, opt, X, Y, batch=4)
    loss = lambda o, y: nn.functional.cross_entropy(o, y, reduction="none")  # noqa: E731
    kw = dict(train=(X, Y), target=(X, Y), progress=False)
    for method in ("diffin", "diffin-exact", "diffin-frozen", "diffin-expected", "tracin-every-step"):
        with pytest.raises(diffin.UnsupportedMethodError, match=r"Adagrad.*'tracin'"):
            diffin.influence(tmp_path / "adagrad", model, loss, method=method, **kw)
    with pytest.raises(diffin.UnsupportedMethodError, match="closed form for SGD"):
        diffin.influence(tmp_path / "adagrad", model, loss, method="diffin-closed-form", **kw)
    s = diffin.influence(tmp_path / "adagrad", model, loss, method="tracin", **kw)
    assert s.shape == (12,) and np.all(np.isfinite(s))


def test_scores_ignore_the_model_objects_current_values(tmp_path):
    tiny = record(tmp_path / "r")
    a = tiny.score("diffin").scores
    m = tiny.make()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    b = diffin.influence(tiny.run, m, tiny.loss, train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv),
                         progress=False)
    np.testing.assert_array_equal(a, b)


def test_dataset_input_equals_tensor_input(tmp_path):
    tiny = record(tmp_path / "r")
    ds = torch.utils.data.TensorDataset(tiny.X, tiny.Y)
    a = tiny.score("diffin").scores
    b = diffin.influence(tiny.run, tiny.make(), tiny.loss, train=ds, target=(tiny.Xv, tiny.Yv),
                         progress=False)
    assert_close(b, a)
    c = diffin.influence(tiny.run, tiny.make(), tiny.loss, train=(tiny.X.numpy(), tiny.Y.numpy()),
                         target=(tiny.Xv, tiny.Yv), progress=False)
    assert_close(c, a)


def test_float64_scoring_of_a_float32_run(tmp_path):
    tiny = record(tmp_path / "r", dtype=torch.float32)
    m64 = tiny.make().double()
    s = diffin.influence(tiny.run, m64, tiny.loss, train=(tiny.X.double(), tiny.Y),
                         target=(tiny.Xv.double(), tiny.Yv), progress=False)
    assert s.dtype == np.float64
    s32 = tiny.score("diffin").scores
    assert np.corrcoef(s, s32)[0, 1] > 0.999


def test_auto_hvp_picks_exact_products_for_kinked_models(tmp_path):
    """Central differences jump across ReLU kinks; `auto` then uses autograd HVPs."""
    X = torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(1))

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _record_in_order(tmp_path / "relu", model, opt, X, Y, batch=5)
    loss = lambda o, y: nn.functional.cross_entropy(o, y, reduction="none")  # noqa: E731
    kw = dict(train=(X, Y), target=(X[:4], Y[:4]), method="diffin-exact", progress=False)
    auto = diffin.score(tmp_path / "relu", make(), loss, **kw)
    assert auto.diagnostics["hvp"]["mode"] == "exact" and "ReLU" in auto.diagnostics["hvp"]["reason"]
    exact = diffin.score(tmp_path / "relu", make(), loss, hvp="exact", **kw)
    np.testing.assert_array_equal(auto.scores, exact.scores)
    tanh = record(tmp_path / "tanh")
    # a smooth model made of dense layers: exact HVPs cost the frozen sweep less than differences;
    # through a convolution they cost more, and central differences stay
    frozen = tanh.score("diffin-frozen")
    assert frozen.diagnostics["hvp"]["mode"] == "exact" and "dense" in frozen.diagnostics["hvp"]["reason"]
    assert_close(frozen.scores, tanh.score("diffin-frozen", hvp="central").scores, computation="fd")
    conv = record(tmp_path / "conv", kind="cnn")
    assert conv.score("diffin-frozen").diagnostics["hvp"]["mode"] == "central"
    # a replayed sweep of a smooth model takes exact HVPs from the replay's own gradient graphs
    # (cheaper than central differences there); they agree with central differences to the
    # differences' O(ε²) error
    smooth = tanh.score("diffin")
    assert smooth.diagnostics["hvp"]["mode"] == "exact" and "replayed sweep" in smooth.diagnostics["hvp"]["reason"]
    central = tanh.score("diffin", hvp="central").scores
    assert_close(smooth.scores, central, computation="fd")
