"""Replayed removal, LDS subsets, and the influence-function / gradient baselines (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffin
from _tiny import record
from diffin import _reference as ref
from diffin._data import DataSource
from diffin._functional import FlatModel
from diffin.groundtruth import lds_ground_truth, lds_subsets, replay_removal

MOM = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}


@pytest.mark.parametrize("convention", ["keep", "renormalize"])
@pytest.mark.parametrize("opt", [None, MOM])
def test_removing_nothing_reproduces_the_recorded_run(tmp_path, convention, opt):
    tiny = record(tmp_path / "r", opt_kw=opt, epochs=3)
    run = diffin.load_run(tiny.run)
    vals, full, thetas = replay_removal(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y),
                                        target=(tiny.Xv, tiny.Yv), remove=[[]], convention=convention,
                                        progress=False, return_thetas=True)
    fm = FlatModel(tiny.make(), tiny.loss, run.trainable)
    recorded = fm.flatten(run.load_checkpoint(run.n_steps).params)
    for th in (full, thetas[0]):
        assert float((th - recorded).norm() / recorded.norm()) < 1e-12
    assert vals[0] == 0.0


def _loop_reference(tiny, group, convention):
    """Retrain with torch.optim.SGD on the module, masking the group's losses in each batch."""
    run = diffin.load_run(tiny.run)
    model = tiny.make()
    ck = run.load_checkpoint(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(ck.params[n])
    o = run.optimizer
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=o.momentum, nesterov=o.nesterov,
                          weight_decay=o.weight_decay)
    for t in range(run.n_steps):
        ids = run.batch(t)
        keep = torch.as_tensor(~np.isin(ids, group), dtype=torch.float64)
        denom = len(ids) if convention == "keep" else max(float(keep.sum()), 1.0)
        for g in opt.param_groups:
            g["lr"] = float(run.lrs[t])
        opt.zero_grad()
        (tiny.loss(model(tiny.X[ids]), tiny.Y[ids]) * keep).sum().div(denom).backward()
        opt.step()
    with torch.no_grad():
        return float(tiny.loss(model(tiny.Xv), tiny.Yv).mean())


@pytest.mark.parametrize("convention", ["keep", "renormalize"])
def test_group_removal_matches_a_plain_retraining_loop(tmp_path, convention):
    tiny = record(tmp_path / "r", opt_kw=MOM, n=18, batch=4, epochs=2)
    groups = [[0], [3, 7, 11], list(range(0, 18, 2)), [5, 6, 7, 8]]
    got = replay_removal(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y),
                         target=(tiny.Xv, tiny.Yv), remove=groups, convention=convention, progress=False)
    base = _loop_reference(tiny, [], convention)
    want = [_loop_reference(tiny, g, convention) - base for g in groups]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-13)


def test_memory_budget_splits_runs_without_changing_results(tmp_path):
    tiny = record(tmp_path / "r", opt_kw=MOM)
    kw = dict(train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv), remove=list(range(24)), progress=False)
    a = replay_removal(tiny.run, tiny.make(), tiny.loss, **kw)
    b = replay_removal(tiny.run, tiny.make(), tiny.loss, memory_mb=3 * 51 * 8 * 3 / 2**20, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_pairwise_and_self_ground_truth(tmp_path):
    tiny = record(tmp_path / "r")
    kw = dict(train=(tiny.X, tiny.Y), remove=[1, 4], progress=False)
    M = replay_removal(tiny.run, tiny.make(), tiny.loss, target=(tiny.Xv, tiny.Yv), pairwise=True, **kw)
    mean = replay_removal(tiny.run, tiny.make(), tiny.loss, target=(tiny.Xv, tiny.Yv), **kw)
    assert M.shape == (2, 8)
    np.testing.assert_allclose(M.mean(1), mean, rtol=1e-12)
    own = replay_removal(tiny.run, tiny.make(), tiny.loss, target="self", **kw)
    full = replay_removal(tiny.run, tiny.make(), tiny.loss, target=(tiny.X, tiny.Y), pairwise=True, **kw)
    np.testing.assert_allclose(own, [full[0, 1], full[1, 4]], rtol=1e-12)


def test_lds_subsets_and_ground_truth(tmp_path):
    masks = lds_subsets(24, n_subsets=6, fraction=0.5, seed=3)
    assert masks.shape == (6, 24) and np.all(masks.sum(1) == 12)
    np.testing.assert_array_equal(masks, lds_subsets(24, 6, 0.5, seed=3))
    tiny = record(tmp_path / "r")
    kw = dict(train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv), progress=False)
    got = lds_ground_truth(tiny.run, tiny.make(), tiny.loss, masks=masks, **kw)
    want = replay_removal(tiny.run, tiny.make(), tiny.loss, remove=[np.flatnonzero(~m) for m in masks], **kw)
    np.testing.assert_allclose(got, want)
    with pytest.raises(diffin.ConfigError):
        lds_subsets(24, 6, 1.0)


