"""TRAK's ensemble of independently recorded runs (``trak`` option ``runs``): the final checkpoint
of each listed run, one model id per run, each run checked against the adapter's run.

The ensemble selection and its checks run anywhere; the end-to-end test needs traker
(``pip install traker``) and skips without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffin
from _tiny import record_sgd_order
from diffin._errors import ConfigError, DataMismatchError, ParameterMismatchError
from diffin.peers import run_peer
from diffin.peers._base import PeerInputs
from diffin.peers._trak import _DEFAULTS, ensemble

N, D, C, Q = 40, 5, 3, 12
STEPS, EVERY, BATCH = 6, 3, 8


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    centres = 1.5 * torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N + Q,), generator=g)
    x = centres[y] + torch.randn(N + Q, D, generator=g, dtype=torch.float64)
    return x[:N], y[:N], x[N:], y[N:]


def mlp(seed: int = 1, hidden: int = 4, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, C)).to(dtype)


def _record(path: Path, model: nn.Module, *, steps: int = STEPS, n_train: int = N) -> diffin.Run:
    """SGD on a fixed batch order (the same for every run), checkpoints every EVERY steps."""
    x, y, _, _ = _data()
    x = x.to(next(model.parameters()).dtype)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(0)).repeat(2)
    return record_sgd_order(path, model, x, y, order, loss=loss_fn, lr=0.3, steps=steps, batch=BATCH, every=EVERY,
                            n_train=n_train)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``a``: 6 steps from init seed 1; ``head``: the first 3 of the same steps (its final model is
    ``a``'s checkpoint 3); ``b``: 6 steps from init seed 2."""
    root = tmp_path_factory.mktemp("trak-runs")
    return {"a": _record(root / "a", mlp(1)), "head": _record(root / "head", mlp(1), steps=EVERY),
            "b": _record(root / "b", mlp(2)), "root": root}


def _inputs(run: diffin.Run) -> PeerInputs:
    x, y, xv, yv = _data()
    return PeerInputs(run, mlp, loss_fn, (x, y), (xv, yv))


def _opt(**kw) -> dict:
    return {**_DEFAULTS, **kw}


def test_runs_are_the_final_checkpoints_in_the_order_given(runs):
    inp = _inputs(runs["a"])
    loaders, described = ensemble(inp, _opt(runs=[str(runs["b"].path), runs["a"]]), mlp())
    assert len(loaders) == 2 and described.startswith("final checkpoints of runs")
    for loader, run in zip(loaders, (runs["b"], runs["a"]), strict=True):
        ck = run.load_checkpoint(run.n_steps)
        got = loader()
        assert list(got) == list(mlp().state_dict())
        for k, v in got.items():
            assert torch.equal(v, ck.params[k])
    # the two runs start from other initialisations: their final models differ
    assert not torch.equal(loaders[0]()["0.weight"], loaders[1]()["0.weight"])
    # n_checkpoints=k: the last k segment ends of each run, run by run
    loaders, described = ensemble(inp, _opt(runs=[runs["a"], runs["head"], runs["b"]], n_checkpoints=2), mlp())
    want = [(runs["a"], 3), (runs["a"], 6), (runs["head"], 3), (runs["b"], 3), (runs["b"], 6)]
    assert len(loaders) == len(want) and "the last 2 segment ends" in described
    for loader, (run, step) in zip(loaders, want, strict=True):
        ck = run.load_checkpoint(step)
        assert all(torch.equal(v, ck.params[k]) for k, v in loader().items())


def test_default_ensemble_is_unchanged(runs):
    """Without ``runs``: the closing checkpoint of every segment of the adapter's run."""
    inp = _inputs(runs["a"])
    loaders, described = ensemble(inp, _opt(), mlp())
    assert described == "checkpoints [3, 6]"
    for loader, step in zip(loaders, (3, 6), strict=True):
        want = inp.state_dict(step)
        assert all(torch.equal(v, want[k]) for k, v in loader().items())
    loaders, described = ensemble(inp, _opt(n_checkpoints=1), mlp())
    assert described == "checkpoints [6]" and len(loaders) == 1


