"""Diff-In on the optimizers people train with (docs/method.md §4.3), float64 on a tiny tanh MLP:
SGD (plain, momentum, Nesterov, dampening, weight decay), Adam, Adam with L2 decay, AdamW,
gradient-norm clipping active in some steps, per-group learning rates and weight decays with a
scheduler, and accumulated micro-batches.

References: the metagradient (autograd through the whole recorded run unrolled as one program,
``diffin._reference.metagradient``) and the explicit forward recursion with forward-mode
derivatives of each step (``diffin._reference.forward_recursion``); neither uses the adjoint code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import diffin
from _tiny import assert_close, record_loop
from diffin import _reference as ref
from diffin._data import DataSource
from diffin._errors import MissingOptimizerStateError, UnsupportedOptimizerError, UnsupportedOptimizerWarning
from diffin._functional import FlatModel
from diffin.groundtruth import replay_removal
from diffin.trajectory import ReplayDriftWarning, TrainState, Trajectory
from diffin.trajectory.clipping import clip as clip_fn


def _groups(model: nn.Module, wd: float, lr_w: float, lr_b: float) -> list[dict]:
    """The usual recipe: weight decay on weights only; here also a different lr per group."""
    w = [p for n, p in model.named_parameters() if n.endswith("weight")]
    b = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": w, "weight_decay": wd, "lr": lr_w}, {"params": b, "weight_decay": 0.0, "lr": lr_b}]


def _cosine(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)


SGD = torch.optim.SGD
CASES: dict[str, dict] = {
    "sgd": dict(make_opt=lambda m: SGD(m.parameters(), lr=0.1)),
    "momentum-wd": dict(make_opt=lambda m: SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)),
    "nesterov": dict(make_opt=lambda m: SGD(m.parameters(), lr=0.05, momentum=0.8, nesterov=True,
                                            weight_decay=1e-3)),
    "dampening": dict(make_opt=lambda m: SGD(m.parameters(), lr=0.05, momentum=0.7, dampening=0.3)),
    "adam": dict(make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=0.02, betas=(0.8, 0.95))),
    "adam-l2": dict(make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=0.02, weight_decay=0.05)),
    "adamw": dict(make_opt=lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, weight_decay=0.1)),
    "sgd-clip": dict(make_opt=lambda m: SGD(m.parameters(), lr=0.1, momentum=0.5), clip=0.5),
    "adamw-clip": dict(make_opt=lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, weight_decay=0.1), clip=0.5),
    "sgd-groups": dict(make_opt=lambda m: SGD(_groups(m, 1e-2, 0.1, 0.03), momentum=0.9)),
    "adamw-groups-cosine": dict(make_opt=lambda m: torch.optim.AdamW(_groups(m, 0.1, 0.02, 0.05)),
                                scheduler=_cosine),
    "adam-accumulate": dict(make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=0.02), micro=2),
}


def _setup(tiny):
    run = diffin.load_run(tiny.run)
    fm = FlatModel(tiny.make(), tiny.loss, run.trainable)
    train = DataSource((tiny.X, tiny.Y), torch.float64, torch.device("cpu"))
    return run, fm, train, Trajectory(run, fm, train)


def _val_loss(fm, tiny):
    return lambda th: fm.losses(th, tiny.Xv, tiny.Yv).mean()


def _val_grad(fm, tiny, theta):
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        return torch.autograd.grad(_val_loss(fm, tiny)(th), th)[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_replay_reproduces_the_recorded_checkpoints(tmp_path, case):
    tiny = record_loop(tmp_path / "r", **CASES[case])
    run, fm, train, traj = _setup(tiny)
    state = traj.state(0)
    for t in range(run.n_steps):
        state, _ = traj.step(state, t)
        if t + 1 in run.checkpoint_steps:
            rec = traj.state(t + 1)
            assert_close(state.theta, rec.theta)
            assert state.k == rec.k
            for key, v in rec.opt.items():
                assert_close(state.opt[key], v)
    # replayed removal of nothing lands on the recorded θ_T
    _, full, thetas = replay_removal(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y),
                                     target=(tiny.Xv, tiny.Yv), remove=[[]], progress=False, return_thetas=True)
    recorded = traj.theta(run.n_steps)
    assert_close(full, recorded)
    assert_close(thetas[0], recorded)


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_sweep_equals_the_metagradient(tmp_path, case):
    tiny = record_loop(tmp_path / "r", **CASES[case])
    run, fm, train, traj = _setup(tiny)
    if case.endswith("clip") or "clip" in case:  # clipping is active in some steps, not all
        state, clipped = traj.state(0), []
        for t in range(run.n_steps):
            nxt, g = traj.step(state, t)
            clipped.append(bool(g.norm() > CASES[case]["clip"]))
            state = nxt
        assert 0 < sum(clipped) < len(clipped), clipped
    want = ref.metagradient(run, fm, train, _val_loss(fm, tiny))
    got = tiny.score("diffin-exact", hvp="exact")
    assert got.diagnostics["replay_drift"] < 1e-12
    assert_close(got.scores, want)


@pytest.mark.parametrize("case", ["adam", "adamw-clip", "adamw-groups-cosine", "sgd-groups"])
def test_exact_sweep_equals_the_forward_recursion_renormalized_groups(tmp_path, case):
    tiny = record_loop(tmp_path / "r", **CASES[case])
    run, fm, train, traj = _setup(tiny)
    thetas = [traj.state(0).theta]
    state = traj.state(0)
    for t in range(run.n_steps):
        state, _ = traj.step(state, t)
        thetas.append(state.theta)
    g = _val_grad(fm, tiny, thetas[-1])
    groups = [[0, 1, 2], [5], list(range(6, 14))]
    r = tiny.score("diffin-exact", hvp="exact", convention="renormalize", groups=groups)
    want = [ref.forward_recursion(run, fm, train, thetas, g, np.array(grp), "renormalize") for grp in groups]
    assert_close(r.group_scores, want)
    assert_close(r.scores[[4, 9]], [ref.forward_recursion(run, fm, train, thetas, g, z, "renormalize")
                                    for z in (4, 9)])


@pytest.mark.parametrize("case", ["adam-l2", "adamw-clip", "adamw-groups-cosine"])
def test_frozen_sweep_equals_the_recursion_at_frozen_states(tmp_path, case):
    """θ frozen at each segment's first checkpoint; the optimizer's state and step count follow
    the recorded batches with gradients at that θ (Adam's adjoint depends on them)."""
    tiny = record_loop(tmp_path / "r", **CASES[case])
    run, fm, train, traj = _setup(tiny)
    thetas, states = [], []
    for c0, c1 in run.segments:
        at = traj.state(c0)
        st = at
        for t in range(c0, c1):
            thetas.append(at.theta)
            states.append((st.opt, st.k))
            _, x, y = traj.batch(t)
            nxt = traj.advance(st, t, ref.loop_grads(fm, at.theta, x, y).mean(0))
            st = type(at)(at.theta, nxt.opt, nxt.k)
    thetas.append(traj.theta(run.n_steps))
    g = _val_grad(fm, tiny, thetas[-1])
    got = tiny.score("diffin-frozen", hvp="exact").scores
    zs = [1, 9, 14]
    assert_close(got[zs], [ref.forward_recursion(run, fm, train, thetas, g, z, states=states) for z in zs])


@pytest.mark.parametrize("case", ["adam", "adamw-clip", "momentum-wd"])
def test_tracin_every_step_uses_the_steps_own_coefficient(tmp_path, case):
    """score(z) = Σ_{t: z∈B_t} −⟨J_gᵀ∇f(θ_t), G_z(θ_t)⟩/|B_t|, J_g the Jacobian of the step's θ_{t+1}
    in its raw batch gradient, here by the generic VJP (torch.func.vjp) of the step."""
    tiny = record_loop(tmp_path / "r", **CASES[case])
    run, fm, train, traj = _setup(tiny)
    want = np.zeros(len(tiny.X))
    state = traj.state(0)
    for t in range(run.n_steps):
        ids, x, y = traj.batch(t)
        nxt, g = traj.step(state, t)
        _, pull = torch.func.vjp(lambda gg, s=state, tt=t: traj.advance(s, tt, gg).theta, g)
        (w,) = pull(_val_grad(fm, tiny, state.theta))
        G = ref.loop_grads(fm, state.theta, x, y)
        np.add.at(want, ids, -(G @ w).numpy() / len(ids))
        state = nxt
    assert_close(tiny.score("tracin-every-step").scores, want)


def test_smooth_adam_toy_tracks_replayed_removal(tmp_path):
    """Adam's first steps from a fresh state are sign descent (m/√v = g/|g|), not smooth in g; the
    recording starts after 20 warm-up steps, where √v barely moves with one step's gradient (the
    regime of a real run), and also checks a run whose step 0 carries a trained optimizer state."""
    tiny = record_loop(tmp_path / "r", make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=2e-3),
                       n=30, batch=6, epochs=3, every=6, warmup=20)
    assert diffin.load_run(tiny.run).load_checkpoint(0).optimizer_step == 20
    real = replay_removal(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv),
                          remove=list(range(30)), progress=False)
    got = tiny.score("diffin")
    assert got.variant == "diffin-exact"
    assert np.corrcoef(got.scores, real)[0, 1] > 0.99


