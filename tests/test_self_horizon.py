"""Horizon self-influence (diffin.self_influence, docs/method.md §4.11): in float64 on tiny runs, the
exact path equals an autograd loop over the unrolled steps (each use of each sample: weight ω_z on
step t, its own share read H + 1 steps later, −∂/∂ω_z), for H = 0, H > 0 and the whole run; the
sketched H = 0 estimate is unbiased; refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import diffin
from _tiny import assert_close, record, record_loop
from diffin._data import DataSource
from diffin._functional import FlatModel
from diffin.recording.run import load_run
from diffin.trajectory import TrainState, Trajectory


def unrolled_reference(run_dir: Path, make, loss, train, horizon: int) -> np.ndarray:
    """Σ over uses (t, member i of B_t) of −∂ℓ_i^{B_t}(θ_{t+H+1})/∂ω_i, ω_i the member's weight in step
    t's batch loss, by autograd through the unrolled steps t … t+H (θ_t from an exact replay)."""
    run = load_run(run_dir)
    fm = FlatModel(make(), loss, trainable=run.trainable)
    traj = Trajectory(run, fm, DataSource(train, fm.dtype, fm.device))
    T = run.n_steps
    states = [traj.state(0)]
    for t in range(T):
        states.append(traj.step(states[-1], t)[0])
    out = np.zeros(len(traj.train))
    for t in range(T):
        ids, x, y = traj.batch(t)
        end = min(t + horizon + 1, T)
        for i in range(len(ids)):
            w = torch.ones(len(ids), dtype=torch.float64, requires_grad=True)
            with torch.enable_grad():
                st = states[t]
                th = st.theta.detach().clone().requires_grad_(True)
                state = TrainState(th, dict(st.opt), st.k)
                (g,) = torch.autograd.grad(fm.batch_loss(th, x, y, w), th, create_graph=True)
                state = traj.advance(state, t, g)
                for u in range(t + 1, end):
                    _, xu, yu = traj.batch(u)
                    (g,) = torch.autograd.grad(fm.batch_loss(state.theta, xu, yu), state.theta, create_graph=True)
                    state = traj.advance(state, u, g)
                f = fm.losses(state.theta, x, y)[i]
                (dw,) = torch.autograd.grad(f, w)
            out[ids[i]] += -float(dw[i])
    return out


@pytest.mark.parametrize("horizon", [0, 2, 100])
def test_exact_equals_unrolled_autograd_momentum(tmp_path: Path, horizon: int) -> None:
    t = record(tmp_path / "run", n=12, batch=4, epochs=2, opt_kw={"lr": 0.2, "momentum": 0.9, "weight_decay": 1e-3})
    got = diffin.self_influence(t.run, t.make(), t.loss, train=(t.X, t.Y), horizon=horizon, progress=False)
    ref = unrolled_reference(t.run, t.make, t.loss, (t.X, t.Y), horizon)
    assert_close(got.scores, ref)
    assert got.horizon == horizon and got.dim is None
    assert np.array_equal(np.sort(np.unique(got.step)), np.arange(3))  # one epoch of 3 steps then another


@pytest.mark.parametrize("horizon", [0, 1])
def test_exact_equals_unrolled_autograd_batch_loss(tmp_path: Path, horizon: int) -> None:
    from test_batch_loss import CLIP, record_clip

    make, train, _ = record_clip(tmp_path / "run", momentum=0.5)
    got = diffin.self_influence(tmp_path / "run", make(), CLIP, train=train, horizon=horizon, progress=False)
    assert_close(got.scores, unrolled_reference(tmp_path / "run", make, CLIP, train, horizon))


def test_whole_run_horizon_is_the_whole_run_self_influence_for_one_epoch(tmp_path: Path) -> None:
    """One epoch with batches in id order: H ≥ T − 1 is the exact sweep's self-influence (the same
    target: z's loss at θ_T; for a per-sample loss the batch context does not matter)."""
    t = record(tmp_path / "run", n=12, batch=4, epochs=1, opt_kw={"lr": 0.2, "momentum": 0.9})
    got = diffin.self_influence(t.run, t.make(), t.loss, train=(t.X, t.Y), horizon=10**6, progress=False)
    ref = t.score("diffin-exact", hvp="exact", target="self").scores
    assert_close(got.scores, ref)


