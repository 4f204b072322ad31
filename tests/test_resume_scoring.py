"""Resumable scoring: a sweep interrupted after saving its state (an exception, or a real SIGKILL
of ``diffin score``) and continued with ``resume=True`` / ``--resume`` gives scores bit-identical
to an uninterrupted run, having redone only the segments after the saved boundary; a state of
another config, run or method is refused by name and left untouched; an existing state without
``--resume`` is refused, ``--overwrite`` discards it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import diffin
from _tiny import Tiny, record_loop
from diffin import _resume
from diffin._errors import ConfigError, OutputExistsError, ResumeMismatchError
from diffin._resume import RESUME_DIR, STATE_JSON, SweepResume, SweepState
from diffin.cli import main
from diffin.trajectory import Trajectory

pytestmark = pytest.mark.filterwarnings("ignore::diffin._errors.UntrainedRowsWarning")


class Interrupted(Exception):
    """Stands for a crash of the scoring process right after a save."""


def interrupt_after_saves(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    """Make the n-th save of a sweep state raise :class:`Interrupted` once it is written; returns
    the ``next_segment`` of every save."""
    original = SweepResume.save
    saved: list[int] = []

    def save(self: SweepResume, state: SweepState) -> None:
        original(self, state)
        saved.append(int(state.meta["next_segment"]))
        if len(saved) == n:
            raise Interrupted

    monkeypatch.setattr(SweepResume, "save", save)
    return saved


def count_adjoint_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the step t of every adjoint step the sweeps take."""
    original = Trajectory.adjoint
    steps: list[int] = []

    def adjoint(self: Trajectory, t: int, *a: object) -> object:
        steps.append(t)
        return original(self, t, *a)

    monkeypatch.setattr(Trajectory, "adjoint", adjoint)
    return steps


def interrupted_then_resumed(
    tiny: Tiny, method: str, out: Path, monkeypatch: pytest.MonkeyPatch, n_saves: int = 2, **kw: object
) -> tuple[diffin.ScoreResult, list[int], list[int]]:
    """Score into ``out`` saving at every segment, crash after the ``n_saves``-th save, resume.
    Returns the resumed result, the saves' next_segment and the steps the resumed sweep took."""
    saved = interrupt_after_saves(monkeypatch, n_saves)
    with pytest.raises(Interrupted):
        tiny.score(method, out=out, resume_every_steps=1, **kw)
    monkeypatch.undo()
    assert (out / RESUME_DIR / STATE_JSON).exists()
    assert not (out / "scores.npy").exists()
    steps = count_adjoint_steps(monkeypatch)
    res = tiny.score(method, out=out, resume=True, resume_every_steps=1, **kw)
    monkeypatch.undo()
    assert not (out / RESUME_DIR).exists(), "the state is removed once the scores are written"
    return res, saved, steps


def remaining_steps(tiny: Tiny, done_segments: int) -> list[int]:
    """Steps t of the segments after the first ``done_segments`` of the backward sweep, in sweep order."""
    segments = list(reversed(diffin.load_run(tiny.run).segments))[done_segments:]
    return [t for c0, c1 in segments for t in range(c1 - 1, c0 - 1, -1)]


def assert_same_result(a: diffin.ScoreResult, b: diffin.ScoreResult) -> None:
    assert a.variant == b.variant
    assert a.scores.dtype == b.scores.dtype
    assert np.array_equal(a.scores, b.scores), np.abs(a.scores - b.scores).max()
    assert (a.group_scores is None) == (b.group_scores is None)
    if a.group_scores is not None:
        assert np.array_equal(a.group_scores, b.group_scores)
    for k in ("adjoint_growth", "replay_drift"):
        assert a.diagnostics[k] == b.diagnostics[k], k


@pytest.fixture
def tiny3(record_tiny: Callable[..., Tiny]) -> Tiny:
    """The tiny tanh MLP, 3 epochs: 12 steps in 4 segments of 3."""
    return record_tiny(epochs=3)


