"""Peer adapters (diffin.peers): each peer's output in diffin's sign and units, checked against
references computed here with plain autograd on tiny float64 runs, and against replayed removal.

Every test skips when its peer's package is not importable (``pip install 'diffin[peers]'``).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffin
from _tiny import record_sgd_order
from diffin.groundtruth import replay_removal
from diffin.peers import available_peers, peer_units, run_peer

N, D, C = 40, 5, 3
CG_TOL = 1e-6  # an iterative solver against a dense solve: its stopping rule, not the dtype, bounds this


def assert_close(actual, ref, dtype: torch.dtype = torch.float64, tol: float | None = None) -> None:
    """Two computations of the same formula in ``dtype`` agree to rounding: relative tolerance
    √u and an absolute floor of 1e4·u times the largest reference value (u the dtype's machine
    epsilon), so entries near zero, whose rounding error is set by the larger terms they were
    summed from, are judged on the scale of the vector. ``tol`` replaces both (relative, and
    the floor's factor) where something other than rounding bounds the difference."""
    u = torch.finfo(dtype).eps
    ref = np.asarray(ref, dtype=np.float64)
    rtol, floor = (u**0.5, 1e4 * u) if tol is None else (tol, tol)
    np.testing.assert_allclose(actual, ref, rtol=rtol, atol=floor * float(np.abs(ref).max()))


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _data(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    centres = 1.5 * torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N + 12,), generator=g)
    x = centres[y] + torch.randn(N + 12, D, generator=g, dtype=torch.float64)
    return x[:N], y[:N], x[N:], y[N:]


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, C)).double()


def logreg() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(D, C)).double()


