"""Replayed removal, LDS subsets, and the influence-function / gradient baselines (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffin
from _tiny import assert_close, difference_scale, record, tolerance
from diffin import _reference as ref
from diffin._data import DataSource
from diffin._functional import FlatModel
from diffin.groundtruth import lds_ground_truth, lds_subsets, replay_removal

MOM = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}


def _scale(tiny, theta=None) -> float:
    """:func:`difference_scale` of the validation mean loss at θ (default: the recorded θ_T):
    replayed removals are differences f(θ^{−S}) − f(θ_T) of separately rounded trajectories."""
    run = diffin.load_run(tiny.run)
    fm = FlatModel(tiny.make(), tiny.loss, run.trainable)
    th = fm.flatten(run.load_checkpoint(run.n_steps).params) if theta is None else theta
    g = diffin.targets.MeanLoss(DataSource((tiny.Xv, tiny.Yv), torch.float64, torch.device("cpu"))).grads(fm, th)
    return difference_scale(th, g, float(fm.losses(th, tiny.Xv, tiny.Yv).mean()))


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
        assert_close(th, recorded)
    # the full run travels with the removal runs, so removing nothing changes f by rounding only
    assert abs(vals[0]) <= tolerance()[1] * _scale(tiny, full)


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
    assert_close(got, want, scale=_scale(tiny))


def test_memory_budget_splits_runs_without_changing_results(tmp_path):
    tiny = record(tmp_path / "r", opt_kw=MOM)
    kw = dict(train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv), remove=list(range(24)), progress=False)
    a = replay_removal(tiny.run, tiny.make(), tiny.loss, **kw)
    b = replay_removal(tiny.run, tiny.make(), tiny.loss, memory_mb=3 * 51 * 8 * 3 / 2**20, **kw)
    assert_close(b, a, scale=_scale(tiny))


def test_pairwise_and_self_ground_truth(tmp_path):
    tiny = record(tmp_path / "r")
    kw = dict(train=(tiny.X, tiny.Y), remove=[1, 4], progress=False)
    M = replay_removal(tiny.run, tiny.make(), tiny.loss, target=(tiny.Xv, tiny.Yv), pairwise=True, **kw)
    mean = replay_removal(tiny.run, tiny.make(), tiny.loss, target=(tiny.Xv, tiny.Yv), **kw)
    assert M.shape == (2, 8)
    assert_close(M.mean(1), mean, scale=_scale(tiny))
    own = replay_removal(tiny.run, tiny.make(), tiny.loss, target="self", **kw)
    full = replay_removal(tiny.run, tiny.make(), tiny.loss, target=(tiny.X, tiny.Y), pairwise=True, **kw)
    assert_close(own, [full[0, 1], full[1, 4]], scale=_scale(tiny))


def test_lds_subsets_and_ground_truth(tmp_path):
    masks = lds_subsets(24, n_subsets=6, fraction=0.5, seed=3)
    assert masks.shape == (6, 24) and np.all(masks.sum(1) == 12)
    np.testing.assert_array_equal(masks, lds_subsets(24, 6, 0.5, seed=3))
    tiny = record(tmp_path / "r")
    kw = dict(train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv), progress=False)
    got = lds_ground_truth(tiny.run, tiny.make(), tiny.loss, masks=masks, **kw)
    want = replay_removal(tiny.run, tiny.make(), tiny.loss, remove=[np.flatnonzero(~m) for m in masks], **kw)
    assert_close(got, want, scale=_scale(tiny))
    with pytest.raises(diffin.ConfigError):
        lds_subsets(24, 6, 1.0)


def test_ground_truth_errors(tmp_path):
    tiny = record(tmp_path / "r")
    kw = dict(train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv), progress=False)
    with pytest.raises(diffin.DiffinError, match=r"holds ids outside \[0, "):
        replay_removal(tiny.run, tiny.make(), tiny.loss, remove=[99], **kw)
    with pytest.raises(diffin.ConfigError, match="convention"):
        replay_removal(tiny.run, tiny.make(), tiny.loss, remove=[1], convention="drop", **kw)
    no_ids = record(tmp_path / "b", ids=False)
    with pytest.raises(diffin.DataMismatchError, match="batch ids"):
        replay_removal(no_ids.run, no_ids.make(), no_ids.loss, remove=[1], **kw)


# ------------------------------------------------------------------ influence functions
class _DenseIF:
    """Influence functions by a dense solve: H (P, P) of the training objective at θ_T (mean
    training loss plus the recorded weight decay), per-sample gradients G (N, P), ∇f (P,)."""

    def __init__(self, tiny) -> None:
        run = diffin.load_run(tiny.run)
        fm = FlatModel(tiny.make(), tiny.loss, run.trainable)
        th = fm.flatten(run.load_checkpoint(run.n_steps).params)
        self.eye = torch.eye(fm.num_params, dtype=torch.float64)
        self.H = ref.dense_hessian(fm, th, tiny.X, tiny.Y) + run.optimizer.weight_decay * self.eye
        src = DataSource((tiny.Xv, tiny.Yv), torch.float64, torch.device("cpu"))
        self.g = diffin.targets.MeanLoss(src).grads(fm, th)[0]
        self.G = ref.loop_grads(fm, th, tiny.X, tiny.Y)

    def eigenvalues(self, damping: float) -> torch.Tensor:
        return torch.linalg.eigvalsh(self.H + damping * self.eye)

    def scores(self, damping: float) -> tuple[np.ndarray, float]:
        """⟨G_z, (H + λI)⁻¹∇f⟩/N for all z, and the size max‖G_z‖·‖(H + λI)⁻¹∇f‖/N that an
        error of the solve relative to its solution is measured against."""
        s = torch.linalg.solve(self.H + damping * self.eye, self.g)
        N = len(self.G)
        return (self.G @ s / N).numpy(), float(self.G.norm(dim=1).max() * s.norm() / N)


def _solver_floors(lam: torch.Tensor, cg_tol: float, depth: int, scale: float) -> tuple[float, float]:
    """Relative errors of the two solvers on a matrix with eigenvalues ``lam``: CG stopped at
    residual ``cg_tol`` is off by at most κ·cg_tol; full-batch LiSSA after ``depth`` steps of
    scale ``scale`` by ρ^depth with ρ = 1 − λ_min/scale. Ten times each, as a floor."""
    lo, hi = float(lam.min()), float(lam.max())
    return 10 * hi / lo * cg_tol, 10 * (1 - lo / scale) ** depth


def test_if_equals_dense_solve_on_a_convex_model(tmp_path):
    tiny = record(tmp_path / "r", kind="linear", opt_kw={"lr": 0.5, "weight_decay": 1e-2}, epochs=4)
    dense = _DenseIF(tiny)
    lam = dense.eigenvalues(0.01)
    assert lam.min() > 0
    want, size = dense.scores(0.01)
    got = tiny.score("if-cg", hvp="exact", damping=0.01, cg_tol=1e-12, cg_iters=500)
    assert not got.diagnostics["damping_raised"] and got.diagnostics["damping"] == 0.01
    cg_floor, _ = _solver_floors(lam, 1e-12, 0, 1.0)
    assert_close(got.scores, want, rtol=0, floor=max(cg_floor, tolerance()[1]), scale=size)
    # LiSSA contracts by about 1 − λ_min/scale per step: a larger damping converges in 400 steps
    lissa = tiny.score("if-lissa", hvp="exact", damping=0.1, lissa_depth=400, lissa_batch_size=24)
    assert not lissa.diagnostics["damping_raised"]
    want, size = dense.scores(0.1)
    _, lissa_floor = _solver_floors(dense.eigenvalues(0.1), 0, 400, lissa.diagnostics["scale"])
    assert lissa_floor < 1e-3  # the comparison below is meaningful
    assert_close(lissa.scores, want, rtol=0, floor=lissa_floor, scale=size)


def test_if_raises_the_damping_on_an_indefinite_hessian(tmp_path):
    """A tanh MLP after two epochs with momentum: H + (λ_wd + λ)I has negative eigenvalues. Both
    solvers raise the damping by 1.1·|λ_min| (docs/method.md §5), say so in the diagnostics, and
    then equal the dense solve with the damping they report."""
    tiny = record(tmp_path / "r", opt_kw=MOM, n=24, epochs=2)
    dense = _DenseIF(tiny)
    asked = 1e-3
    lam = dense.eigenvalues(asked)
    assert lam.min() < -0.1 * lam.max()  # clearly indefinite
    cg = tiny.score("if-cg", hvp="exact", damping=asked, cg_tol=1e-12, cg_iters=500)
    lissa = tiny.score("if-lissa", hvp="exact", damping=asked, lissa_depth=1000, lissa_batch_size=24)
    for r in (cg, lissa):
        d = r.diagnostics
        assert d["damping_raised"] and d["damping_requested"] == asked
        assert d["eig_min"] == pytest.approx(float(lam.min()), rel=1e-2)  # Lanczos to 1 %
        assert d["eig_max"] == pytest.approx(float(lam.max()), rel=1e-2)
        assert d["damping"] == pytest.approx(asked - 1.1 * d["eig_min"], rel=1e-12)
    assert cg.diagnostics["damping"] == lissa.diagnostics["damping"]  # one damping for both
    assert not any(cg.diagnostics["negative_curvature"])
    damping = cg.diagnostics["damping"]
    lam_d = dense.eigenvalues(damping)
    assert lam_d.min() > 0.05 * -float(lam.min())  # positive definite with room to spare
    want, size = dense.scores(damping)
    cg_floor, lissa_floor = _solver_floors(lam_d, 1e-12, 1000, lissa.diagnostics["scale"])
    assert lissa_floor < 1e-3
    assert_close(cg.scores, want, rtol=0, floor=max(cg_floor, tolerance()[1]), scale=size)
    assert_close(lissa.scores, want, rtol=0, floor=lissa_floor, scale=size)


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
    assert_close(tiny.score("grad-dot").scores, coef * (G @ g))
    cos = (G @ g) / (G.norm(dim=1) * g.norm())
    assert_close(tiny.score("grad-cos").scores, cos)
    assert_close(tiny.score("grad-dot", target="self").scores, coef * (G * G).sum(1))


def test_runs_start_at_their_first_removed_id(tmp_path, monkeypatch, caplog):
    """Each removal run starts from the unremoved run's state at the step of its first removed id:
    the same effects as K runs advanced from step 0 (float64 rounding), fewer run-steps; the replay
    logs its estimated duration."""
    from diffin import _side_by_side as gt

    tiny = record(tmp_path / "r", opt_kw=MOM, n=18, batch=4, epochs=2)
    run = diffin.load_run(tiny.run)
    batches = [run.batch(t) for t in range(run.n_steps)]
    groups = [[int(batches[-1][0])], [int(batches[2][1])], [0, 5]]
    member = np.zeros((len(groups) + 1, 18), dtype=bool)
    for k, g in enumerate(groups):
        member[k + 1, g] = True
    plan = gt._activation_plan(member, batches)
    assert plan.shared and plan.base == 0 and plan.run_steps < member.shape[0] * run.n_steps
    assert plan.first[1] == min(t for t, b in enumerate(batches) if groups[0][0] in b)
    kw = dict(train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv), remove=groups, progress=True)
    monkeypatch.setattr(gt, "ESTIMATE_AFTER_SECONDS", 0.0)
    with caplog.at_level("INFO", logger="diffin.progress"):
        late = replay_removal(tiny.run, tiny.make(), tiny.loss, **kw)
    assert any("about" in r.getMessage() and "run-steps" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(gt, "_activation_plan", lambda m, b: gt._Plan(np.zeros(len(m), dtype=np.int64), None,
                                                                         len(m) * len(b)))
    from_zero = replay_removal(tiny.run, tiny.make(), tiny.loss, **kw)
    assert_close(late, from_zero, scale=_scale(tiny))
