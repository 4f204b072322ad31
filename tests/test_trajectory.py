"""The trajectory layer (diffin.trajectory.Trajectory): per-group hyper-parameters and learning
rates laid out per coordinate, checkpoint states, replay under a memory budget, frozen states,
and what the sweep asks of it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import diffin
from _tiny import assert_close, record, record_loop
from diffin._data import DataSource
from diffin._errors import UnsupportedOptimizerError
from diffin._functional import FlatModel
from diffin.trajectory import Trajectory, check_rule, optimizer_groups


def _traj(tiny, memory_mb: float = 1024.0) -> Trajectory:
    run = diffin.load_run(tiny.run)
    fm = FlatModel(tiny.make(), tiny.loss, run.trainable)
    return Trajectory(run, fm, DataSource((tiny.X, tiny.Y), torch.float64, torch.device("cpu")), memory_mb)


def _two_groups(m, wd_w=0.1, lr_w=0.02, lr_b=0.05):
    w = [p for n, p in m.named_parameters() if n.endswith("weight")]
    b = [p for n, p in m.named_parameters() if n.endswith("bias")]
    return [{"params": w, "weight_decay": wd_w, "lr": lr_w}, {"params": b, "weight_decay": 0.0, "lr": lr_b}]


def test_group_settings_become_per_coordinate_vectors(tmp_path):
    tiny = record_loop(tmp_path / "r", make_opt=lambda m: torch.optim.AdamW(_two_groups(m)),
                       scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5))
    traj = _traj(tiny)
    fm, run = traj.fm, traj.run
    is_w = torch.cat([torch.full((n,), name.endswith("weight")) for name, n in zip(fm.spec.names, fm.spec.numels)])
    wd = traj.rule.hyper["weight_decay"]
    w = is_w.double()
    assert_close(wd, 0.1 * w)
    assert traj.rule.hyper["decoupled"] is True and traj.rule.hyper["beta1"] == 0.9
    for t in (0, 3, 5):
        lr = traj.lr(t)
        assert_close(lr, run.group_lrs[t, 0] * w + run.group_lrs[t, 1] * (1 - w))
    assert run.group_lrs[0, 0] == 0.02 and run.group_lrs[2, 0] == 0.01  # the schedule was recorded


def test_one_group_gives_scalars_and_sgd_needs_no_gradient_in_its_adjoint(tmp_path):
    tiny = record(tmp_path / "r", opt_kw={"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2})
    traj = _traj(tiny)
    assert isinstance(traj.lr(0), float) and traj.rule.hyper["momentum"] == 0.9
    assert not traj.needs_gradient
    clipped = record_loop(tmp_path / "c", make_opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.1), clip=0.5)
    assert _traj(clipped).needs_gradient
    adam = record_loop(tmp_path / "a", make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=0.01))
    assert _traj(adam).needs_gradient


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_replay_under_a_small_memory_budget_yields_the_same_states(tmp_path, opt):
    make = ((lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)) if opt == "sgd"
            else (lambda m: torch.optim.Adam(m.parameters(), lr=0.01)))
    tiny = record_loop(tmp_path / "r", make_opt=make, epochs=4, every=12)  # segments of 12 steps
    full, small = _traj(tiny), _traj(tiny)
    P = full.fm.num_params
    small.memory_mb = 8 * P * 8 * 4 / 2**20  # room for about 8 states: anchors and stretches
    a = list(full.replay_reversed(0, 12, with_grads=True))
    b = list(small.replay_reversed(0, 12, with_grads=True))
    assert [t for t, _, _ in a] == list(range(11, -1, -1)) == [t for t, _, _ in b]
    for (_, sa, ga), (_, sb, gb) in zip(a, b):
        assert_close(sb.theta, sa.theta)
        assert_close(gb, ga)
        assert sa.k == sb.k and sorted(sa.opt) == sorted(sb.opt)
    assert full.drift < 1e-12 and small.drift < 1e-12


def test_frozen_state_keeps_the_checkpoint_and_creates_missing_buffers(tmp_path):
    tiny = record(tmp_path / "r", opt_kw={"lr": 0.05, "momentum": 0.9})
    traj = _traj(tiny)
    at = traj.state(0)
    assert at.opt == {} and at.k == 0  # SGD's buffer does not exist before the first step
    assert traj.frozen_state(at, 0, 0) is at
    later = traj.frozen_state(at, 2, 0)
    assert torch.equal(later.theta, at.theta) and later.k == 0
    assert torch.equal(later.opt["momentum_buffer"], torch.zeros_like(at.theta))
    mid = traj.state(3)
    assert mid.k == 3 and "momentum_buffer" in mid.opt


def test_sgd_sweeps_compute_no_extra_gradient(tmp_path, monkeypatch):
    """The SGD sweep computes no gradient beyond the replay's: the exact sweep takes the replay's
    gradients only (one per step, each with its graph kept, so the transpose builds no gradient of
    its own: 2 passes per step, not 3), the frozen sweep none; Adam's frozen sweep one per step."""
    calls = {"n": 0, "graphs": 0}
    real, real_graph, real_build = Trajectory.gradient, Trajectory.graph_step, FlatModel.grad_graph

    def counting(self, *a, **kw):
        calls["n"] += 1
        return real(self, *a, **kw)

    def counting_graph(self, *a, **kw):
        calls["n"] += 1
        return real_graph(self, *a, **kw)

    def counting_build(self, *a, **kw):
        calls["graphs"] += 1
        return real_build(self, *a, **kw)

    monkeypatch.setattr(Trajectory, "gradient", counting)
    monkeypatch.setattr(Trajectory, "graph_step", counting_graph)
    monkeypatch.setattr(FlatModel, "grad_graph", counting_build)
    sgd = record(tmp_path / "s", opt_kw={"lr": 0.05, "momentum": 0.9})
    steps = diffin.load_run(sgd.run).n_steps
    for method, want in (("diffin-exact", steps), ("diffin-frozen", 0)):
        calls.update(n=0, graphs=0)
        sgd.score(method, hvp="exact")
        assert calls["n"] == want, method
        assert calls["graphs"] == steps, method  # exact HVPs: one graph per step, the replay's where it replays
    adam = record_loop(tmp_path / "a", make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=0.01))
    calls["n"] = 0
    adam.score("diffin-frozen", hvp="exact")
    assert calls["n"] == diffin.load_run(adam.run).n_steps