def test_the_readme_loop_scores_with_no_further_arguments(tmp_path):
    """AdamW, two param groups (weight decay on weights only), a cosine schedule, clip_grad_norm_,
    ``rec.step(ids)`` without lr, ``Recorder(..., clip_grad_norm=c)``."""
    tiny = record_loop(tmp_path / "r", make_opt=lambda m: torch.optim.AdamW(_groups(m, 0.01, 0.02, 0.02)),
                       clip=0.5, scheduler=_cosine)
    run, fm, train, _ = _setup(tiny)
    assert run.clip_grad_norm == 0.5 and len(run.optimizer.groups) == 2
    scores = diffin.influence(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv),
                              progress=False)
    want = ref.metagradient(run, fm, train, _val_loss(fm, tiny))
    assert_close(scores, want, computation="fd")  # hvp="auto": central differences on a tanh MLP


# ------------------------------------------------------------------ bad input
def test_checkpoints_without_optimizer_state_are_refused_by_name(tmp_path, monkeypatch):
    tiny = record_loop(tmp_path / "r", **CASES["adam"])
    run, fm, train, traj = _setup(tiny)
    real = run.load_checkpoint

    def old_format(step, *a, **kw):  # what a run recorded without optimizer state loads as
        ck = real(step, *a, **kw)
        ck.optimizer_state, ck.optimizer_step = {}, None
        return ck

    monkeypatch.setattr(run, "load_checkpoint", old_format)
    traj.state(0)  # step 0: the optimizer had not stepped yet, nothing is missing
    with pytest.raises(MissingOptimizerStateError, match=r"(?i)exp_avg.*record it again.*'tracin'"):
        traj.state(3)
    with pytest.raises(diffin.UnsupportedMethodError, match="exp_avg"):
        diffin.influence(run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv),
                         progress=False)


