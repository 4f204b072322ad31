"""Recording models that train differently than they predict (BatchNorm, dropout): the Recorder
notes each such module's mode at the step's training forward, keeps the running statistics in every
checkpoint, and logs the RNG state at the start of every training forward when dropout trains, so
that a step's dropout masks can be replayed; the logs survive a partial run and a resume; runs
recorded before these fields load with ``train_modes`` None."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import diffin
from diffin import _constants as C
from diffin._errors import PartialRunWarning, TrainModeError
from diffin._train_mode import TrainModeForward
from diffin.recording import restore_checkpoint

N, B = 24, 6


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g)


def ids_at(t: int) -> np.ndarray:
    return np.random.default_rng(10 + t).choice(N, size=B, replace=False).astype(np.int64)


def make(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net().double()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def steps_as_is(rec: diffin.Recorder, model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    """``n`` steps in whatever mode the model is in (no mode switch, no validation forward)."""
    X, Y = data()
    for t in range(n):
        nn.functional.cross_entropy(model(X[ids_at(t)]), Y[ids_at(t)]).backward()
        opt.step()
        opt.zero_grad()
        rec.step(ids_at(t))


def train(rec: diffin.Recorder, model: nn.Module, opt: torch.optim.Optimizer, steps: range,
          seen: dict[int, Any], fail_at: int | None = None) -> None:
    """The user loop: model.train(), one forward per step, a validation forward in eval mode between
    steps (ignored by the recorder). ``seen[t]``: the RNG state before the forward and its outputs."""
    X, Y = data()
    Xv = X[:4] + 1.0
    for t in steps:
        if t == fail_at:
            raise KeyboardInterrupt("stop")
        ids = ids_at(t)
        model.train()
        state = torch.get_rng_state()
        out = model(X[ids])
        seen[t] = (state, out.detach().clone())
        loss = nn.functional.cross_entropy(out, Y[ids])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(ids)
        model.eval()
        with torch.no_grad():
            model(Xv)


def test_modes_rng_and_buffers_replay_every_step(tmp_path: Path) -> None:
    model, opt = make()
    seen: dict[int, Any] = {}
    with diffin.Recorder(tmp_path / "r", model, opt, checkpoint_every=1) as rec:
        train(rec, model, opt, range(5), seen)
    run = diffin.load_run(tmp_path / "r")
    assert run.train_modes == {"bn": True, "drop": True}
    assert run.has_rng and run.cuda_rng_state(0) is None
    assert (tmp_path / "r" / C.RNG_LOG).stat().st_size == 5 * torch.get_rng_state().numel()
    X, _ = data()
    replay, _ = make()
    for t in range(5):
        assert run.rng_state(t).dtype == torch.uint8
        assert torch.equal(run.rng_state(t), seen[t][0])
        ck = run.load_checkpoint(t)
        assert int(ck.buffers["bn.num_batches_tracked"]) == t  # buffers in θ_0 and every checkpoint
        replay.load_state_dict({**ck.params, **ck.buffers})
        replay.train()
        torch.set_rng_state(run.rng_state(t))
        with torch.no_grad():
            assert torch.equal(replay(X[ids_at(t)]), seen[t][1])
        # the functional forward: masks captured from the recorded state, batch statistics recomputed
        fwd = TrainModeForward(replay, run.train_modes)
        pb = {**ck.params, **ck.buffers}
        masks = fwd.capture_masks(pb, X[ids_at(t)], run.rng_state(t))
        out, new = fwd(pb, X[ids_at(t)], None, masks)
        np.testing.assert_allclose(out.detach().numpy(), seen[t][1].numpy(), rtol=1e-12,
                                   atol=1e-12 * float(seen[t][1].abs().max()))
        nxt = run.load_checkpoint(t + 1).buffers
        for b in fwd.buffer_names:
            np.testing.assert_allclose(new[b].detach().numpy(), nxt[b].numpy(), rtol=1e-12, atol=1e-15)
    with pytest.raises(IndexError):
        run.rng_state(5)


def test_partial_run_and_resume_keep_the_logs_consistent(tmp_path: Path) -> None:
    path = tmp_path / "r"
    model, opt = make()
    seen: dict[int, Any] = {}
    with pytest.raises(KeyboardInterrupt), diffin.Recorder(path, model, opt, checkpoint_every=3) as rec:
        train(rec, model, opt, range(10), seen, fail_at=7)
    with pytest.warns(PartialRunWarning):
        run = diffin.load_run(path)
    assert run.n_steps == 6 and run.has_rng
    assert (path / C.RNG_LOG).stat().st_size == 6 * torch.get_rng_state().numel()  # cut at the checkpoint
    for t in range(6):
        assert torch.equal(run.rng_state(t), seen[t][0])
    del run
    model, opt = make(seed=5)
    start = restore_checkpoint(path, model, opt)
    assert start == 6
    with diffin.Recorder(path, model, opt, checkpoint_every=3, resume=True) as rec:
        train(rec, model, opt, range(start, 10), seen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartialRunWarning)
        run = diffin.load_run(path)
    assert run.n_steps == 10 and run.train_modes == {"bn": True, "drop": True}
    for t in range(10):
        assert torch.equal(run.rng_state(t), seen[t][0])


def test_a_killed_run_ignores_rng_states_past_its_checkpoint(tmp_path: Path) -> None:
    """A process killed mid-segment leaves RNG states past the last checkpoint: ignored on load."""
    path = tmp_path / "r"
    model, opt = make()
    seen: dict[int, Any] = {}
    rec = diffin.Recorder(path, model, opt, checkpoint_every=3)
    train(rec, model, opt, range(5), seen)
    rec._close_logs()  # as if killed: no close(), the manifest says step 3
    del rec
    with pytest.warns(PartialRunWarning):
        run = diffin.load_run(path)
    assert run.n_steps == 3 and (path / C.RNG_LOG).stat().st_size == 5 * torch.get_rng_state().numel()
    assert torch.equal(run.rng_state(2), seen[2][0])


def test_older_runs_and_models_without_train_mode_layers(tmp_path: Path) -> None:
    model, opt = make()
    with diffin.Recorder(tmp_path / "r", model, opt, checkpoint_every=2) as rec:
        train(rec, model, opt, range(3), {})
    m = json.loads((tmp_path / "r" / C.MANIFEST).read_text())
    del m["train_modes"], m["rng_states"]  # as written before these fields
    (tmp_path / "r" / C.MANIFEST).write_text(json.dumps(m))
    run = diffin.load_run(tmp_path / "r")
    assert run.train_modes is None and not run.has_rng
    with pytest.raises(diffin._errors.UnsupportedMethodError, match="no RNG states"):
        run.rng_state(0)

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 3)).double()
    o = torch.optim.SGD(plain.parameters(), lr=0.1)
    with diffin.Recorder(tmp_path / "p", plain, o) as rec:
        steps_as_is(rec, plain, o, 2)
    run = diffin.load_run(tmp_path / "p")
    assert run.train_modes == {} and not run.has_rng and not (tmp_path / "p" / C.RNG_LOG).exists()


def test_eval_mode_training_records_no_rng(tmp_path: Path) -> None:
    """A loop training with BatchNorm and dropout frozen (model.eval()) records their eval modes."""
    model, opt = make()
    model.eval()
    with diffin.Recorder(tmp_path / "r", model, opt) as rec:
        steps_as_is(rec, model, opt, 3)
    run = diffin.load_run(tmp_path / "r")
    assert run.train_modes == {"bn": False, "drop": False} and not run.has_rng


def test_several_training_forwards_per_step_are_refused(tmp_path: Path) -> None:
    model, opt = make()
    X, Y = data()
    model.train()
    with pytest.raises(TrainModeError, match="2 forwards in training mode"), \
            diffin.Recorder(tmp_path / "r", model, opt) as rec:
        ids = ids_at(0)
        for part in (ids[:3], ids[3:]):  # gradient accumulation over two micro-batches
            (nn.functional.cross_entropy(model(X[part]), Y[part]) / 2).backward()
        opt.step()
        rec.step([ids[:3], ids[3:]])


def test_a_change_of_modes_is_refused(tmp_path: Path) -> None:
    model, opt = make()
    X, Y = data()
    with pytest.raises(TrainModeError, match="drop: train -> eval"), \
            diffin.Recorder(tmp_path / "r", model, opt) as rec:
        for t in range(3):
            model.train()
            if t == 2:
                model.drop.eval()
            nn.functional.cross_entropy(model(X[ids_at(t)]), Y[ids_at(t)]).backward()
            opt.step()
            opt.zero_grad()
            rec.step(ids_at(t))


def test_resume_with_other_modes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r"
    model, opt = make()
    with pytest.raises(KeyboardInterrupt), diffin.Recorder(path, model, opt, checkpoint_every=2) as rec:
        train(rec, model, opt, range(5), {}, fail_at=3)
    model, opt = make()
    start = restore_checkpoint(path, model, opt)
    X, Y = data()
    with pytest.raises(TrainModeError, match="bn: train -> eval"), \
            diffin.Recorder(path, model, opt, checkpoint_every=2, resume=True) as rec:
        model.train()
        model.bn.eval()  # frozen statistics after the restart: not the recorded run
        nn.functional.cross_entropy(model(X[ids_at(start)]), Y[ids_at(start)]).backward()
        opt.step()
        rec.step(ids_at(start))