def test_runs_recorded_without_their_differing_groups_are_refused(tmp_path, monkeypatch):
    tiny = record(tmp_path / "r")
    run = diffin.load_run(tiny.run)
    assert len(optimizer_groups(run)) == 1
    monkeypatch.setattr(run, "optimizer", dataclasses.replace(run.optimizer, groups=[], uniform_groups=False))
    with pytest.raises(UnsupportedOptimizerError, match="record it again"):
        check_rule(run)
    with pytest.raises(diffin.UnsupportedMethodError, match="record it again"):
        diffin.influence(run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv),
                         progress=False)


def test_batches_are_read_once_within_the_cache_budget(tmp_path, monkeypatch):
    """A replay reads a segment's batches forward and the sweep backward: the second read comes
    from the cache; beyond its byte budget the oldest batches go first."""
    tiny = record(tmp_path / "run", n=24, batch=6, epochs=2, every=4)
    run = diffin.load_run(tiny.run)
    fm = FlatModel(tiny.make(), tiny.loss)
    src = DataSource((tiny.X, tiny.Y), fm.dtype, fm.device)
    reads = []
    get = src.get
    monkeypatch.setattr(src, "get", lambda ids: reads.append(len(ids)) or get(ids))
    traj = Trajectory(run, fm, src)
    first = [traj.batch(t) for t in range(run.n_steps)]
    again = [traj.batch(t) for t in reversed(range(run.n_steps))]
    assert len(reads) == run.n_steps
    assert all(a[1] is b[1] for a, b in zip(first, reversed(again)))
    one = first[0][1].numel() * first[0][1].element_size() + first[0][2].numel() * first[0][2].element_size()
    monkeypatch.setattr("diffin.trajectory._trajectory.BATCH_CACHE_BYTES", 3 * one)
    traj = Trajectory(run, fm, src)
    reads.clear()
    for t in range(run.n_steps):
        traj.batch(t)
    traj.batch(run.n_steps - 1)  # cached
    traj.batch(0)  # evicted long ago: read again
    assert len(reads) == run.n_steps + 1
    ids, x, y = traj.batch(0)
    assert torch.equal(x, tiny.X[torch.as_tensor(ids)]) and torch.equal(y, tiny.Y[torch.as_tensor(ids)])


def test_kept_graphs_under_any_memory_budget_give_the_same_scores(tmp_path, monkeypatch):
    """The replay keeps the gradient graphs of as many of a segment's last steps as fit in
    replay_memory_mb (all, some or none); the scores are the same to rounding whatever fits."""
    kept = {"n": 0}
    real = Trajectory.graph_step

    def counting(self, *a, **kw):
        kept["n"] += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(Trajectory, "graph_step", counting)
    tiny = record(tmp_path / "r", opt_kw={"lr": 0.05, "momentum": 0.9}, every=6)
    ref = tiny.score("diffin-exact", hvp="exact").scores
    counts = set()
    for mb in (0.004, 0.008, 0.012, 0.02, 0.05):
        kept["n"] = 0
        assert_close(tiny.score("diffin-exact", hvp="exact", replay_memory_mb=mb).scores, ref)
        counts.add(kept["n"])
    assert len(counts) > 2  # none, some and all kept (each segment's first step always builds one, to measure it)
