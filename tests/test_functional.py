"""The functional core against dense Hessians and loops of autograd gradients (float64)."""

from __future__ import annotations

import functools

import pytest
import torch

from _tiny import assert_close, ce, make_model, tolerance
from diffin._errors import ConfigError
from diffin._functional import FlatModel, fd_epsilon
from diffin._reference import dense_hessian, loop_grads


def _relu_mlp() -> torch.nn.Module:
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).double()


@functools.cache
def _build(kind: str) -> tuple[FlatModel, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tiny float64 model, θ, a batch of 7 and 3 vectors; one per kind for the whole module
    (tests never modify them), so that dense Hessians are computed once."""
    d = 36 if kind == "cnn" else 5
    fm = FlatModel(_relu_mlp() if kind == "relu" else make_model(kind, d, 3), ce)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    theta = fm.theta_from_model() + 0.1 * torch.randn(fm.num_params, generator=g, dtype=torch.float64)
    v = torch.randn(3, fm.num_params, generator=g, dtype=torch.float64)
    return fm, theta, x, y, v


@pytest.fixture(params=["mlp", "cnn"])
def case(request):
    return _build(request.param)


@pytest.fixture(params=["mlp", "cnn", "relu"])
def exact_case(request):
    """As ``case``, plus a ReLU MLP (exact modes only: finite differences jump at its kinks)."""
    return _build(request.param)


@functools.cache
def _batch_hessian(fm: FlatModel, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dense Hessian of the batch's mean loss (P, P); cached per case."""
    return dense_hessian(fm, theta, x, y)


@functools.cache
def _sample_hessians(fm: FlatModel, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dense per-sample Hessians ∇²l_i(θ), (B, P, P); cached per case."""
    return torch.stack([dense_hessian(fm, theta, x[i : i + 1], y[i : i + 1]) for i in range(len(x))])


def _linear_loss_model() -> FlatModel:
    """l_i(θ) = ⟨w, x_i⟩: linear in θ, so every Hessian is zero and ∇l_i = x_i."""
    torch.manual_seed(3)
    return FlatModel(torch.nn.Linear(5, 1, bias=False).double(), lambda o, y: o[:, 0])


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
    H = _batch_hessian(fm, theta, x, y)
    assert_close(fm.hvp(theta, x, y, v, mode="exact"), v @ H)
    assert_close(fm.hvp(theta, x, y, v[1], mode="exact"), H @ v[1])


def test_exact_hvp_and_dots_match_dense_hessian_and_loop(exact_case):
    """One double backward gives H_B v and every ⟨v, ∇l_i⟩, for one vector and for Q."""
    fm, theta, x, y, v = exact_case
    H = _batch_hessian(fm, theta, x, y)
    G = loop_grads(fm, theta, x, y)
    hv, d = fm.hvp_and_dots(theta, x, y, v, mode="exact")
    assert hv.shape == v.shape and d.shape == (3, 7)
    assert_close(hv, v @ H)
    assert_close(d, v @ G.T)
    hv1, d1 = fm.hvp_and_dots(theta, x, y, v[2], mode="exact", dots="fd")  # exact whatever dots says
    assert_close(hv1, H @ v[2])
    assert_close(d1, G @ v[2])
    hv2, none = fm.hvp_and_dots(theta, x, y, v, mode="exact", want_dots=False)
    assert none is None
    assert_close(hv2, v @ H)


def test_exact_hvp_and_dots_of_a_loss_linear_in_theta():
    fm = _linear_loss_model()
    theta = fm.theta_from_model()
    x = torch.randn(4, 5, dtype=torch.float64)
    v = torch.randn(2, 5, dtype=torch.float64)
    hv, d = fm.hvp_and_dots(theta, x, torch.zeros(4), v, mode="exact")
    assert torch.all(hv == 0)
    assert_close(d, v @ x.T)
    assert torch.all(fm.hvp(theta, x, torch.zeros(4), v[0], mode="exact") == 0)


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
    want = torch.stack([a @ Hi @ b for Hi in _sample_hessians(fm, theta, x, y)])
    assert_close(fm.mixed_second(theta, x, y, a, b), want)
    assert_close(fm.mixed_second(theta, x, y, a, b, mode="central"), want, computation="fd")


def test_exact_mixed_second_for_several_rows_with_dots(exact_case):
    """aᵀ ∇²l_i b for Q rows a from one triple backward, plus ⟨w, ∇l_i⟩ when asked (the closed
    form's ⟨H_B ∇f, G_z⟩ + ∇fᵀ H_z G_B)."""
    fm, theta, x, y, v = exact_case
    A, b = v[:2], v[2]
    want = torch.stack([A @ Hi @ b for Hi in _sample_hessians(fm, theta, x, y)], dim=1)  # (2, 7)
    assert_close(fm.mixed_second(theta, x, y, A, b), want)
    W = torch.flip(A, dims=(0,)) * 3.0
    G = loop_grads(fm, theta, x, y)
    assert_close(fm.mixed_second(theta, x, y, A, b, plus_dots=W), want + W @ G.T)
    assert_close(fm.mixed_second(theta, x, y, A[1], b, plus_dots=W[1]), want[1] + G @ W[1])


def test_mixed_second_plus_dots_with_finite_differences(case):
    fm, theta, x, y, v = case
    a, b, w = v[0], v[1], v[2]
    want = fm.mixed_second(theta, x, y, a, b) + fm.dots(theta, x, y, w)
    assert_close(fm.mixed_second(theta, x, y, a, b, mode="central", plus_dots=w), want, computation="fd")


def test_exact_mixed_second_of_a_loss_linear_in_theta():
    fm = _linear_loss_model()
    theta = fm.theta_from_model()
    x = torch.randn(4, 5, dtype=torch.float64)
    a, b = torch.randn(2, 5, dtype=torch.float64)
    y = torch.zeros(4)
    assert torch.all(fm.mixed_second(theta, x, y, a, b) == 0)
    assert_close(fm.mixed_second(theta, x, y, a, b, plus_dots=b), x @ b)


def test_mixed_second_plus_dots_shape_is_checked(case):
    fm, theta, x, y, v = case
    with pytest.raises(ConfigError, match="plus_dots"):
        fm.mixed_second(theta, x, y, v[:2], v[2], plus_dots=v)


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