# ---------------------------------------------------------------------- bit-identical after a crash
@pytest.mark.parametrize("method", ["diffin-exact", "diffin-frozen", "diffin-expected", "diffin-retrain"])
def test_resumed_sweep_is_bit_identical(
    tiny3: Tiny, method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = tiny3.score(method)
    res, saved, steps = interrupted_then_resumed(tiny3, method, tmp_path / "out", monkeypatch)
    assert saved == [1, 2]
    assert steps == remaining_steps(tiny3, 2), "the resumed sweep redoes only the segments after the state"
    assert_same_result(res, ref)
    assert np.array_equal(np.load(tmp_path / "out" / "scores.npy"), ref.scores)


@pytest.mark.parametrize("method", ["diffin-exact", "diffin-expected", "diffin-retrain"])
def test_resumed_adam_clipped_sweep_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Adam with gradient clipping: the optimizer-state adjoint s̄ travels with the state."""
    tiny = record_loop(tmp_path / "run", lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
                       epochs=3, every=2, clip=0.5)
    ref = tiny.score(method)
    res, saved, steps = interrupted_then_resumed(tiny, method, tmp_path / "out", monkeypatch)
    assert saved == [1, 2]
    assert steps == remaining_steps(tiny, 2)
    assert_same_result(res, ref)


def test_resumed_pairwise_groups_and_self_influence(
    tiny3: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pairwise scores with whole-group removals (renormalize), and self-influence (its chunk loop)."""
    groups = [[0, 1, 2], [5, 7], [3]]
    kw = {"pairwise": True, "groups": groups, "convention": "renormalize"}
    ref = tiny3.score("diffin-exact", **kw)
    res, _, _ = interrupted_then_resumed(tiny3, "diffin-exact", tmp_path / "pairs", monkeypatch, **kw)
    assert res.scores.shape == (24, 8) and res.group_scores is not None
    assert_same_result(res, ref)
    ref = tiny3.score("diffin-exact", target="self")
    res, _, _ = interrupted_then_resumed(tiny3, "diffin-exact", tmp_path / "self", monkeypatch, target="self")
    assert_same_result(res, ref)


def test_kill_between_the_tensor_file_and_state_json(
    tiny3: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the 2nd tensor file is written but before its state.json: the first state
    (state.json and the tensor file it names) is intact and resumes from segment 1."""
    out = tmp_path / "out"
    original, calls = _resume.write_json, []

    def write_json(path: Path, obj: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise Interrupted
        original(path, obj)

    monkeypatch.setattr(_resume, "write_json", write_json)
    with pytest.raises(Interrupted):
        tiny3.score("diffin-exact", out=out, resume_every_steps=1)
    monkeypatch.undo()
    assert sorted(p.name for p in (out / RESUME_DIR).iterdir()) == [
        STATE_JSON, "tensors-000001.safetensors", "tensors-000002.safetensors"]
    steps = count_adjoint_steps(monkeypatch)
    res = tiny3.score("diffin-exact", out=out, resume=True)
    assert steps == remaining_steps(tiny3, 1)
    assert_same_result(res, tiny3.score("diffin-exact"))


# ---------------------------------------------------------------------- a real SIGKILL of `diffin score`
KILL_AFTER_SECOND_SAVE = """
import os, signal, runpy, sys
from diffin._resume import SweepResume
original = SweepResume.save
def save(self, state):
    original(self, state)
    if self.saves == 2:
        os.kill(os.getpid(), signal.SIGKILL)
SweepResume.save = save
sys.argv = ["diffin"] + sys.argv[1:]
runpy.run_module("diffin", run_name="__main__")
"""


@pytest.mark.slow  # three processes: about 10 s
def test_sigkilled_cli_score_resumes_bit_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, out, ref = tmp_path / "run", tmp_path / "out", tmp_path / "ref"
    assert main(["train", "--setup", "tiny", "--out", str(run), "--quiet", "--checkpoint-every", "4"]) == 0
    args = ["score", str(run), "--method", "diffin-exact", "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_SECOND_SAVE, *args, "--resume-every-steps", "1"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert (out / RESUME_DIR / STATE_JSON).exists() and not (out / "scores.npy").exists()
    assert main(args) == 2, "refused without --resume (a DiffinError: exit status 2)"
    assert "--resume" in capsys.readouterr().err
    assert (out / RESUME_DIR / STATE_JSON).exists()
    resumed = subprocess.run([sys.executable, "-m", "diffin", *args, "--resume", "--verbose"],
                             capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming the sweep" in resumed.stderr and "2 of 6 segments done" in resumed.stderr
    assert not (out / RESUME_DIR).exists()
    assert main(["score", str(run), "--method", "diffin-exact", "--out", str(ref), "--quiet"]) == 0
    assert np.array_equal(np.load(out / "scores.npy"), np.load(ref / "scores.npy"))
    assert (out / "scores.csv").read_text() == (ref / "scores.csv").read_text()


# ---------------------------------------------------------------------- refusals
def saved_state(tiny: Tiny, out: Path, monkeypatch: pytest.MonkeyPatch, **kw: object) -> dict[str, bytes]:
    """Leave an interrupted diffin-exact state in ``out``; returns its files' bytes."""
    interrupt_after_saves(monkeypatch, 1)
    with pytest.raises(Interrupted):
        tiny.score("diffin-exact", out=out, resume_every_steps=1, **kw)
    monkeypatch.undo()
    return files_of(out / RESUME_DIR)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("change, match", [
    ({"convention": "renormalize"}, r"config \(convention: 'keep' -> 'renormalize'\)"),
    ({"hvp": "exact"}, r"config \(hvp: 'auto' -> 'exact'\)"),
    ({"method": "diffin-frozen"}, r"method \('diffin-exact' -> 'diffin-frozen'\)"),
    ({"method": "tracin"}, r"method \('diffin-exact' -> 'tracin'\)"),
    ({"target": "self"}, r"target kind \('mean' -> 'self'\)"),
    ({"groups": [[0, 1]]}, r"removal groups"),
])
def test_resume_with_another_config_or_method_is_refused(
    tiny3: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict, match: str
) -> None:
    out = tmp_path / "out"
    before = saved_state(tiny3, out, monkeypatch)
    kw = dict(change)
    method = kw.pop("method", "diffin-exact")
    with pytest.raises(ResumeMismatchError, match=match):
        tiny3.score(method, out=out, resume=True, **kw)
    assert files_of(out / RESUME_DIR) == before, "a refused resume leaves the state as it was"
    assert not (out / "scores.npy").exists()


def test_resume_with_another_run_or_data_is_refused(
    tiny3: Tiny, record_tiny: Callable[..., Tiny], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    before = saved_state(tiny3, out, monkeypatch)
    other = record_tiny("other", epochs=3, seed=1)
    with pytest.raises(ResumeMismatchError, match=r"run \(another recording\)"):
        diffin.score(other.run, tiny3.make(), tiny3.loss, train=(tiny3.X, tiny3.Y), target=(tiny3.Xv, tiny3.Yv),
                     method="diffin-exact", out=out, resume=True, progress=False)
    with pytest.raises(ResumeMismatchError, match="target data"):
        tiny3.score("diffin-exact", out=out, resume=True, target=(tiny3.Xv[:4], tiny3.Yv[:4]))
    assert files_of(out / RESUME_DIR) == before


def test_resume_with_another_cadence_is_accepted(
    tiny3: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resume fields say when to save, not what is computed: not part of the key."""
    out = tmp_path / "out"
    saved_state(tiny3, out, monkeypatch)
    res = tiny3.score("diffin-exact", out=out, resume=True, resume_every_steps=0, resume_every_minutes=0)
    assert_same_result(res, tiny3.score("diffin-exact"))
    tiny3.score("diffin-exact", out=out, resume_every_steps=7)  # the saved scores are not refused either


def test_damaged_state_is_named(tiny3: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    saved_state(tiny3, out, monkeypatch)
    tensors = next((out / RESUME_DIR).glob("tensors-*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the tensor data
    tensors.write_bytes(bytes(data))
    with pytest.raises(ResumeMismatchError, match="does not match its hash"):
        tiny3.score("diffin-exact", out=out, resume=True)
    (out / RESUME_DIR / STATE_JSON).write_text("{not json")
    with pytest.raises(ResumeMismatchError, match="cannot be read"):
        tiny3.score("diffin-exact", out=out, resume=True)


def test_existing_state_without_resume_is_refused_and_overwrite_discards_it(
    tiny3: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    before = saved_state(tiny3, out, monkeypatch)
    with pytest.raises(OutputExistsError, match=r"resume=True \(--resume\).*overwrite=True \(--overwrite\)"):
        tiny3.score("diffin-exact", out=out)
    assert files_of(out / RESUME_DIR) == before
    with pytest.raises(ConfigError, match="choose one"):
        tiny3.score("diffin-exact", out=out, resume=True, overwrite=True)
    steps = count_adjoint_steps(monkeypatch)
    res = tiny3.score("diffin-exact", out=out, overwrite=True, convention="renormalize")
    assert len(steps) == 12, "overwrite discards the state and scores from the start"
    assert not (out / RESUME_DIR).exists()
    assert_same_result(res, tiny3.score("diffin-exact", convention="renormalize"))


def test_resume_without_state_starts_and_says_so(
    tiny3: Tiny, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="diffin"):
        res = tiny3.score("diffin-exact", out=tmp_path / "out", resume=True)
    assert "no resume state" in caplog.text
    assert_same_result(res, tiny3.score("diffin-exact"))


def test_resume_refusals_of_the_api(tiny3: Tiny, record_tiny: Callable[..., Tiny], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs out="):
        tiny3.score("diffin-exact", resume=True)
    other = record_tiny("other", epochs=3, seed=1)
    with pytest.raises(ConfigError, match="several runs"):
        diffin.score([tiny3.run, other.run], tiny3.make(), tiny3.loss, train=(tiny3.X, tiny3.Y),
                     target=(tiny3.Xv, tiny3.Yv), method="diffin-exact", out=tmp_path / "o", resume=True)
    for bad in ({"resume_every_steps": -1}, {"resume_every_minutes": -0.5}, {"resume_every_minutes": float("nan")}):
        with pytest.raises(ConfigError, match="resume_every"):
            diffin.ScoreConfig(**bad)


# ---------------------------------------------------------------------- the cadence
def test_save_cadence_by_steps_and_minutes(tmp_path: Path) -> None:
    now = [0.0]
    hook = SweepResume(tmp_path / RESUME_DIR, {"k": 1}, every_steps=5, every_minutes=2.0, clock=lambda: now[0])

    def state() -> SweepState:
        return SweepState({"A": torch.arange(3.0)}, {"next_segment": 1})

    assert [hook.maybe_save(3, state) for _ in range(4)] == [False, True, False, True]  # 3, 6 | 3, 6
    now[0] = 119.0
    assert not hook.maybe_save(1, state)
    now[0] = 240.0
    assert hook.maybe_save(1, state), "two minutes since the last save"
    assert hook.saves == 3
    assert [p.name for p in (tmp_path / RESUME_DIR).glob("tensors-*")] == ["tensors-000003.safetensors"]
    off = SweepResume(tmp_path / "off", {}, every_steps=0, every_minutes=0.0, clock=lambda: now[0])
    now[0] = 1e9
    assert not off.maybe_save(10**9, state) and not (tmp_path / "off").exists()
    loaded = SweepResume(tmp_path / RESUME_DIR, {"k": 1}, load_saved=True).load()
    assert loaded is not None and torch.equal(loaded.tensors["A"], torch.arange(3.0))
    assert SweepResume(tmp_path / RESUME_DIR, {"k": 1}, load_saved=False).load() is None
    with pytest.raises(ResumeMismatchError, match="k"):
        SweepResume(tmp_path / RESUME_DIR, {"k": 2}, load_saved=True).load()


def test_resumed_closed_form_is_bit_identical(tiny3: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The closed form saves after each checkpoint it visits (its per-sample passes) and resumes
    after the last one done, with the proxy RNG where it was."""
    ref = tiny3.score("diffin-closed-form")
    original = SweepResume.save
    saved: list[int] = []

    def save(self: SweepResume, state: SweepState) -> None:
        original(self, state)
        saved.append(int(state.meta["next_checkpoint"]))
        if len(saved) == 2:
            raise Interrupted

    monkeypatch.setattr(SweepResume, "save", save)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        tiny3.score("diffin-closed-form", out=out, resume_every_steps=1)
    monkeypatch.undo()
    assert saved == [1, 2] and not (out / "scores.npy").exists()
    visited: list[int] = []
    theta = Trajectory.theta

    def spy(self: Trajectory, step: int) -> object:
        visited.append(step)
        return theta(self, step)

    monkeypatch.setattr(Trajectory, "theta", spy)
    res = tiny3.score("diffin-closed-form", out=out, resume=True, resume_every_steps=1)
    monkeypatch.undo()
    steps = ref.diagnostics["steps"]
    assert len(steps) == 4
    assert steps[2] in visited and not set(steps[:2]) & set(visited), "only the checkpoints left are visited"
    assert np.array_equal(res.scores, ref.scores)
    assert res.diagnostics["coefficients"] == ref.diagnostics["coefficients"]
    assert not (out / RESUME_DIR).exists()


def test_resume_under_another_world_size_is_refused(
    tiny3: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state saved by one process is refused by a job of two (the key carries the world size)."""
    out = tmp_path / "out"
    before = saved_state(tiny3, out, monkeypatch)
    monkeypatch.setattr("diffin._api.world_size", lambda: 2)
    with pytest.raises(ResumeMismatchError, match="world size"):
        tiny3.score("diffin-exact", out=out, resume=True)
    assert files_of(out / RESUME_DIR) == before