def test_bad_runs_are_refused_by_name(runs):
    inp = _inputs(runs["a"])
    a, b = str(runs["a"].path), str(runs["b"].path)
    with pytest.raises(ConfigError, match="with runs, use n_checkpoints"):
        ensemble(inp, _opt(runs=[a, b], checkpoints=[3]), mlp())
    with pytest.raises(ConfigError, match="n_checkpoints must be >= 1"):
        ensemble(inp, _opt(runs=[a, b], n_checkpoints=0), mlp())
    for given in (a, [], runs["a"]):
        with pytest.raises(ConfigError, match="non-empty list of run folders"):
            ensemble(inp, _opt(runs=given), mlp())
    with pytest.raises(ConfigError, match="listed twice"):
        ensemble(inp, _opt(runs=[a, b, a]), mlp())
    root = runs["root"]
    wide = _record(root / "wide", mlp(1, hidden=6))
    with pytest.raises(ParameterMismatchError, match="shape differs"):
        ensemble(inp, _opt(runs=[a, str(wide.path)]), mlp())
    single = _record(root / "single", mlp(1, dtype=torch.float32))
    with pytest.raises(ConfigError, match="recorded in torch.float32"):
        ensemble(inp, _opt(runs=[a, str(single.path)]), mlp())
    frozen_model = mlp(1)
    frozen_model[0].bias.requires_grad_(False)
    frozen = _record(root / "frozen", frozen_model)
    with pytest.raises(ParameterMismatchError, match="same trainable parameters"):
        ensemble(inp, _opt(runs=[a, str(frozen.path)]), mlp())
    other_data = _record(root / "other-data", mlp(1), n_train=2 * N)
    with pytest.raises(DataMismatchError, match="n_train=80"):
        ensemble(inp, _opt(runs=[a, str(other_data.path)]), mlp())


def test_trak_over_runs_equals_trak_over_the_same_models_as_checkpoints(runs):
    """``runs=[head, a]`` hands TRAK the same two models, with the same model ids, as
    ``checkpoints=[3, 6]`` of ``a`` (``head`` is ``a`` stopped at step 3): the same scores, up to
    traker's float32 rounding. ``runs=[a]`` is ``checkpoints=[6]``; adding the run ``b`` changes
    the scores."""
    pytest.importorskip("trak")
    a, head, b = runs["a"], runs["head"], runs["b"]
    assert all(torch.equal(head.load_checkpoint(EVERY).params[k], a.load_checkpoint(EVERY).params[k])
               for k in a.trainable)
    x, y, xv, yv = _data()
    common = dict(model_factory=mlp, loss_fn=loss_fn, train=(x, y), target=(xv, yv), proj_dim=16)
    u = float(torch.finfo(torch.float32).eps)

    def close(actual, ref):
        np.testing.assert_allclose(actual, ref, rtol=u**0.5, atol=1e4 * u * float(np.abs(ref).max()))

    as_ckpts = run_peer("trak", run=a, checkpoints=[EVERY, STEPS], **common)
    as_runs = run_peer("trak", run=a, runs=[str(head.path), str(a.path)], **common)
    close(as_runs.scores, as_ckpts.scores)
    assert "final checkpoints of runs" in as_runs.notes and str(head.path) in as_runs.notes
    close(run_peer("trak", run=b, runs=[str(a.path)], **common).scores,
          run_peer("trak", run=a, checkpoints=[STEPS], **common).scores)
    with_b = run_peer("trak", run=a, runs=[str(a.path), str(b.path)], **common).scores
    assert with_b.shape == (N,) and np.all(np.isfinite(with_b))
    assert np.abs(with_b - as_ckpts.scores).max() > 1e-2 * np.abs(as_ckpts.scores).max()