@pytest.mark.parametrize("recorded", [None, 0.8])
def test_clipping_not_as_recorded_warns_about_replay_drift(tmp_path, recorded):
    """The loop clipped at 0.3 but the run says no clipping (or 0.8): replay cannot follow it."""
    tiny = record_loop(tmp_path / "r", make_opt=lambda m: SGD(m.parameters(), lr=0.1), clip=0.3,
                       record_clip=recorded)
    hint = "clip_grad_norm=max_norm" if recorded is None else "clip_grad_norm_ with that max_norm"
    with pytest.warns(ReplayDriftWarning, match=hint):
        r = tiny.score("diffin-exact")
    assert r.diagnostics["replay_drift"] > 1e-3


def test_amsgrad_and_switches_that_differ_per_group_are_refused_by_name(tmp_path):
    with pytest.warns(UnsupportedOptimizerWarning, match="amsgrad"):
        tiny = record_loop(tmp_path / "a", make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=0.01, amsgrad=True))
    with pytest.raises(diffin.UnsupportedMethodError, match="amsgrad"):
        tiny.score("diffin")
    with pytest.raises(UnsupportedOptimizerError, match="amsgrad"):
        replay_removal(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv),
                       remove=[1], progress=False)
    assert tiny.score("tracin").scores.shape == (18,)

    def nesterov_on_weights(m):
        g = _groups(m, 0.0, 0.1, 0.1)
        g[0].update(momentum=0.9, nesterov=True)
        g[1].update(momentum=0.9)
        return SGD(g)

    mixed = record_loop(tmp_path / "n", make_opt=nesterov_on_weights)
    with pytest.raises(diffin.UnsupportedMethodError, match="nesterov"):
        mixed.score("diffin-frozen")


def test_clip_of_a_batched_state_clips_each_run_separately():
    """Ground truth advances K runs at once: each row is clipped by its own norm."""
    g = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64)
    out = clip_fn(g, 1.0)
    assert_close(out[0], g[0] / (5.0 + 1e-6))
    assert_close(out[1], g[1])
    assert isinstance(TrainState(g, {}, 0).k, int)
