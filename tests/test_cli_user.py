"""The command line on the user's own model and data: ``--model`` imported from the current
folder, labels of any integer width, errors in command-line terms, task inputs from the flags."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import diffin
from _cli_project import ce, inside, make_project
from diffin.cli import build_parser, main


@pytest.fixture
def in_project(tmp_path, monkeypatch):
    with inside(tmp_path, monkeypatch) as folder:
        yield folder


def test_model_imports_from_the_current_folder(tmp_path):
    """``diffin score RUN --model mymodels:build`` from the folder holding mymodels.py, with no
    PYTHONPATH (and PYTHONSAFEPATH, so that ``python -m`` does not add the folder itself)."""
    make_project(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONSAFEPATH"] = "1"
    res = subprocess.run([sys.executable, "-m", "diffin", "score", "run", "--model", "mymodels:build",
                          "--data", "data.npz", "--method", "tracin", "--out", "s", "--quiet"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "scored 24 samples" in res.stdout
    assert np.load(tmp_path / "s" / "scores.npy").shape == (24,)


@pytest.mark.parametrize("label_dtype", [np.int32, np.uint8])
def test_integer_labels_of_any_width(in_project, label_dtype, capsys):
    mod, X, Y = make_project(in_project, label_dtype)
    assert main(["score", "run", "--model", "mymodels:build", "--data", "data.npz", "--out", "s", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    want = diffin.influence(in_project / "run", mod.build(), ce, train=(X, Y), target=(X[:6], Y[:6]),
                            progress=False)
    got = np.load(in_project / "s" / "scores.npy")
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    labels = [int(line.split(",")[1]) for line in (in_project / "s" / "scores.csv").read_text().splitlines()[1:]]
    assert labels == Y.tolist()


def test_float_class_labels_are_a_named_error(in_project, capsys):
    make_project(in_project, np.float64)
    assert main(["score", "run", "--model", "mymodels:build", "--data", "data.npz", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffin: error: DataMismatchError: y_train holds floats")
    assert "--loss mse" in err


def test_output_exists_error_in_cli_terms(in_project, capsys):
    make_project(in_project)
    common = ["score", "run", "--model", "mymodels:build", "--data", "data.npz", "--out", "s", "--quiet"]
    assert main([*common, "--method", "tracin"]) == 0
    capsys.readouterr()
    assert main([*common, "--method", "grad-dot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffin: error: OutputExistsError: ")
    assert "--overwrite" in err and "overwrite=True" not in err and "(--overwrite)" not in err
    assert main([*common, "--method", "grad-dot", "--overwrite"]) == 0


def test_run_exists_error_in_cli_terms(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--setup", "tiny", "--out", run, "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--setup", "tiny", "--out", run, "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err


def test_unexpected_error_is_one_line_and_v_gives_the_traceback(in_project, capsys):
    make_project(in_project)
    argv = ["score", "run", "--model", "mymodels:explode", "--data", "data.npz", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "diffin: error: RuntimeError: boom in the user's factory (run `diffin -v score ...` for the traceback)"]
    assert main(["-v", *argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "mymodels.py" in err and err.rstrip().endswith("boom in the user's factory")
    assert main([*argv, "-v"]) == 1  # -v after the command works too
    assert "Traceback" in capsys.readouterr().err


def test_bad_model_specs_are_named_errors(in_project, capsys):
    make_project(in_project)
    for spec, words in (("mymodels", "module:function"), ("nosuchmodule:build", "cannot import --model"),
                        ("mymodels:nosuch", "cannot import --model")):
        assert main(["score", "run", "--model", spec, "--data", "data.npz", "--quiet"]) == 2
        assert words in capsys.readouterr().err
    assert main(["score", "run", "--model", "mymodels:build", "--quiet"]) == 2
    assert "--model and --data go together" in capsys.readouterr().err
    assert main(["score", "run", "--model", "mymodels:build", "--data", "data.npz", "--setup", "tiny"]) == 2
    assert "not both" in capsys.readouterr().err


def test_task_inputs_carry_only_the_recipe_flags_given(in_project):
    from diffin.cli._tasks import task_inputs

    make_project(in_project, np.int32)
    argv = ["prune", "--run", "run", "--model", "mymodels:build", "--data", "data.npz", "--out", "p"]
    inp = task_inputs(build_parser().parse_args([*argv, "--epochs", "1", "--lr", "0.05", "--nesterov"]),
                      in_project / "p")
    assert inp.train_overrides == {"epochs": 1, "lr": 0.05, "nesterov": True}
    assert inp.train[1].dtype == torch.int64 and inp.val[1].dtype == torch.int64
    assert inp.test is None and inp.n_train == 24
    inp = task_inputs(build_parser().parse_args(argv), in_project / "p")
    assert inp.train_overrides == {}
