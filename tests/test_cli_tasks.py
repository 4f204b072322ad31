"""``diffin clean|delete|prune`` on a built-in setup and on a user's recorded run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _cli_project import inside, make_project
from diffin.cli import main


@pytest.fixture
def in_project(tmp_path, monkeypatch):
    with inside(tmp_path, monkeypatch) as folder:
        yield folder


def test_tasks_on_a_builtin_setup(tmp_path, capsys):
    assert main(["clean", "--setup", "tiny", "--noise", "0.1", "--out", str(tmp_path / "c"), "--quiet",
                 "--baselines", "loss", "--retrain"]) == 0
    out = capsys.readouterr().out
    assert "ROC-AUC" in out and "after" in out
    assert main(["delete", "--setup", "tiny", "--out", str(tmp_path / "d"), "--quiet",
                 "--random-groups", "4", "--group-size", "3", "--method", "tracin"]) == 0
    assert "Pearson" in capsys.readouterr().out
    assert main(["prune", "--setup", "tiny", "--out", str(tmp_path / "p"), "--quiet", "--keep", "0.5",
                 "--methods", "random", "--seeds", "1", "--epochs", "1"]) == 0
    assert "keep 50%" in capsys.readouterr().out
    recipe = json.loads((tmp_path / "p" / "prune.json").read_text())["recipe"]
    assert recipe["overrides"] == {"epochs": 1} and recipe["train"]["epochs"] == 1
    assert main(["clean", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--setup" in capsys.readouterr().err
    assert main(["clean", "--setup", "tiny", "--run", "r", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "not both" in capsys.readouterr().err


def test_prune_on_a_user_run_follows_the_recorded_recipe(in_project, capsys):
    make_project(in_project, np.int32, momentum=0.9, test=True)
    argv = ["prune", "--run", "run", "--model", "mymodels:build", "--data", "data.npz", "--out", "p",
            "--methods", "random", "--keep", "0.5", "--seeds", "1", "--quiet"]
    assert main(argv) == 0
    recipe = json.loads((in_project / "p" / "prune.json").read_text())["recipe"]
    assert recipe["overrides"] == {}
    # the loop above: SGD lr 0.1, momentum 0.9, batch 6, 4 steps over 24 samples = 1 epoch
    assert {k: recipe["train"][k] for k in ("lr", "momentum", "batch_size", "epochs")} == {
        "lr": 0.1, "momentum": 0.9, "batch_size": 6, "epochs": 1}
    capsys.readouterr()
    # another recipe into the same folder: refused in command-line terms, replaced with --overwrite
    assert main([*argv, "--lr", "0.05"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffin: error: OutputExistsError: ") and "--overwrite" in err
    assert "overwrite=True" not in err
    assert main([*argv, "--lr", "0.05", "--overwrite"]) == 0
    recipe = json.loads((in_project / "p" / "prune.json").read_text())["recipe"]
    assert recipe["overrides"] == {"lr": 0.05}
    assert recipe["train"]["lr"] == 0.05 and recipe["train"]["momentum"] == 0.9