@pytest.mark.parametrize("opt", ["sgd-momentum", "adamw"])
def test_sketch_is_unbiased(tmp_path: Path, opt: str) -> None:
    """The K-direction estimate at H = 0 averages to the exact value over seeds (within 5 standard
    errors of the seeds' mean, per sample), and its spread shrinks like 1/√K; for AdamW the rule's
    coefficient vector c_t carries the elementwise preconditioner."""
    if opt == "adamw":
        t = record_loop(tmp_path / "run", lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1),
                        n=12, batch=4)
    else:
        t = record(tmp_path / "run", n=12, batch=4, epochs=2, opt_kw={"lr": 0.2, "momentum": 0.9})
    exact = diffin.self_influence(t.run, t.make(), t.loss, train=(t.X, t.Y), progress=False).scores
    S = 200
    est = np.stack([diffin.self_influence(t.run, t.make(), t.loss, train=(t.X, t.Y), dim=8, seed=s,
                                          progress=False).scores for s in range(S)])
    se = est.std(0) / np.sqrt(S)
    assert np.all(np.abs(est.mean(0) - exact) <= 5 * se + 1e-12)
    wide = np.stack([diffin.self_influence(t.run, t.make(), t.loss, train=(t.X, t.Y), dim=128, seed=s,
                                           progress=False).scores for s in range(20)])
    assert np.median(wide.std(0) / est.std(0)) < 0.5  # √(8/128) = 0.25


def test_standardized_is_a_within_batch_z_score(tmp_path: Path) -> None:
    t = record(tmp_path / "run", n=12, batch=4, epochs=1)
    got = diffin.self_influence(t.run, t.make(), t.loss, train=(t.X, t.Y), progress=False)
    run = load_run(t.run)
    for s in range(run.n_steps):
        ids = run.batch(s)
        z = (got.scores[ids] - got.scores[ids].mean()) / got.scores[ids].std()
        assert_close(got.standardized[ids], z)


def test_refusals(tmp_path: Path) -> None:
    t = record(tmp_path / "run", n=12, batch=4, epochs=1)
    kw = dict(train=(t.X, t.Y), progress=False)
    with pytest.raises(diffin.ConfigError):
        diffin.self_influence(t.run, t.make(), t.loss, horizon=-1, **kw)
    with pytest.raises(diffin.ConfigError):
        diffin.self_influence(t.run, t.make(), t.loss, horizon=2, dim=4, **kw)
    with pytest.raises(diffin.ConfigError):
        diffin.self_influence(t.run, t.make(), t.loss, dim=0, **kw)
    u = record(tmp_path / "noids", n=12, batch=4, epochs=1, ids=False)
    with pytest.raises(diffin.UnsupportedMethodError):
        diffin.self_influence(u.run, u.make(), u.loss, train=(u.X, u.Y), progress=False)
    c = record_loop(tmp_path / "clip", lambda m: torch.optim.SGD(m.parameters(), lr=0.1), clip=0.5)
    with pytest.raises(diffin.ConfigError, match="clipping"):
        diffin.self_influence(c.run, c.make(), c.loss, train=(c.X, c.Y), dim=4, progress=False)
    exact = diffin.self_influence(c.run, c.make(), c.loss, train=(c.X, c.Y), progress=False)  # exact: clipping ok
    assert np.isfinite(exact.scores).all()


@pytest.mark.parametrize("horizon", [0, 1])
def test_steps_restrict_the_uses(tmp_path: Path, horizon: int) -> None:
    """``steps=(s0, s1)``: the same terms for the samples of those batches, nothing for the others."""
    t = record(tmp_path / "run", n=12, batch=4, epochs=2)
    kw = dict(train=(t.X, t.Y), horizon=horizon, progress=False)
    full = diffin.self_influence(t.run, t.make(), t.loss, **kw)
    part = diffin.self_influence(t.run, t.make(), t.loss, steps=(1, 4), **kw)
    run = load_run(t.run)
    want = np.zeros(12)
    for s in range(1, 4):
        ids = run.batch(s)
        ref = diffin.self_influence(t.run, t.make(), t.loss, steps=(s, s + 1), **kw).scores
        want[ids] += ref[ids]
    assert_close(part.scores, want)
    assert_close(full.scores, sum(diffin.self_influence(t.run, t.make(), t.loss, steps=(s, s + 1), **kw).scores
                                  for s in range(run.n_steps)))
    with pytest.raises(diffin.ConfigError):
        diffin.self_influence(t.run, t.make(), t.loss, steps=(3, 3), **kw)


@pytest.mark.parametrize("horizon", [0, 1])
def test_exact_equals_unrolled_autograd_adam_with_clipping(tmp_path: Path, horizon: int) -> None:
    t = record_loop(tmp_path / "run", lambda m: torch.optim.Adam(m.parameters(), lr=0.05), clip=0.5, n=12, batch=4)
    got = diffin.self_influence(t.run, t.make(), t.loss, train=(t.X, t.Y), horizon=horizon, progress=False)
    assert_close(got.scores, unrolled_reference(t.run, t.make, t.loss, (t.X, t.Y), horizon))
