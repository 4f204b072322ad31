"""Command-line smoke tests (in-process through diffin.cli.main)."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch

import diffin
from diffin.bench.builtin.setups import read_setup_meta
from diffin.cli import main


def test_methods_lists_every_estimator(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("diffin", "diffin-exact", "diffin-frozen", "diffin-expected", "diffin-closed-form",
                 "tracin"):
        assert name in out


def test_help_on_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    out = capsys.readouterr().out
    assert "--hvp" in out and "finite" in out and "--convention" in out and "--fd-eps" in out


def test_train_then_score_builtin(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--setup", "tiny", "--out", str(run), "--quiet", "--epochs", "2"]) == 0
    assert "trained tiny" in capsys.readouterr().out
    setup = read_setup_meta(run)  # diffin_setup.json: the setup and the recipe actually trained
    assert setup.name == "tiny" and setup.train.epochs == 2
    for method in ("diffin", "diffin-closed-form", "tracin"):
        out = tmp_path / method
        assert main(["score", str(run), "--method", method, "--out", str(out), "--quiet"]) == 0
        meta = json.loads((out / "scores.json").read_text())
        assert meta["method"] == method and meta["config"]["method"] == method
        scores = np.load(out / "scores.npy")
        assert scores.shape == (120,)
        rows = list(csv.DictReader((out / "scores.csv").read_text().splitlines()))
        assert len(rows) == 120 and "loss_change_if_removed" in rows[0]
    meta = json.loads((tmp_path / "diffin" / "scores.json").read_text())
    assert meta["variant"] == "diffin-exact"
    # self-influence, and a re-run with another config into the same folder is refused
    assert main(["score", str(run), "--target", "self", "--method", "tracin", "--out", str(tmp_path / "self"),
                 "--quiet"]) == 0
    assert np.load(tmp_path / "self" / "scores.npy").shape == (120,)
    code = main(["score", str(run), "--method", "tracin", "--out", str(tmp_path / "diffin"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("diffin: error: OutputExistsError:")
    assert "--overwrite" in err and "overwrite=True" not in err


def test_score_user_model_from_npz(tmp_path, monkeypatch, capsys):
    import diffin

    mod = tmp_path / "mymodels.py"
    mod.write_text("import torch\n\ndef build():\n    torch.manual_seed(0)\n"
                   "    return torch.nn.Sequential(torch.nn.Linear(3, 2)).double()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mymodels", None)
    import mymodels

    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 2, (20,), generator=g)
    np.savez(tmp_path / "data.npz", x_train=X.numpy(), y_train=Y.numpy(), x_val=X[:5].numpy(),
             y_val=Y[:5].numpy())
    model = mymodels.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with diffin.Recorder(tmp_path / "run", model, optimizer=opt, checkpoint_every=2) as rec:
        for s in range(0, 20, 5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[s : s + 5]), Y[s : s + 5]).backward()
            opt.step()
            rec.step(list(range(s, s + 5)))
    code = main(["score", str(tmp_path / "run"), "--model", "mymodels:build", "--data",
                 str(tmp_path / "data.npz"), "--out", str(tmp_path / "s"), "--quiet"])
    assert code == 0
    want = diffin.influence(tmp_path / "run", mymodels.build(),
                            lambda o, y: torch.nn.functional.cross_entropy(o, y, reduction="none"),
                            train=(X, Y), target=(X[:5], Y[:5]), progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "s" / "scores.npy"), want)


def test_errors_are_named_and_exit_2(tmp_path, capsys):
    assert main(["score", str(tmp_path / "missing"), "--setup", "tiny", "--quiet"]) == 2
    assert "RunNotFoundError" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    assert main(["score", str(tmp_path / "r"), "--quiet"]) == 2
    assert "--setup" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_writes_scores_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "scores.csv").read_text().splitlines()))
    assert len(rows) == 4000
    assert list(rows[0])[:3] == ["id", "label", "flipped"]
    assert {"score_diffin", "score_diffin-closed-form", "score_tracin"} <= set(rows[0])
    for f in ("report.md", "histograms.png", "most_harmful.png", "summary.json"):
        assert (out / f).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_flipped"] == 400
    aucs = {k.split()[0]: v["auc"] for k, v in summary["methods"].items()}
    assert aucs["diffin"] > 0.5 and aucs["loss"] > 0.5  # the loss baseline is in the demo's table


@pytest.mark.slow
def test_quickstart_example_runs():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "most harmful" in res.stdout and "flipped label" in res.stdout


def test_embed_writes_the_embedding_and_self_influence(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "emb"
    assert main(["train", "--setup", "tiny", "--out", str(run), "--quiet", "--epochs", "2"]) == 0
    assert main(["embed", str(run), "--dim", "6", "--out", str(out), "--self-influence", "--quiet"]) == 0
    assert "embedding" in capsys.readouterr().out
    emb = diffin.load_embedding(out)
    assert emb.values.shape[1] == 6 and emb.manifest["config"]["hvp"] == "exact"
    lines = (out / "self_influence.csv").read_text().splitlines()
    assert lines[0] == "id,label,loss_change_if_removed" and len(lines) == emb.n + 1
    assert main(["embed", str(run), "--dim", "7", "--out", str(out), "--quiet"]) == 2  # another config: refused