def test_ground_truth_errors(tmp_path):
    tiny = record(tmp_path / "r")
    kw = dict(train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv), progress=False)
    with pytest.raises(diffin.DiffinError, match="must lie in"):
        replay_removal(tiny.run, tiny.make(), tiny.loss, remove=[99], **kw)
    with pytest.raises(diffin.ConfigError, match="convention"):
        replay_removal(tiny.run, tiny.make(), tiny.loss, remove=[1], convention="drop", **kw)
    no_ids = record(tmp_path / "b", ids=False)
    with pytest.raises(diffin.DataMismatchError, match="batch ids"):
        replay_removal(no_ids.run, no_ids.make(), no_ids.loss, remove=[1], **kw)


# ------------------------------------------------------------------ influence functions
def _dense_if(tiny, damping):
    run = diffin.load_run(tiny.run)
    fm = FlatModel(tiny.make(), tiny.loss, run.trainable)
    th = fm.flatten(run.load_checkpoint(run.n_steps).params)
    shift = damping + run.optimizer.weight_decay  # the objective's Hessian includes the weight decay
    H = ref.dense_hessian(fm, th, tiny.X, tiny.Y) + shift * torch.eye(fm.num_params, dtype=torch.float64)
    src = DataSource((tiny.Xv, tiny.Yv), torch.float64, torch.device("cpu"))
    g = diffin.targets.MeanLoss(src).grads(fm, th)[0]
    G = ref.loop_grads(fm, th, tiny.X, tiny.Y)
    return (G @ torch.linalg.solve(H, g) / len(tiny.X)).numpy(), H


def test_if_cg_equals_dense_solve_on_a_convex_model(tmp_path):
    tiny = record(tmp_path / "r", kind="linear", opt_kw={"lr": 0.5, "weight_decay": 1e-2}, epochs=4)
    want, H = _dense_if(tiny, 0.01)
    assert torch.linalg.eigvalsh(H).min() > 0
    got = tiny.score("if-cg", hvp="exact", damping=0.01, cg_tol=1e-12, cg_iters=500)
    np.testing.assert_allclose(got.scores, want, rtol=1e-7, atol=1e-12)
    # LiSSA contracts by about 1 − λ_min/scale per step: a larger damping converges in 400 steps
    want_d, _ = _dense_if(tiny, 0.1)
    lissa = tiny.score("if-lissa", hvp="exact", damping=0.1, lissa_depth=400, lissa_batch_size=24)
    np.testing.assert_allclose(lissa.scores, want_d, rtol=1e-5, atol=1e-9 * np.abs(want_d).max())


def test_if_sign_matches_leave_one_out_on_a_converged_convex_model(tmp_path):
    """Near a minimum of a strongly convex loss, IF ≈ the effect of removing and retraining."""
    tiny = record(tmp_path / "r", kind="linear", opt_kw={"lr": 0.5, "weight_decay": 5e-2}, epochs=60,
                  batch=24, every=1000)
    s = tiny.score("if-cg", damping=0.05).scores
    real = replay_removal(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y),
                          target=(tiny.Xv, tiny.Yv), remove=list(range(24)), progress=False)
    assert np.corrcoef(s, real)[0, 1] > 0.97
    assert np.mean(np.sign(s) == np.sign(real)) > 0.9


def test_gradient_similarity_against_loops(tmp_path):
    tiny = record(tmp_path / "r")
    run = diffin.load_run(tiny.run)
    fm = FlatModel(tiny.make(), tiny.loss, run.trainable)
    th = fm.flatten(run.load_checkpoint(run.n_steps).params)
    G = ref.loop_grads(fm, th, tiny.X, tiny.Y)
    g = ref.loop_grads(fm, th, tiny.Xv, tiny.Yv).mean(0)
    coef = float(run.lrs.sum()) / 24
    np.testing.assert_allclose(tiny.score("grad-dot").scores, coef * (G @ g).numpy(), rtol=1e-9)
    cos = (G @ g) / (G.norm(dim=1) * g.norm())
    np.testing.assert_allclose(tiny.score("grad-cos").scores, cos.numpy(), rtol=1e-9)
    np.testing.assert_allclose(tiny.score("grad-dot", target="self").scores,
                               coef * (G * G).sum(1).numpy(), rtol=1e-9)
