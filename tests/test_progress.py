"""Long jobs talk when redirected: off a terminal, progress bars give way to stage lines through
``logging`` (logger ``diffin.progress``): what runs, how far, an estimate of the time left."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from tqdm.auto import tqdm

from _cli_project import make_project
from diffin import _progress
from diffin._progress import StageLog, progress_bar


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "diffin.progress"]


def test_stage_lines_say_what_how_far_and_how_long(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    caplog.set_level(logging.INFO, logger="diffin.progress")
    with StageLog(200, "diffin-exact", unit="step", every=60, clock=lambda: now[0]) as bar:
        for _ in range(200):
            now[0] += 1.5  # 300 s in all: a line every 60 s
            bar.update()
    lines = _lines(caplog)
    assert lines[0] == "diffin-exact: started, 200 steps"
    assert lines[1] == "diffin-exact: 40/200 steps (20%), 1m00s elapsed, about 4m00s left"
    assert len(lines) == 1 + 5 + 1 and lines[-1] == "diffin-exact: done, 200 steps in 5m00s"


def test_stage_lines_without_a_total(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    caplog.set_level(logging.INFO, logger="diffin.progress")
    bar = StageLog(None, "replay", unit="step", every=10, clock=lambda: now[0])
    now[0] = 3725.0
    bar.update(7)
    bar.close()
    bar.close()  # once only
    assert _lines(caplog) == ["replay: started", "replay: 7 steps, 1h02m elapsed", "replay: done, 7 steps in 1h02m"]


def test_off_a_terminal_the_bar_is_a_stage_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_progress, "_stderr_is_tty", lambda: False)
    with progress_bar(5, "train") as bar:
        assert isinstance(bar, StageLog) and isinstance(bar, tqdm)
    with progress_bar(5, "train", enabled=False) as bar:
        assert not isinstance(bar, StageLog) and bar.disable
    monkeypatch.setattr(_progress, "_stderr_is_tty", lambda: True)
    with progress_bar(5, "train") as bar:
        assert not isinstance(bar, StageLog)


def test_a_redirected_command_logs_its_stages(tmp_path) -> None:  # noqa: ANN001
    """``diffin score`` with standard error to a pipe (not a terminal) and no -v: the sweep's
    stage lines are there; with --quiet they are not."""
    make_project(tmp_path)
    argv = [sys.executable, "-m", "diffin", "score", "run", "--model", "mymodels:build", "--data", "data.npz",
            "--method", "diffin-exact"]
    env = {"DIFFIN_PROGRESS_SECONDS": "0", "PYTHONPATH": f"{tmp_path}:{':'.join(sys.path)}"}
    res = subprocess.run([*argv, "--out", "a"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert "INFO diffin.progress: diffin-exact: started, 4 steps" in res.stderr
    assert "diffin-exact: 4/4 steps (100%)" in res.stderr and "diffin-exact: done, 4 steps in" in res.stderr
    res = subprocess.run([*argv, "--out", "b", "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0 and "diffin.progress" not in res.stderr, res.stderr