def _record(path, factory, x, y, *, lr, steps, batch, every, weight_decay=0.0) -> diffin.Run:
    g = torch.Generator().manual_seed(0)
    order = torch.cat([torch.randperm(N, generator=g) for _ in range(-(-steps * batch // N))])
    return record_sgd_order(path, factory(), x, y, order, loss=loss_fn, lr=lr, steps=steps, batch=batch, every=every,
                            n_train=N, weight_decay=weight_decay)


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    """A small tanh MLP, 2 epochs of 5 mini-batch SGD steps, checkpoints every 3 (and at 10)."""
    x, y, xv, yv = _data(0)
    path = tmp_path_factory.mktemp("peers") / "sgd"
    run = _record(path, mlp, x, y, lr=0.2, steps=10, batch=8, every=3)
    return run, (x, y), (xv, yv)


WD = 0.1


@pytest.fixture(scope="module")
def convex_run(tmp_path_factory):
    """Logistic regression with weight decay, full-batch gradient descent run to convergence:
    the influence function at θ_T is the exact first-order leave-one-out effect. Skips before
    its 400 steps when no peer that uses it is installed."""
    if not any(importlib.util.find_spec(p) for p in ("dattri", "kronfluence", "trak")):
        pytest.skip("needs dattri, kronfluence or traker (pip install 'diffin[peers]')")
    x, y, xv, yv = _data(1)
    path = tmp_path_factory.mktemp("peers") / "convex"
    run = _record(path, logreg, x, y, lr=0.5, steps=400, batch=N, every=100, weight_decay=WD)
    return run, (x, y), (xv, yv)


# ---------------------------------------------------------------------- references
def _flat(model: nn.Module, params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params[n].reshape(-1) for n, _ in model.named_parameters()])


def _loss_at(model: nn.Module, theta: torch.Tensor, x, y) -> torch.Tensor:
    """Per-sample losses at the flat parameter vector theta."""
    named, parts, i = dict(model.named_parameters()), {}, 0
    for n, p in named.items():
        parts[n] = theta[i : i + p.numel()].view_as(p)
        i += p.numel()
    return loss_fn(torch.func.functional_call(model, parts, (x,)), y)


def _grads(model, theta, x, y) -> torch.Tensor:
    """Per-sample gradients (B, P) by a loop of autograd calls."""
    rows = []
    for i in range(x.shape[0]):
        th = theta.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_loss_at(model, th, x[i : i + 1], y[i : i + 1])[0], th)
        rows.append(g)
    return torch.stack(rows)


def _target_grad(model, theta, xv, yv) -> torch.Tensor:
    th = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_loss_at(model, th, xv, yv).mean(), th)
    return g


def _theta(run: diffin.Run, factory, step: int) -> torch.Tensor:
    return _flat(factory(), run.load_checkpoint(step).params)


def tracin_reference(run, factory, train, target) -> np.ndarray:
    """diffin's TracIn-CP: Σ_k (Σ_{t∈[c_k, c_{k+1})} η_t / N) ⟨∇f(θ_{c_{k+1}}), ∇l_z(θ_{c_{k+1}})⟩."""
    model = factory()
    out = torch.zeros(N, dtype=torch.float64)
    for c0, c1 in run.segments:
        theta = _theta(run, factory, c1)
        coef = float(np.sum(run.lrs[c0:c1])) / N
        out += coef * _grads(model, theta, *train) @ _target_grad(model, theta, *target)
    return out.numpy()


def if_reference(run, factory, train, target, damping: float) -> np.ndarray:
    """(1/N) ⟨∇f(θ_T), (H + λI)⁻¹ ∇l_z(θ_T)⟩ with the dense Hessian of the mean training loss."""
    model = factory()
    theta = _theta(run, factory, run.n_steps)
    H = torch.autograd.functional.hessian(lambda th: _loss_at(model, th, *train).mean(), theta)
    H = H + damping * torch.eye(theta.numel(), dtype=theta.dtype)
    u = torch.linalg.solve(H, _target_grad(model, theta, *target))
    return (_grads(model, theta, *train) @ u / N).numpy()


def _peer(name, run, factory, train, target, **opts):
    return run_peer(name, run=run, model_factory=factory, loss_fn=loss_fn, train=train,
                    target=target, **opts)


def _slope(a: np.ndarray, b: np.ndarray) -> float:
    """Least-squares slope of a on b through the origin."""
    return float(a @ b / (b @ b))


# ---------------------------------------------------------------------- registry
def test_registry_lists_every_adapter():
    peers = available_peers()
    assert {"captum-tracincp", "captum-tracincp-fast", "kronfluence-ekfac", "kronfluence-kfac", "trak",
            "dattri-if-explicit", "dattri-if-cg", "dattri-tracin", "dattri-grad-dot"} <= set(peers)
    assert all(v == "ok" or isinstance(v, str) and v for v in peers.values())
    assert set(peer_units()) == set(peers)


PACKAGES = {"captum": "captum", "kronfluence": "kronfluence", "trak": "trak", "dattri": "dattri"}


@pytest.mark.parametrize("name", sorted(peer_units()))
def test_pairwise_columns_average_to_the_mean_target_scores(sgd_run, name):
    """``pairwise=True`` gives (N, Q), column q for target example q; their mean over q is the
    score for the mean target (every peer's scores are linear in the target)."""
    pytest.importorskip(PACKAGES[name.split("-")[0]])
    run, train, target = sgd_run
    opts = {"kronfluence-ekfac": {"damping_factor": None}, "kronfluence-kfac": {"damping_factor": None},
            "dattri-if-explicit": {"regularization": 1e-2}, "dattri-if-cg": {"regularization": 1e-2},
            "trak": {"proj_dim": 16}}.get(name, {})
    mean = _peer(name, run, mlp, train, target, **opts).scores
    per = _peer(name, run, mlp, train, target, pairwise=True, **opts).scores
    assert per.shape == (N, target[0].shape[0])
    # TRAK computes in float32; the rest in the run's float64
    assert_close(per.mean(axis=1), mean, torch.float32 if name == "trak" else torch.float64)


def test_unknown_peer_and_option_raise(sgd_run):
    run, train, target = sgd_run
    with pytest.raises(diffin.UnknownMethodError):
        _peer("no-such-peer", run, mlp, train, target)
    pytest.importorskip("captum")
    with pytest.raises(diffin.ConfigError, match="unknown options"):
        _peer("captum-tracincp", run, mlp, train, target, no_such_option=1)


def test_model_in_another_dtype_is_refused(sgd_run):
    pytest.importorskip("captum")
    run, train, target = sgd_run
    with pytest.raises(diffin.ConfigError, match="dtype"):
        _peer("captum-tracincp", run, lambda: mlp().float(), train, target)


# ---------------------------------------------------------------------- captum
@pytest.mark.parametrize("sample_wise", [None, False, True])
def test_captum_tracincp_equals_reference(sgd_run, sample_wise):
    pytest.importorskip("captum")
    run, train, target = sgd_run
    res = _peer("captum-tracincp", run, mlp, train, target, sample_wise_grads_per_batch=sample_wise)
    ref = tracin_reference(run, mlp, train, target)
    assert_close(res.scores, ref)
    assert res.seconds > 0 and "Q·N" in res.notes
    assert res.peak_rss_mb is None or res.peak_rss_mb > 0


def test_captum_tracincp_equals_diffin_tracin(sgd_run):
    pytest.importorskip("captum")
    run, train, target = sgd_run
    res = _peer("captum-tracincp", run.path, mlp, train, target)  # a run folder works too
    ours = diffin.influence(run, mlp(), loss_fn, train=train, target=target, method="tracin",
                            progress=False)
    assert_close(res.scores, ours)


def test_captum_tracincp_fast_equals_last_layer_reference(sgd_run):
    pytest.importorskip("captum")
    run, train, target = sgd_run
    res = _peer("captum-tracincp-fast", run, mlp, train, target)
    model = mlp()
    w = slice(4 * D + 4, 4 * D + 4 + C * 4)  # the final layer's weight inside θ (bias excluded)
    ref = torch.zeros(N, dtype=torch.float64)
    for c0, c1 in run.segments:
        theta = _theta(run, mlp, c1)
        coef = float(np.sum(run.lrs[c0:c1])) / N
        ref += coef * _grads(model, theta, *train)[:, w] @ _target_grad(model, theta, *target)[w]
    assert_close(res.scores, ref.numpy())


def test_tracin_sign_agrees_with_replayed_removal(sgd_run):
    """Empirical sign and units: TracIn-CP tracks the exact removal effect on a short run."""
    pytest.importorskip("captum")
    run, train, target = sgd_run
    res = _peer("captum-tracincp", run, mlp, train, target)
    gt = replay_removal(run, mlp(), loss_fn, train=train, target=target, remove=list(range(N)),
                        progress=False)
    assert np.corrcoef(res.scores, gt)[0, 1] > 0.8
    assert 0.5 < _slope(res.scores, gt) < 2.0


# ---------------------------------------------------------------------- dattri
def test_dattri_tracin_equals_reference(sgd_run):
    pytest.importorskip("dattri")
    run, train, target = sgd_run
    res = _peer("dattri-tracin", run, mlp, train, target)
    assert_close(res.scores, tracin_reference(run, mlp, train, target))


def test_dattri_grad_dot_equals_reference(sgd_run):
    pytest.importorskip("dattri")
    run, train, target = sgd_run
    res = _peer("dattri-grad-dot", run, mlp, train, target)
    model, theta = mlp(), _theta(run, mlp, run.n_steps)
    ref = _grads(model, theta, *train) @ _target_grad(model, theta, *target) / N
    assert_close(res.scores, ref.numpy())


def test_dattri_if_explicit_equals_dense_hessian(convex_run):
    pytest.importorskip("dattri")
    run, train, target = convex_run
    res = _peer("dattri-if-explicit", run, logreg, train, target, regularization=WD)
    assert_close(res.scores, if_reference(run, logreg, train, target, WD))


def test_dattri_if_cg_equals_dense_hessian(convex_run):
    pytest.importorskip("dattri")
    run, train, target = convex_run
    res = _peer("dattri-if-cg", run, logreg, train, target, regularization=WD, max_iter=100)
    assert_close(res.scores, if_reference(run, logreg, train, target, WD), tol=CG_TOL)


def test_influence_function_sign_agrees_with_replayed_removal(convex_run):
    """At a strongly convex optimum, (1/N)⟨∇f, (H + λ_wd I)⁻¹ G_z⟩ is the first-order
    leave-one-out effect: same sign, slope near 1 against replayed removal (below 1: with 18
    parameters and 40 samples the leverage terms a first-order estimate omits are sizeable)."""
    pytest.importorskip("dattri")
    run, train, target = convex_run
    res = _peer("dattri-if-explicit", run, logreg, train, target, regularization=WD)
    gt = replay_removal(run, logreg(), loss_fn, train=train, target=target, remove=list(range(N)),
                        progress=False)
    assert np.corrcoef(res.scores, gt)[0, 1] > 0.95
    assert 0.7 < _slope(res.scores, gt) < 1.3


# ---------------------------------------------------------------------- kronfluence
def kfac_reference(run, train, target, damping: float, eigen_corrected: bool) -> np.ndarray:
    """(1/N) ⟨∇f, (F̂ + λI)⁻¹ G_z⟩ on one linear layer with the empirical Fisher F̂ in
    Kronecker form: per-sample gradient g ãᵀ (g = ∂l/∂out, ã = [x, 1]), K-FAC F̂ = G ⊗ A with
    A = mean ã ãᵀ, G = mean g gᵀ; EK-FAC keeps the eigenbasis of G ⊗ A and replaces its
    eigenvalues by the mean squared per-sample gradient coordinates in that basis."""
    params = run.load_checkpoint(run.n_steps).params
    W, b = params["0.weight"], params["0.bias"]

    def grads(x, y):
        g = torch.softmax(x @ W.T + b, -1) - F.one_hot(y, C).double()
        a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        return g, a, torch.einsum("nc,nd->ncd", g, a).reshape(len(x), -1)

    g, a, Gz = grads(*train)
    A, G = a.T @ a / N, g.T @ g / N
    if eigen_corrected:
        Q = torch.kron(torch.linalg.eigh(G).eigenvectors, torch.linalg.eigh(A).eigenvectors)
        lam = ((Gz @ Q) ** 2).mean(0)
        Finv = Q @ torch.diag(1 / (lam + damping)) @ Q.T
    else:
        Finv = torch.linalg.inv(torch.kron(G, A) + damping * torch.eye(G.shape[0] * A.shape[0],
                                                                       dtype=G.dtype))
    grad_f = grads(*target)[2].mean(0)
    return (Gz @ Finv @ grad_f / N).numpy()


@pytest.mark.parametrize("name", ["kronfluence-kfac", "kronfluence-ekfac"])
def test_kronfluence_equals_kronecker_reference(convex_run, name):
    """Empirical Fisher on one linear layer: kronfluence's scores equal the (E)K-FAC influence
    function computed here, to rounding — its sign and 1/N scale are diffin's."""
    pytest.importorskip("kronfluence")
    run, train, target = convex_run
    res = _peer(name, run, logreg, train, target, damping_factor=WD, use_empirical_fisher=True)
    ref = kfac_reference(run, train, target, WD, eigen_corrected=name.endswith("ekfac"))
    assert_close(res.scores, ref)


@pytest.mark.parametrize("name", ["kronfluence-ekfac", "kronfluence-kfac"])
def test_kronfluence_tracks_the_exact_influence_function(convex_run, name):
    """kronfluence's default true (sampled) Fisher: (E)K-FAC is not the Hessian, but on one
    linear layer its scores correlate with the exact influence function, same sign."""
    pytest.importorskip("kronfluence")
    run, train, target = convex_run
    res = _peer(name, run, logreg, train, target, damping_factor=WD)
    ref = if_reference(run, logreg, train, target, WD)
    assert np.corrcoef(res.scores, ref)[0, 1] > 0.9
    assert 0.5 < _slope(res.scores, ref) < 3.0


# ---------------------------------------------------------------------- TRAK
def trak_reference(run, factory, train, target) -> np.ndarray:
    """TRAK with one checkpoint and no projection loss, up to a positive factor:
    mean_v φ_vᵀ (ΦᵀΦ)⁺ φ_z · (1 − p_z), φ the gradient of the margin
    log p_y − log Σ_{k≠y} p_k, p_z the probability of z's label."""
    model, theta = factory(), _theta(run, factory, run.n_steps)

    def margins(th, x, y):
        named, parts, i = dict(model.named_parameters()), {}, 0
        for n, p in named.items():
            parts[n] = th[i : i + p.numel()].view_as(p)
            i += p.numel()
        out = torch.func.functional_call(model, parts, (x,))
        rest = out.masked_fill(F.one_hot(y, C).bool(), float("-inf"))
        return out.gather(1, y[:, None])[:, 0] - rest.logsumexp(1)

    phi = torch.autograd.functional.jacobian(lambda th: margins(th, *train), theta)
    phi_v = torch.autograd.functional.jacobian(lambda th: margins(th, *target), theta)
    with torch.no_grad():
        p = torch.exp(-_loss_at(model, theta, *train))
    return (phi @ torch.linalg.pinv(phi.T @ phi) @ phi_v.mean(0) * (1 - p)).numpy()


def test_trak_equals_its_formula_up_to_scale(convex_run):
    """TRAK's output is unitless: the adapter passes it through (mean over targets), so it is
    proportional, with a positive factor, to TRAK's formula computed here."""
    pytest.importorskip("trak")
    run, train, target = convex_run
    P = D * C + C
    # the margin is invariant to a common shift of all logits, so ΦᵀΦ is singular: TRAK needs
    # its ridge term (small against ΦᵀΦ) to match the pseudo-inverse
    res = _peer("trak", run, logreg, train, target, proj_dim=P, checkpoints=[run.n_steps],
                lambda_reg=1e-2)
    ref = trak_reference(run, logreg, train, target)
    assert np.corrcoef(res.scores, ref)[0, 1] > 0.999
    assert _slope(res.scores, ref) > 0
    assert peer_units()["trak"] == "rank-only"


def test_trak_sign_agrees_with_the_influence_function(convex_run):
    pytest.importorskip("trak")
    from scipy.stats import spearmanr

    run, train, target = convex_run
    res = _peer("trak", run, logreg, train, target, proj_dim=D * C + C, checkpoints=[run.n_steps],
                lambda_reg=1e-3)
    assert spearmanr(res.scores, if_reference(run, logreg, train, target, WD)).statistic > 0.25
