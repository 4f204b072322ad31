"""The functional core against dense Hessians and loops of autograd gradients (float64)."""

from __future__ import annotations

import pytest
import torch

from _tiny import assert_close, ce, make_model, tolerance
from diffin._functional import FlatModel, fd_epsilon
from diffin._reference import dense_hessian, loop_grads


@pytest.fixture(params=["mlp", "cnn"])
def case(request):
    kind = request.param
    d = 36 if kind == "cnn" else 5
    fm = FlatModel(make_model(kind, d, 3), ce)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    theta = fm.theta_from_model() + 0.1 * torch.randn(fm.num_params, generator=g, dtype=torch.float64)
    v = torch.randn(3, fm.num_params, generator=g, dtype=torch.float64)
    return fm, theta, x, y, v


def test_flatten_roundtrip(case):
    fm, theta, *_ = case
    assert torch.equal(fm.flatten(fm.unflatten(theta)), theta)


def test_dots_match_loop_of_autograd(case):
    fm, theta, x, y, v = case
    G = loop_grads(fm, theta, x, y)
    assert_close(fm.dots(theta, x, y, v[0]), G @ v[0])
    assert_close(fm.dots(theta, x, y, v), v @ G.T)


def test_per_sample_grads_match_loop(case):
    fm, theta, x, y, _ = case
    assert_close(fm.per_sample_grads(theta, x, y), loop_grads(fm, theta, x, y))


def test_batch_gradient_is_mean_of_per_sample(case):
    fm, theta, x, y, _ = case
    g, losses = fm.loss_grad(theta, x, y)
    assert_close(g, loop_grads(fm, theta, x, y).mean(0))
    assert losses.shape == (7,)


def test_exact_hvp_matches_dense_hessian(case):
    fm, theta, x, y, v = case
    H = dense_hessian(fm, theta, x, y)
    assert_close(fm.hvp(theta, x, y, v, mode="exact"), v @ H)
    assert_close(fm.hvp(theta, x, y, v[1], mode="exact"), H @ v[1])


def test_fd_hvp_error_orders(case):
    """Central differences: error ∝ ε²; forward: ∝ ε (before rounding dominates)."""
    fm, theta, x, y, v = case
    exact = fm.hvp(theta, x, y, v[0], mode="exact")

    def err(mode: str, eps: float) -> float:
        return float((fm.hvp(theta, x, y, v[0], mode=mode, eps=eps) - exact).norm() / exact.norm())

    c1, c2 = err("central", 1e-2), err("central", 1e-3)
    f1, f2 = err("forward", 1e-2), err("forward", 1e-3)
    assert 30 < c1 / c2 < 300, (c1, c2)  # ×100 expected for O(ε²)
    assert 5 < f1 / f2 < 20, (f1, f2)  # ×10 expected for O(ε)
    # the default ε is accurate: truncation and rounding balanced at about ε^(2/3) (central)
    # and √ε (forward) relative
    eps = torch.finfo(theta.dtype).eps
    assert err("central", None) < tolerance(theta.dtype, "fd")[0]
    assert err("forward", None) < 1e3 * eps**0.5


def test_fd_dots_come_with_the_hvp(case):
    fm, theta, x, y, v = case
    G = loop_grads(fm, theta, x, y)
    hv, d = fm.hvp_and_dots(theta, x, y, v, mode="central", dots="fd")
    assert_close(d, v @ G.T, computation="fd")
    hv2, d2 = fm.hvp_and_dots(theta, x, y, v, mode="central", dots="jvp")
    assert_close(hv, hv2, computation="fd")  # the same finite differences either way
    assert_close(d2, v @ G.T)


def test_zero_vector_gives_zero(case):
    fm, theta, x, y, v = case
    V = v.clone()
    V[1] = 0
    hv, d = fm.hvp_and_dots(theta, x, y, V, mode="central")
    assert torch.all(hv[1] == 0) and torch.all(d[1] == 0)


def test_mixed_second_matches_per_sample_hessians(case):
    fm, theta, x, y, v = case
    a, b = v[0], v[1]
    want = torch.stack([a @ dense_hessian(fm, theta, x[i : i + 1], y[i : i + 1]) @ b for i in range(7)])
    assert_close(fm.mixed_second(theta, x, y, a, b), want)
    assert_close(fm.mixed_second(theta, x, y, a, b, mode="central"), want, computation="fd")


def test_fd_epsilon_scales_with_dtype_and_norm():
    t64 = torch.ones(4, dtype=torch.float64)
    t32 = torch.ones(4, dtype=torch.float32)
    assert fd_epsilon(t32, "central") > 100 * fd_epsilon(t64, "central")
    assert fd_epsilon(10 * t64, "central") == pytest.approx(10 * fd_epsilon(t64, "central"))
    assert fd_epsilon(t64, "central", 0.5) == 0.5


def test_loss_shape_error():
    from diffin._errors import LossShapeError

    fm = FlatModel(make_model("mlp", 5, 3), lambda o, y: torch.nn.functional.cross_entropy(o, y))
    x = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(LossShapeError, match="reduction='none'"):
        fm.losses(fm.theta_from_model(), x, torch.zeros(4, dtype=torch.long))
