"""Models that train differently than they predict (docs/method.md §4.8), float64:

* the replay of a BatchNorm / dropout run lands on the recorded checkpoints (drift at rounding level),
  and scoring it in eval mode (the old behaviour) does not;
* the sweep equals the metagradient through the unrolled train-mode run (weighted batch statistics,
  running statistics in the state, recorded dropout masks) for BatchNorm1d, BatchNorm2d and dropout;
* replayed removal takes the sample out of its batches' statistics, and the sweep tracks it;
* a run recorded without modes is scored in eval mode with a TrainModeWarning; a dropout run without
  RNG states is a named error.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import diffin
from _tiny import assert_close, ce
from diffin import _constants as C
from diffin._data import DataSource
from diffin._functional import FlatModel
from diffin._reference import metagradient
from diffin.groundtruth import replay_removal
from diffin.recording.run import load_run
from diffin.trajectory import Trajectory

N, D, K = 24, 6, 3


def _mlp_bn(dropout: float = 0.0, bn: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(D, 5)]
    if bn:
        layers.append(nn.BatchNorm1d(5))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(5, K))
    return nn.Sequential(*layers)


def _cnn_bn() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 3, 2)), nn.Conv2d(1, 2, (2, 1)), nn.BatchNorm2d(2), nn.Tanh(),
                         nn.Dropout2d(0.3), nn.Flatten(), nn.Linear(8, K))


BUILDERS = {
    "bn1d": lambda: _mlp_bn(),
    "bn1d-dropout": lambda: _mlp_bn(dropout=0.3),
    "dropout": lambda: _mlp_bn(dropout=0.3, bn=False),
    "bn2d-dropout2d": _cnn_bn,
}


def record_bn(path: Path, kind: str, *, batch: int = 6, epochs: int = 2, lr: float = 0.1, momentum: float = 0.0,
              every: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    Y = torch.randint(0, K, (N,), generator=g)
    Xv = torch.randn(10, D, generator=g, dtype=torch.float64)
    Yv = torch.randint(0, K, (10,), generator=g)

    def make() -> nn.Module:
        torch.manual_seed(1)
        return BUILDERS[kind]().double()

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    torch.manual_seed(123)  # the loop's own RNG stream (dropout masks)
    with diffin.Recorder(path, model, optimizer=opt, checkpoint_every=every, n_train=N) as rec:
        for _ in range(epochs):
            perm = torch.randperm(N, generator=g)
            for s in range(0, N, batch):
                b = perm[s : s + batch]
                model.train()
                loss = ce(model(X[b]), Y[b]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.step(b)
                model.eval()
                with torch.no_grad():
                    model(Xv)  # an evaluation forward between steps: ignored by the recorder
    return make, (X, Y), (Xv, Yv)


def _target(fm: FlatModel, val):
    x, y = val

    def f(theta, stats=None):
        return fm.batch_loss(theta, x, y, stats=stats)

    return f


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_replay_of_a_train_mode_run_has_rounding_drift(tmp_path, kind):
    make, train, val = record_bn(tmp_path / "run", kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error", diffin.ReplayDriftWarning)
        res = diffin.score(tmp_path / "run", make(), ce, train=train, target=val, method="diffin-exact",
                           hvp="exact", progress=False)
    assert res.diagnostics["replay_drift"] < 1e-10


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sweep_equals_metagradient_through_the_train_mode_run(tmp_path, kind, momentum):
    make, train, val = record_bn(tmp_path / "run", kind, momentum=momentum)
    got = diffin.score(tmp_path / "run", make(), ce, train=train, target=val, method="diffin-exact",
                       hvp="exact", progress=False).scores
    run = load_run(tmp_path / "run")
    fm = FlatModel(make(), ce, trainable=run.trainable)
    src = DataSource(train, fm.dtype, fm.device)
    Trajectory(run, fm, src)  # enables the recorded modes on fm
    ref = metagradient(run, fm, src, _target(fm, val))
    assert_close(got, ref, rtol=1e-8, floor=1e-10)
    if "bn" not in kind:  # no running statistics: central differences serve the same sweep
        fd = diffin.score(tmp_path / "run", make(), ce, train=train, target=val, method="diffin-exact",
                          hvp="central", progress=False).scores
        assert_close(fd, ref, computation="fd")


@pytest.mark.parametrize("kind", ["bn1d", "bn2d-dropout2d"])
def test_sweep_tracks_replayed_removal_from_the_batch_statistics(tmp_path, kind):
    make, train, val = record_bn(tmp_path / "run", kind, lr=0.05)
    res = diffin.score(tmp_path / "run", make(), ce, train=train, target=val, method="diffin", progress=False)
    truth = replay_removal(tmp_path / "run", make(), ce, train=train, target=val, remove=list(range(N)),
                           progress=False)
    assert np.corrcoef(res.scores, truth)[0, 1] > 0.95
    nobody = replay_removal(tmp_path / "run", make(), ce, train=train, target=val, remove=[[]], progress=False)
    assert np.all(nobody == 0)
    # TracIn's every-step form runs in the recorded modes too
    tr = diffin.score(tmp_path / "run", make(), ce, train=train, target=val, method="tracin-every-step",
                      progress=False)
    assert np.all(np.isfinite(tr.scores))


def test_self_and_pairwise_targets_read_the_running_statistics(tmp_path):
    make, train, val = record_bn(tmp_path / "run", "bn1d")
    pair = diffin.score(tmp_path / "run", make(), ce, train=train, target=val, method="diffin-exact", hvp="exact",
                        pairwise=True, progress=False).scores
    mean = diffin.score(tmp_path / "run", make(), ce, train=train, target=val, method="diffin-exact", hvp="exact",
                        progress=False).scores
    assert_close(pair.mean(axis=1), mean)
    own = diffin.score(tmp_path / "run", make(), ce, train=train, target="self", method="diffin-exact", hvp="exact",
                       progress=False).scores
    assert own.shape == (N,) and np.all(np.isfinite(own))


def _strip_modes(run: Path) -> None:
    """Make the run look like one recorded by an older diffin (no modes, no RNG states)."""
    path = run / C.MANIFEST
    m = json.loads(path.read_text())
    m.pop("train_modes", None)
    m.pop("rng_states", None)
    path.write_text(json.dumps(m))


def test_older_runs_are_scored_in_eval_mode_with_a_warning(tmp_path):
    make, train, val = record_bn(tmp_path / "run", "bn1d")
    _strip_modes(tmp_path / "run")
    with pytest.warns(diffin.TrainModeWarning, match="eval mode"), pytest.warns(diffin.ReplayDriftWarning):
        res = diffin.score(tmp_path / "run", make(), ce, train=train, target=val, method="diffin-exact",
                           progress=False)
    assert res.diagnostics["replay_drift"] > 1e-3  # the eval-mode replay is not the trained run


def test_dropout_without_rng_states_is_a_named_error(tmp_path):
    make, train, val = record_bn(tmp_path / "run", "dropout")
    path = tmp_path / "run" / C.MANIFEST
    m = json.loads(path.read_text())
    m.pop("rng_states", None)
    path.write_text(json.dumps(m))
    with pytest.raises(diffin.TrainModeError, match="RNG"):
        diffin.score(tmp_path / "run", make(), ce, train=train, target=val, method="diffin-exact", progress=False)
