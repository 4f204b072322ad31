"""Recording the optimizers people train with: AdamW with two param groups (weight decay on
weights only, different learning rates), a cosine LambdaLR schedule, gradient clipping and
gradient accumulation; resume of an AdamW run; optimizers without a Diff-In rule."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import diffin
from _recording_loop import N_TRAIN, NAMES, batch_ids, make_data, make_model
from diffin import _constants as C
from diffin._errors import RecordingError, UnsupportedOptimizerError, UnsupportedOptimizerWarning
from diffin.recording import restore_checkpoint

WEIGHTS, BIASES = ["0.weight", "2.weight"], ["0.bias", "2.bias"]
STEPS, EVERY, CLIP = 9, 3, 0.5
STATE_KEYS = ("exp_avg", "exp_avg_sq")


def adamw(model: nn.Module) -> torch.optim.AdamW:
    """The usual recipe: weight decay on weights only; here the biases also get their own rate."""
    named = dict(model.named_parameters())
    return torch.optim.AdamW(
        [{"params": [named[n] for n in WEIGHTS], "weight_decay": 0.01},
         {"params": [named[n] for n in BIASES], "weight_decay": 0.0, "lr": 0.1}],
        lr=0.05, betas=(0.8, 0.99), eps=1e-7,
    )


def cosine(opt: torch.optim.Optimizer, start: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay over the run; a loop restarted at step ``start`` continues it."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * (t + start) / STEPS)))


def micro_batches(t: int) -> list[np.ndarray]:
    """Two equal-size micro-batches per step."""
    ids = np.random.default_rng(300 + t).choice(N_TRAIN, size=6, replace=False).astype(np.int64)
    return [ids[:3], ids[3:]]


def train(
    path: Path,
    *,
    model: nn.Module | None = None,
    opt: torch.optim.Optimizer | None = None,
    start: int = 0,
    fail_at: int | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """The user loop: AdamW, cosine schedule (stepped before ``rec.step``), accumulation over two
    micro-batches, ``clip_grad_norm_``. Returns what the optimizer used and held at every step."""
    model = make_model() if model is None else model
    opt = adamw(model) if opt is None else opt
    sched = cosine(opt, start)
    x, y = make_data()
    used: dict[int, list[float]] = {}
    states: dict[int, dict[str, Any]] = {}
    norms: list[float] = []
    with diffin.Recorder(path, model, opt, checkpoint_every=EVERY, clip_grad_norm=CLIP, n_train=N_TRAIN,
                         resume=start > 0, **kw) as rec:
        for t in range(start, STEPS):
            if t == fail_at:
                raise RuntimeError("the loop died")
            micro = micro_batches(t)
            opt.zero_grad()
            for ids in micro:
                (nn.functional.cross_entropy(model(x[ids]), y[ids]) / len(micro)).backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
            used[t] = [float(g["lr"]) for g in opt.param_groups]
            opt.step()
            sched.step()  # before rec.step: the recorder still records the rates the step used
            rec.step([torch.as_tensor(ids) for ids in micro])
            named = dict(model.named_parameters())
            states[t + 1] = {
                "params": {n: p.detach().clone() for n, p in named.items()},
                **{k: {n: opt.state[named[n]][k].clone() for n in NAMES} for k in STATE_KEYS},
                "step": {n: float(opt.state[named[n]]["step"]) for n in NAMES},
            }
    return {"model": model, "opt": opt, "used": used, "states": states, "norms": norms}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("adamw") / "run"
    return path, train(path)


def test_manifest_holds_every_param_group(recorded: tuple[Path, dict[str, Any]]) -> None:
    path, out = recorded
    run = diffin.load_run(path, out["model"], n_train=N_TRAIN)
    spec = run.optimizer
    assert spec.kind == "AdamW" and not spec.uniform_groups and not spec.assumed
    assert [g["params"] for g in spec.groups] == [WEIGHTS, BIASES]
    common = {"beta1": 0.8, "beta2": 0.99, "eps": 1e-7, "amsgrad": False, "maximize": False,
              "decoupled_weight_decay": True}
    for g, wd in zip(spec.groups, (0.01, 0.0)):
        assert {k: g["hyper"][k] for k in common} == common
        assert g["hyper"]["weight_decay"] == wd
        assert "lr" not in g["hyper"] and "initial_lr" not in g["hyper"] and "betas" not in g["hyper"]
    assert run.clip_grad_norm == CLIP and run.manifest["clip_grad_norm"] == CLIP
    assert run.format_version == C.FORMAT_VERSION == 3


def test_group_lrs_are_the_rates_each_step_used(recorded: tuple[Path, dict[str, Any]]) -> None:
    path, out = recorded
    run = diffin.load_run(path)
    want = np.array([out["used"][t] for t in range(STEPS)])
    assert run.group_lrs.shape == (STEPS, 2) and run.group_lrs.dtype == np.float64
    np.testing.assert_array_equal(run.group_lrs, want)
    np.testing.assert_array_equal(run.lrs, want[:, 0])
    assert not np.all(want[:, 0] == want[0, 0])  # the schedule moved the rates
    np.testing.assert_array_equal(want[:, 1], 2 * want[:, 0])  # the groups' own base rates
    assert (path / C.GROUP_LRS_LOG).stat().st_size == 8 * 2 * STEPS


def test_checkpoints_hold_adam_state(recorded: tuple[Path, dict[str, Any]]) -> None:
    path, out = recorded
    run = diffin.load_run(path)
    assert run.checkpoint_steps == [0, 3, 6, 9]
    ck0 = run.load_checkpoint(0)
    assert ck0.optimizer_state == {} and ck0.optimizer_step == 0 and ck0.momentum is None
    for s in run.checkpoint_steps[1:]:
        ck = run.load_checkpoint(s)
        assert sorted(ck.optimizer_state) == sorted(STATE_KEYS)
        for k in STATE_KEYS:
            assert sorted(ck.optimizer_state[k]) == sorted(NAMES)
            for n in NAMES:
                assert torch.equal(ck.optimizer_state[k][n], out["states"][s][k][n]), (s, k, n)
        assert ck.optimizer_step == s == out["states"][s]["step"]["0.weight"]
        assert ck.param_steps == dict.fromkeys(NAMES, s)
        for n in NAMES:
            assert torch.equal(ck.params[n], out["states"][s]["params"][n])
    assert [c["optimizer_state"] for c in run.manifest["checkpoints"]] == [[], *[sorted(STATE_KEYS)] * 3]


def test_clipping_and_accumulation(recorded: tuple[Path, dict[str, Any]]) -> None:
    path, out = recorded
    clipped = sum(n > CLIP for n in out["norms"])
    assert clipped > 0  # the threshold is active on this run
    run = diffin.load_run(path)
    for t in range(STEPS):
        np.testing.assert_array_equal(run.batch(t), np.concatenate(micro_batches(t)))
    assert run.batch_sizes == [6]


def test_resume_adamw_after_an_exception_equals_the_uninterrupted_run(
    recorded: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    ref_path, _ = recorded
    path = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the loop died"):
        train(path, fail_at=7)
    with pytest.warns(diffin.PartialRunWarning):
        assert diffin.load_run(path).n_steps == 6
    model = make_model(seed=5)  # other values everywhere: restore_checkpoint must bring them all
    opt = adamw(model)
    assert restore_checkpoint(path, model, opt) == 6
    for p in model.parameters():
        assert opt.state[p]["step"].dtype == torch.float32 and float(opt.state[p]["step"]) == 6
    train(path, model=model, opt=opt, start=6)
    run, ref = diffin.load_run(path), diffin.load_run(ref_path)
    assert run.complete and run.n_steps == STEPS and run.manifest["resumed_at"] == [6]
    np.testing.assert_array_equal(run.group_lrs, ref.group_lrs)
    for t in range(STEPS):
        np.testing.assert_array_equal(run.batch(t), ref.batch(t))
    for s in ref.checkpoint_steps:
        a, b = run.load_checkpoint(s), ref.load_checkpoint(s)
        assert a.optimizer_step == b.optimizer_step
        for n in NAMES:
            assert torch.equal(a.params[n], b.params[n]), (s, n)
            for k in b.optimizer_state:
                assert torch.equal(a.optimizer_state[k][n], b.optimizer_state[k][n]), (s, k, n)


def test_resume_refuses_adam_state_not_restored(tmp_path: Path) -> None:
    path = tmp_path / "run"
    with pytest.raises(RuntimeError):
        train(path, fail_at=4)
    model = make_model()
    opt = adamw(model)
    restore_checkpoint(path, model)  # θ only: the moments are missing
    with pytest.raises(diffin.recording.ResumeError, match="optimizer state exp_avg of 0.weight"):
        diffin.Recorder(path, model, opt, checkpoint_every=EVERY, clip_grad_norm=CLIP, resume=True)
    restore_checkpoint(path, model, opt)
    with pytest.raises(diffin.recording.ResumeError, match="clip_grad_norm=None vs recorded 0.5"):
        diffin.Recorder(path, model, opt, checkpoint_every=EVERY, resume=True)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("clip", [0, -1.0, math.nan, math.inf, True, "1.0"])
def test_bad_clip_value_is_named(tmp_path: Path, clip: Any) -> None:
    with pytest.raises(RecordingError, match="clip_grad_norm must be None .* or the finite max_norm > 0"):
        diffin.Recorder(tmp_path / "run", make_model(), clip_grad_norm=clip)
    assert not (tmp_path / "run").exists()


def test_clip_recorded_but_gradients_not_clipped(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_data()
    rec = diffin.Recorder(tmp_path / "run", model, opt, clip_grad_norm=1e-3)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(RecordingError, match=r"above clip_grad_norm=0\.001: the loop did not clip"):
        rec.step(np.arange(N_TRAIN))
    rec.close()


def step_once(model: nn.Module, opt: torch.optim.Optimizer, rec: diffin.Recorder, t: int) -> None:
    x, y = make_data()
    ids = batch_ids(t)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
    opt.step()
    rec.step(ids)


def test_adam_hyper_change_mid_run_is_refused(tmp_path: Path) -> None:
    model = make_model()
    opt = adamw(model)
    rec = diffin.Recorder(tmp_path / "run", model, opt)
    step_once(model, opt, rec, 0)
    opt.param_groups[1]["betas"] = (0.9, 0.99)
    with pytest.raises(UnsupportedOptimizerError, match=r"beta1 of param group 1 changed .*0\.8 -> 0\.9"):
        step_once(model, opt, rec, 1)
    rec.close()


def test_param_group_added_mid_run_is_refused(tmp_path: Path) -> None:
    model = make_model()
    named = dict(model.named_parameters())
    opt = torch.optim.Adam([named[n] for n in WEIGHTS], lr=0.01)
    rec = diffin.Recorder(tmp_path / "run", model, opt)
    step_once(model, opt, rec, 0)
    opt.add_param_group({"params": [named[n] for n in BIASES]})
    with pytest.raises(UnsupportedOptimizerError, match="param groups changed"):
        step_once(model, opt, rec, 1)
    rec.close()


def test_two_optimizer_steps_per_recorded_step_are_refused(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = diffin.Recorder(tmp_path / "run", model, opt)
    opt.step()
    with pytest.raises(RecordingError, match="optimizer.step\\(\\) ran 2 times since the last Recorder.step"):
        step_once(model, opt, rec, 0)
    rec.close()


@pytest.mark.parametrize("kind", ["SGD", "Adam", "AdamW"])
def test_optimizers_with_a_rule_record_without_warning(tmp_path: Path, kind: str) -> None:
    model = make_model()
    opt = getattr(torch.optim, kind)(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with diffin.Recorder(tmp_path / "run", model, opt) as rec:
            step_once(model, opt, rec, 0)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda ps: torch.optim.Adagrad(ps, lr=0.1), "no Diff-In rule for optimizer 'Adagrad'"),
        (lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True), "amsgrad"),
        (lambda ps: torch.optim.LBFGS(ps, lr=0.1), "no Diff-In rule for optimizer 'LBFGS'"),
    ],
    ids=["adagrad", "amsgrad", "lbfgs"],
)
def test_optimizers_without_a_rule_record_with_a_warning(tmp_path: Path, make: Any, match: str) -> None:
    model = make_model()
    opt = make(model.parameters())
    with pytest.warns(UnsupportedOptimizerWarning, match=match) as got:
        rec = diffin.Recorder(tmp_path / "run", model, opt, checkpoint_every=2)
    text = str(got[0].message)
    for what in ("'tracin'", "'if-cg'", "'grad-dot'", "need SGD, Adam or AdamW"):
        assert what in text
    if isinstance(opt, torch.optim.LBFGS):
        rec.close()
        return
    for t in range(2):
        step_once(model, opt, rec, t)
    rec.close()
    ck = diffin.load_run(tmp_path / "run").load_checkpoint(2)
    named = dict(model.named_parameters())
    assert ck.optimizer_step == 2
    for key, val in opt.state[named["0.weight"]].items():
        if key != "step":
            assert torch.equal(ck.optimizer_state[key]["0.weight"], val)
