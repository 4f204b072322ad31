"""Crash-safe recording: a run killed by a real SIGKILL loads and scores up to its last
checkpoint (with a :class:`PartialRunWarning`), ``Recorder(..., resume=True)`` continues it to the
run an uninterrupted loop records, an exception inside ``with Recorder(...)`` closes the run at its
last checkpoint, and every refusal to resume is a named error."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import diffin
from _recording_loop import (
    N_LOOP,
    loop_batch,
    loop_data,
    loop_loss,
    loop_lr,
    loop_model,
    loop_optimizer_step,
    make_model,
    read_manifest,
    record,
    train,
)
from diffin import _constants as C
from diffin._errors import CorruptManifestError, RecordingError, RunExistsError, TruncatedFileError
from diffin.recording import PartialRunWarning, ResumeError, restore_checkpoint

EVERY, STEPS, KILLED_AFTER = 3, 11, 8
"""Checkpoints of the whole loop at 0, 3, 6, 9, 11; the killed process recorded 8 steps, so its
run is valid up to step 6."""
LAST = 6

pytestmark = pytest.mark.filterwarnings("ignore::diffin._errors.UntrainedRowsWarning")


def assert_same_float64(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> None:
    """Equal up to float64 rounding: relative 1e-9, absolute floor 1e-12 × the values' size."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * max(float(np.abs(b).max(initial=0.0)), 1e-300))


def assert_same_trajectory(run: diffin.Run, ref: diffin.Run, upto: int) -> None:
    """ids and learning rates equal, checkpoints (θ, momentum) equal up to rounding, for steps
    0 … upto of ``ref``."""
    assert run.n_steps == upto
    assert run.checkpoint_steps == [s for s in ref.checkpoint_steps if s <= upto]
    np.testing.assert_array_equal(run.lrs, ref.lrs[:upto])
    for t in range(upto):
        np.testing.assert_array_equal(run.batch(t), ref.batch(t))
    for s in run.checkpoint_steps:
        a, b = run.load_checkpoint(s), ref.load_checkpoint(s)
        assert sorted(a.params) == sorted(b.params)
        for n in b.params:
            assert_same_float64(a.params[n], b.params[n])
        assert (a.momentum is None) == (b.momentum is None)
        for n in b.momentum or {}:
            assert_same_float64(a.momentum[n], b.momentum[n])


def scores(path: Path) -> np.ndarray:
    """diffin-exact scores of the loop's training set on its validation loss."""
    X, Y, Xv, Yv = loop_data()
    return diffin.influence(path, loop_model(), loop_loss, train=(X, Y), target=(Xv, Yv),
                            method="diffin-exact", progress=False)


def load_quietly(path: Path) -> diffin.Run:
    """load_run of a run that must be complete: any warning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartialRunWarning)
        return diffin.load_run(path)


def kill_mid_run(path: Path) -> None:
    """Record the loop in a subprocess that SIGKILLs itself right after step KILLED_AFTER."""
    script = Path(__file__).with_name("_recording_loop.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(path), "--steps", str(STEPS), "--every", str(EVERY),
         "--kill-after", str(KILLED_AFTER)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The killed run (never touched: tests copy it), the uninterrupted run of the same loop,
    and the same loop recorded cleanly for LAST steps only."""
    root = tmp_path_factory.mktemp("crash")
    kill_mid_run(root / "killed")
    train(root / "full", steps=STEPS, every=EVERY)
    train(root / "stopped", steps=LAST, every=EVERY)
    return {"killed": root / "killed", "full": root / "full", "stopped": root / "stopped"}


@pytest.fixture(scope="module")
def full_scores(runs: dict[str, Path]) -> np.ndarray:
    return scores(runs["full"])


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------- SIGKILL
def test_sigkill_run_loads_up_to_its_last_checkpoint(runs: dict[str, Path]) -> None:
    killed = runs["killed"]
    m = read_manifest(killed)
    assert m["status"] == C.STATUS_RECORDING and m["n_steps"] == LAST
    assert [c["step"] for c in m["checkpoints"]] == [0, 3, 6]
    # the logs hold all 8 recorded steps; the manifest lists the 6 its last checkpoint covers
    assert (killed / C.GROUP_LRS_LOG).stat().st_size == 8 * KILLED_AFTER
    assert m["lrs"]["count"] == LAST and m["batch_ids"]["offsets"]["count"] == LAST + 1

    with pytest.warns(PartialRunWarning, match=r"stopped at step 6 of the 8 steps recorded") as rec:
        run = diffin.load_run(killed, loop_model(), n_train=N_LOOP)
    msg = str(rec[0].message)
    assert "scores cover steps 0..6" in msg and "resume=True" in msg
    assert not run.complete and run.status == C.STATUS_RECORDING and run.steps_logged == KILLED_AFTER
    assert_same_trajectory(run, load_quietly(runs["full"]), LAST)
    assert_same_trajectory(run, load_quietly(runs["stopped"]), LAST)


