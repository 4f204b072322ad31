"""Invariants every estimator keeps (float64, tolerances from the dtype and the computation).

Over the whole registry: shapes, dtype, determinism, save/reload; the mean target equals the
row mean of the pairwise matrix over the same examples; self-influence equals the diagonal of
the pairwise matrix with the training samples as targets. And: the scoring batch size, the
checkpoint spacing and two-level replay do not change scores; a pairwise column equals the
single-example target.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import diffin
from _tiny import assert_close, record
from diffin import _reference as ref
from diffin._functional import FlatModel
from diffin.estimators.base import Estimator

MOMENTUM_WD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}
USES_HVPS = {"diffin", "diffin-exact", "diffin-frozen", "diffin-expected", "diffin-closed-form", "if-cg",
             "if-lissa"}
"""Estimators whose default (``hvp="auto"``: central differences on a smooth model) carries the
finite-difference error; the others are exact up to rounding."""


def _computation(method: str) -> str:
    return "fd" if method in USES_HVPS else "exact"


# ------------------------------------------------------------------ conformance over the registry
@pytest.mark.parametrize("method", sorted(Estimator.registry))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conformance(tmp_path, method, dtype):
    """Shapes, dtype, determinism and save/reload; in float64 also the two target invariants, on
    a tanh MLP trained with momentum (whose Hessian at θ_T is indefinite: influence functions
    must raise their damping to keep them)."""
    tiny = record(tmp_path / "r", n=12, epochs=2, every=4, dtype=dtype, opt_kw=MOMENTUM_WD)
    # CG solved to a residual well below the finite-difference error; LiSSA is linear in its
    # right-hand side at any depth
    cheap = {"if-lissa": {"lissa_depth": 50}, "if-cg": {"cg_tol": 1e-12, "cg_iters": 200}}.get(method, {})
    tiny.score = functools.partial(tiny.score, **cheap)
    cls = Estimator.registry[method]
    r1 = tiny.score(method)
    assert r1.scores.shape == (12,)
    assert r1.scores.dtype == (np.float32 if dtype == torch.float32 else np.float64)
    assert np.all(np.isfinite(r1.scores))
    r2 = tiny.score(method)
    np.testing.assert_array_equal(r1.scores, r2.scores)  # deterministic
    M = tiny.score(method, pairwise=True).scores
    assert M.shape == (12, 8)
    if cls.supports_self:
        own = tiny.score(method, target="self").scores
        assert own.shape == (12,)
    else:
        with pytest.raises(diffin.UnsupportedMethodError, match="self"):
            tiny.score(method, target="self")
    out = r1.save(tmp_path / "out")
    back = np.load(out / "scores.npy", allow_pickle=False)
    np.testing.assert_array_equal(back, r1.scores)
    r1.save(tmp_path / "out")  # same config: allowed
    with pytest.raises(diffin.DiffinError, match="overwrite"):
        tiny.score(method, seed=99).save(tmp_path / "out")
    if dtype != torch.float64:
        return
    comp = _computation(method)
    if method.startswith("if-"):
        assert r1.diagnostics["damping_raised"], r1.diagnostics  # the case the invariants guard
    # the mean target is the row mean of the pairwise matrix over the same examples
    if cls.linear_in_target:
        assert_close(r1.scores, M.mean(1), computation=comp, msg="mean target vs row mean")
    else:  # grad-cos: cos(ḡ, G_z) = Σ_j ‖g_j‖·cos(g_j, G_z) / (Q·‖ḡ‖)
        run = diffin.load_run(tiny.run)
        fm = FlatModel(tiny.make(), tiny.loss, run.trainable)
        g = ref.loop_grads(fm, fm.flatten(run.load_checkpoint(run.n_steps).params), tiny.Xv, tiny.Yv)
        w = (g.norm(dim=1) / (len(g) * g.mean(0).norm())).numpy()
        assert_close(r1.scores, M @ w, computation=comp, msg="mean target vs weighted row mean")
    # self-influence is the diagonal of the pairwise matrix with the training samples as targets
    if cls.supports_self:
        full = tiny.score(method, target=(tiny.X, tiny.Y), pairwise=True).scores
        assert_close(own, np.diag(full), computation=comp, msg="self vs diagonal")


# ------------------------------------------------------------------ targets
@pytest.mark.parametrize("method", ["diffin-exact", "diffin-frozen", "diffin-expected",
                                    "diffin-closed-form", "tracin", "tracin-every-step"])
def test_pairwise_columns_equal_single_targets(tmp_path, method):
    tiny = record(tmp_path / "r", n=12, epochs=2, every=3)
    M = tiny.score(method, pairwise=True).scores
    assert M.shape == (12, 8)
    for j in (0, 5):
        single = tiny.score(method, target=(tiny.Xv[j : j + 1], tiny.Yv[j : j + 1])).scores
        assert_close(M[:, j], single, computation=_computation(method))


# ------------------------------------------------------------------ invariances
@pytest.mark.parametrize("method", ["diffin-exact", "diffin-expected", "diffin-closed-form", "tracin"])
def test_scoring_batch_size_does_not_change_scores(tmp_path, method):
    tiny = record(tmp_path / "r", n=20, epochs=2, every=3)
    a = tiny.score(method, batch_size=3).scores
    b = tiny.score(method, batch_size=4096).scores
    assert_close(a, b, computation=_computation(method))


def test_checkpoint_spacing_does_not_change_exact_scores(tmp_path):
    a = record(tmp_path / "a", every=2, opt_kw=MOMENTUM_WD).score("diffin-exact").scores
    b = record(tmp_path / "b", every=5, opt_kw=MOMENTUM_WD).score("diffin-exact").scores
    c = record(tmp_path / "c", every=1000, opt_kw=MOMENTUM_WD).score("diffin-exact").scores
    assert_close(b, a, computation="fd")
    assert_close(c, a, computation="fd")


def test_two_level_replay_gives_the_same_scores(tmp_path):
    tiny = record(tmp_path / "r", every=1000, epochs=3, opt_kw=MOMENTUM_WD)
    a = tiny.score("diffin-exact").scores
    P = sum(p.numel() for p in tiny.make().parameters())
    state = P * 8 * 2  # θ and momentum, float64
    b = tiny.score("diffin-exact", replay_memory_mb=8 * state / 2**20).scores  # 8 states of 18 steps
    assert_close(b, a, computation="fd")