def test_sigkill_run_scores_equal_a_clean_run_stopped_at_its_checkpoint(
    runs: dict[str, Path], full_scores: np.ndarray
) -> None:
    with pytest.warns(PartialRunWarning, match="scores cover steps 0..6"):
        got = scores(runs["killed"])
    want = scores(runs["stopped"])
    assert np.any(want != 0) and np.all(np.isfinite(want))
    assert_same_float64(got, want)
    # and not the scores of the whole run: the steps past the checkpoint are really left out
    assert np.abs(full_scores - want).max() > 1e-6 * np.abs(want).max()


def test_resume_after_sigkill_equals_the_uninterrupted_run(
    runs: dict[str, Path], full_scores: np.ndarray, tmp_path: Path
) -> None:
    path = copy_of(runs["killed"], tmp_path / "run")
    train(path, steps=STEPS, every=EVERY, resume=True)  # restore_checkpoint + Recorder(resume=True)
    run, full = load_quietly(path), load_quietly(runs["full"])
    assert run.complete and run.manifest["resumed_at"] == [LAST]
    assert_same_trajectory(run, full, STEPS)
    assert run.checkpoint_steps == [0, 3, 6, 9, 11]
    # the logs were cut back to step 6 before going on: nothing of the killed steps 7, 8 remains
    assert (path / C.GROUP_LRS_LOG).stat().st_size == 8 * STEPS
    assert sorted(p.name for p in (path / C.CHECKPOINT_DIR).iterdir()) == sorted(
        C.CHECKPOINT_PATTERN.format(step=s) for s in [0, 3, 6, 9, 11])
    assert_same_float64(scores(path), full_scores)


def test_rerun_without_resume_into_a_killed_run(runs: dict[str, Path], tmp_path: Path) -> None:
    path = copy_of(runs["killed"], tmp_path / "run")
    model = loop_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(RunExistsError, match="unfinished recording") as ei:
        diffin.Recorder(path, model, optimizer=opt, checkpoint_every=EVERY)
    assert "resume=True" in str(ei.value) and "valid up to step 6" in str(ei.value)
    assert read_manifest(path) == read_manifest(runs["killed"])  # the refusal touched nothing


# ---------------------------------------------------------------------- valid at every checkpoint
def test_manifest_is_valid_at_every_checkpoint(tmp_path: Path) -> None:
    """While recording, the folder always loads, up to the last checkpoint written."""
    path = tmp_path / "run"
    X, Y, _, _ = loop_data()
    model = loop_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = diffin.Recorder(path, model, optimizer=opt, checkpoint_every=EVERY)
    for t in range(7):
        b = loop_optimizer_step(model, opt, X, Y, t)
        rec.step(b, lr=0.1)
        last = (t + 1) // EVERY * EVERY
        with pytest.warns(PartialRunWarning, match=f"stopped at step {last} of the {t + 1} steps"):
            run = diffin.load_run(path)
        assert run.n_steps == last and run.checkpoint_steps == list(range(0, last + 1, EVERY))
        assert [len(run.batch(s)) for s in range(last)] == [len(loop_batch(s)) for s in range(last)]
    rec.close()
    run = load_quietly(path)
    assert run.complete and run.n_steps == 7 and run.checkpoint_steps == [0, 3, 6, 7]


# ---------------------------------------------------------------------- exception inside `with`
class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), Boom("disk on fire")],
                         ids=["runtime-error", "keyboard-interrupt", "user-class"])
def test_exception_inside_with_closes_the_run_at_its_last_checkpoint(
    runs: dict[str, Path], tmp_path: Path, exc: BaseException
) -> None:
    """The exception hits between optimizer.step() and rec.step() of step 5 (θ_6 exists in the
    model but step 5 was never recorded): the run is closed at checkpoint 3, it propagates."""
    path = tmp_path / "run"
    X, Y, _, _ = loop_data()
    model = loop_model()
    opt = torch.optim.SGD(model.parameters(), lr=loop_lr(0), momentum=0.9)
    with pytest.raises(type(exc)), diffin.Recorder(path, model, optimizer=opt, checkpoint_every=EVERY,
                                                   n_train=N_LOOP, seed=0) as rec:
        for t in range(STEPS):
            for g in opt.param_groups:
                g["lr"] = loop_lr(t)
            b = loop_optimizer_step(model, opt, X, Y, t)
            if t == 5:
                raise exc
            rec.step(b, lr=opt.param_groups[0]["lr"])

    m = read_manifest(path)
    name = type(exc).__name__ if type(exc) is not Boom else f"{__name__}.Boom"
    assert m["status"] == C.STATUS_INTERRUPTED
    assert m["interrupted"]["exception"] == name and m["interrupted"]["at_step"] == 5
    assert m["n_steps"] == 3 and (path / C.GROUP_LRS_LOG).stat().st_size == 8 * 3  # logs cut to it
    with pytest.warns(PartialRunWarning, match=rf"interrupted by {name} at step 5.*stopped at step 3 of the 5 "
                      r"steps recorded, and scores cover steps 0..3"):
        run = diffin.load_run(path)
    assert_same_trajectory(run, load_quietly(runs["full"]), 3)
    if not isinstance(exc, RuntimeError):
        return
    # scored like the same loop recorded cleanly for 3 steps, and resumed like a killed run
    train(tmp_path / "stopped", steps=3, every=EVERY)
    with pytest.warns(PartialRunWarning):
        got = scores(path)
    assert_same_float64(got, scores(tmp_path / "stopped"))
    train(path, steps=STEPS, every=EVERY, resume=True)
    assert_same_trajectory(load_quietly(path), load_quietly(runs["full"]), STEPS)


# ---------------------------------------------------------------------- resume: details, refusals
def abandon(path: Path, steps: int, every: int = 3, momentum: float = 0.9) -> tuple[Any, Any]:
    """Record ``steps`` steps and never close: on disk, what a killed process leaves."""
    X, Y, _, _ = loop_data()
    model = loop_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    rec = diffin.Recorder(path, model, optimizer=opt, checkpoint_every=every, n_train=N_LOOP)
    for t in range(steps):
        rec.step(loop_optimizer_step(model, opt, X, Y, t), lr=0.1)
    del rec  # the process "dies": nothing is closed (the logs reached the OS at every step)
    return model, opt


def fresh(momentum: float = 0.9, kind: str = "SGD") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = loop_model()
    if kind == "Adam":
        return model, torch.optim.Adam(model.parameters(), lr=0.1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)


def test_resume_cleans_what_the_kill_left(tmp_path: Path) -> None:
    path = tmp_path / "run"
    abandon(path, steps=5)
    # a checkpoint written but never listed, and an atomic write cut short
    (path / C.CHECKPOINT_DIR / C.CHECKPOINT_PATTERN.format(step=6)).write_bytes(b"half")
    (path / ".manifest.json.abc123.tmp").write_text("{")
    model, opt = fresh()
    assert restore_checkpoint(path, model, opt) == 3
    rec = diffin.Recorder(path, model, optimizer=opt, checkpoint_every=3, resume=True)
    assert rec.steps == 3 and rec.n_train == N_LOOP  # n_train left None takes the recorded one
    assert (path / C.GROUP_LRS_LOG).stat().st_size == 8 * 3
    m = read_manifest(path)
    assert (path / C.BATCH_IDS_LOG).stat().st_size == 8 * m["batch_ids"]["ids"]["count"]
    assert not (path / C.CHECKPOINT_DIR / C.CHECKPOINT_PATTERN.format(step=6)).exists()
    assert not list(path.glob(".*.tmp"))
    rec.close()
    assert load_quietly(path).n_steps == 3


def test_restore_checkpoint_loads_theta_and_momentum(tmp_path: Path) -> None:
    path = tmp_path / "run"
    model0, opt0 = abandon(path, steps=4)
    run = diffin.Run(path)
    ck = run.load_checkpoint(3)
    model, opt = fresh()
    assert restore_checkpoint(path, model, opt) == 3
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), ck.params[n])
        assert torch.equal(opt.state[p]["momentum_buffer"], ck.momentum[n])
    assert not torch.equal(model[0].weight, model0[0].weight)  # θ_3, not the θ_4 the loop reached
    # a run whose last checkpoint is θ_0 has no momentum yet: the buffers are dropped
    abandon(tmp_path / "early", steps=2)
    assert restore_checkpoint(tmp_path / "early", model, opt) == 0
    assert all("momentum_buffer" not in opt.state[p] for p in model.parameters())
    assert torch.equal(model[0].weight, loop_model()[0].weight)


def test_resume_an_empty_folder_just_starts(tmp_path: Path) -> None:
    model, opt = fresh()
    before = model[0].weight.detach().clone()
    assert restore_checkpoint(tmp_path / "new", model, opt) == 0
    assert torch.equal(model[0].weight, before)
    rec = diffin.Recorder(tmp_path / "new", model, optimizer=opt, checkpoint_every=3, resume=True)
    assert rec.steps == 0
    rec.step([0, 1], lr=0.1)
    rec.close()
    assert load_quietly(tmp_path / "new").n_steps == 1


def test_resume_refuses_a_complete_run(tmp_path: Path) -> None:
    record(tmp_path / "run", steps=4, every=2)
    with pytest.raises(ResumeError, match="complete recording") as ei:
        diffin.Recorder(tmp_path / "run", make_model(), checkpoint_every=2, resume=True)
    assert "overwrite=True" in str(ei.value)


def test_resume_refuses_a_folder_without_manifest(tmp_path: Path) -> None:
    path = tmp_path / "run"
    abandon(path, steps=1)
    (path / C.MANIFEST).unlink()
    model, opt = fresh()
    with pytest.raises(ResumeError, match="nothing to resume"):
        diffin.Recorder(path, model, optimizer=opt, checkpoint_every=3, resume=True)


def test_resume_and_overwrite_together(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="not both"):
        diffin.Recorder(tmp_path / "run", make_model(), overwrite=True, resume=True)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("not-restored", r"parameter 0\.weight.*restore_checkpoint"),
        ("momentum-not-restored", r"optimizer state momentum_buffer of 0\.weight"),
        ("other-momentum", "optimizer"),
        ("other-every", "checkpoint_every=4 vs recorded 3"),
        ("other-n-train", "n_train=7 vs recorded 24"),
        ("adam", "optimizer Adam vs recorded SGD"),
    ],
)
def test_resume_refusals_are_named(tmp_path: Path, case: str, match: str) -> None:
    path = tmp_path / "run"
    abandon(path, steps=4)
    before = read_manifest(path)
    model, opt = fresh(momentum=0.5 if case == "other-momentum" else 0.9,
                       kind="Adam" if case == "adam" else "SGD")
    if case == "momentum-not-restored":
        restore_checkpoint(path, model)  # θ only
    elif case not in ("not-restored", "adam"):
        restore_checkpoint(path, model, opt)
    kw: dict[str, Any] = {"checkpoint_every": 4 if case == "other-every" else 3}
    if case == "other-n-train":
        kw["n_train"] = 7
    with pytest.raises(ResumeError, match=match):
        diffin.Recorder(path, model, optimizer=opt, resume=True, **kw)
    assert read_manifest(path) == before  # refused before touching the run


def test_restore_checkpoint_refuses_other_optimizers(tmp_path: Path) -> None:
    abandon(tmp_path / "run", steps=4)
    model, opt = fresh(kind="Adam")
    with pytest.raises(ResumeError, match="recorded with SGD; pass the optimizer of the recording"):
        restore_checkpoint(tmp_path / "run", model, opt)


def test_killed_run_with_a_damaged_log_is_named(tmp_path: Path) -> None:
    """Bytes past the last checkpoint are ignored, but the covered ones must be intact."""
    path = tmp_path / "run"
    abandon(path, steps=4)
    m = read_manifest(path)
    f = path / C.BATCH_IDS_LOG
    intact = f.read_bytes()
    f.write_bytes(intact[: 8 * m["batch_ids"]["ids"]["count"] - 8])
    with pytest.raises(TruncatedFileError, match="truncated"):
        diffin.load_run(path)
    f.write_bytes(intact)
    with pytest.warns(PartialRunWarning):
        diffin.load_run(path)
    data = bytearray((path / C.GROUP_LRS_LOG).read_bytes())
    data[0] ^= 0xFF
    (path / C.GROUP_LRS_LOG).write_bytes(bytes(data))
    with pytest.raises(TruncatedFileError, match="damaged"):
        diffin.load_run(path)


def test_resume_with_a_damaged_manifest_is_named(tmp_path: Path) -> None:
    abandon(tmp_path / "run", steps=4)
    (tmp_path / "run" / C.MANIFEST).write_text('{"format_version": 2, "n_st')
    model, opt = fresh()
    with pytest.raises(CorruptManifestError, match="not valid JSON"):
        diffin.Recorder(tmp_path / "run", model, optimizer=opt, checkpoint_every=3, resume=True)


def test_failing_to_close_an_interrupted_run_keeps_the_loops_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If even the interrupted manifest cannot be written (disk full), the user's exception is the
    one raised, a warning says so, and the run still loads up to its last checkpoint."""
    path = tmp_path / "run"
    model, opt = fresh()
    rec = diffin.Recorder(path, model, optimizer=opt, checkpoint_every=2)
    rec.step([0, 1], lr=0.1)
    rec.step([2], lr=0.1)
    rec.step([3], lr=0.1)

    def disk_full(*a: Any, **k: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("diffin.recording.recorder.write_json", disk_full)
    with pytest.raises(ValueError, match="user bug"), pytest.warns(PartialRunWarning, match="could not close"), rec:
        raise ValueError("user bug")
    monkeypatch.undo()
    with pytest.warns(PartialRunWarning, match="stopped at step 2"):
        assert diffin.load_run(path).checkpoint_steps == [0, 2]
