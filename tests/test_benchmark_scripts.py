"""The benchmark scripts run end to end on the tiny setup (their numbers are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lds_tails_on_tiny_setup(tmp_path, monkeypatch, capsys):
    mod = _load("lds_tails")
    out = tmp_path / "tails.json"
    monkeypatch.setattr(sys, "argv", ["lds_tails.py", "--setup", "tiny", "--json", str(out)])
    mod.main()
    res = json.loads(out.read_text())
    assert res["setup"] == "tiny" and res["n_subsets"] == 50
    assert [r["method"] for r in res["rows"]] == list(mod.METHODS)
    for r in res["rows"]:
        for k in ("lds", "lds_clipped_1pct", "lds_ranks"):
            assert -1.0 <= r[k] <= 1.0
        assert r["top3_abs"] == sorted(r["top3_abs"], reverse=True)
        assert r["top3_abs"][0] >= r["median_abs"] >= 0
    assert -1.0 <= res["spearman_exact_vs_expected"] <= 1.0
    assert np.isfinite(res["actual_change_std"]) and res["actual_change_std"] > 0
    assert "diffin-exact" in capsys.readouterr().out


def test_speed_setup_swaps_the_activation_only():
    mod = _load("speed")
    base, relu = mod.speed_setup("tanh"), mod.speed_setup("relu")
    assert base.name == "speed" and relu.name == "speed-relu"
    data = base.data()
    kinds = [type(m) for m in relu.model(data).modules()]
    assert torch.nn.ReLU in kinds and torch.nn.Tanh not in kinds
    assert torch.nn.Tanh in [type(m) for m in base.model(data).modules()]
    assert relu.train == base.train and relu.dtype == base.dtype
    shapes = [p.shape for p in base.model(data).parameters()]
    assert [p.shape for p in relu.model(data).parameters()] == shapes


@pytest.mark.slow
def test_speed_on_a_tiny_slice(tmp_path, monkeypatch, capsys):
    mod = _load("speed")
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["speed.py", "--n", "256", "--repeats", "1", "--threads", "1",
                                      "--methods", "diffin-exact", "--naive-samples", "1", "--json", str(out)])
    mod.main()
    res = json.loads(out.read_text())
    assert sorted(res["activations"]) == ["relu", "tanh"] and res["n"] == 256
    for act, block in res["activations"].items():
        assert block["train_seconds"] > 0 and len(block["train_seconds_all"]) == 1
        (r,) = block["results"]
        assert r["method"] == "diffin-exact" and r["activation"] == act and r["n"] == 256
        assert r["seconds"] > 0 and r["x_training_run"] == pytest.approx(r["seconds"] / block["train_seconds"])
    assert res["activations"]["relu"]["results"][0]["hvp"] == "exact"  # a kink: auto picks exact HVPs
    assert res["naive_per_sample_seconds"] > 0
    assert [(m["n"], m["activation"]) for m in res["memory_vs_n"]] == [(64, "tanh"), (128, "tanh"), (256, "tanh")]
    assert "| relu | diffin-exact |" in res["markdown"]
    assert "Training run, relu" in capsys.readouterr().out


def test_embed_benchmark_on_tiny_setup(tmp_path, monkeypatch, capsys):
    mod = _load("embed")
    out = tmp_path / "embed.json"
    monkeypatch.setattr(sys, "argv", ["embed.py", "--setups", "tiny", "--projections", "gradients,gaussian",
                                      "--dims", "4", "--queries", "12", "--query-dim", "4", "--query-check", "3",
                                      "--self", "--self-subset", "8", "--removals", "5", "--sweep-repeats", "1",
                                      "--workdir", str(tmp_path / "w"), "--json", str(out)])
    mod.main()
    res = json.loads(out.read_text())["results"][0]
    assert [r["projection"] for r in res["rows"]] == ["gradients", "gaussian"]
    for r in res["rows"]:
        assert r["dim"] == 4 and r["build_seconds"] > 0 and r["disk_mb"] > 0
        assert -1 <= r["spearman_exact"] <= 1 and -1 <= r["self_spearman"] <= 1
    assert res["queries"]["n"] == 12 and res["queries"]["seconds"] > 0
    assert "spearman_exact" in capsys.readouterr().out


def test_retrain_horizon_on_tiny_setup(tmp_path, monkeypatch, capsys):
    mod = _load("retrain_horizon")
    out = tmp_path / "h.json"
    argv = ["retrain_horizon.py", "--setup", "tiny", "--work", str(tmp_path / "w"), "--subsets", "6", "--seeds", "2",
            "--runs", "2", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    res = json.loads(out.read_text())
    assert res["n_subsets"] == 6 and res["n_seeds"] == 2
    assert {r["variant"] for r in res["rows"]} >= {"diffin-retrain", "removal_fraction 0.5", "run recorded at lr x 0.5"}
    assert all(-1 <= r["lds_reseed"] <= 1 for r in res["rows"])
    mod.main()  # the second call reuses the runs and the cached truth
    assert "| variant | runs | LDS reseed |" in capsys.readouterr().out


def test_verify_speed_on_tiny_setup(tmp_path, monkeypatch, capsys):
    mod = _load("verify_speed")
    out = tmp_path / "verify.json"
    monkeypatch.setattr(sys, "argv", ["verify_speed.py", "--setup", "tiny", "--n", "4", "--json", str(out)])
    mod.main()
    res = json.loads(out.read_text())
    (row,) = res["repeats"]
    assert res["n"] == 4 and row["replay_dtype"] == "float64"
    assert row["verify_seconds"] >= row["score_seconds"] + row["replay_seconds"] > 0
    assert row["x_training"] == pytest.approx(row["verify_seconds"] / row["train_seconds"])
    assert -1.0 <= row["pearson"] <= 1.0
    assert "4 replayed removals" in capsys.readouterr().out


def test_embed_projection_cost_on_tiny_setup(tmp_path, monkeypatch, capsys):
    mod = _load("embed_projection_cost")
    out = tmp_path / "cost.json"
    monkeypatch.setattr(sys, "argv", ["embed_projection_cost.py", "--setup", "tiny", "--dim", "8", "--json", str(out)])
    mod.main()
    res = json.loads(out.read_text())
    assert res["rows_calls"] >= 1 and 0 < res["rows_seconds"] <= res["build_seconds"]
    assert 0 < res["rows_share"] <= 1 and "projection rows" in capsys.readouterr().out


@pytest.mark.slow
def test_prune_pairs_script_runs_and_reports_every_method(tmp_path, monkeypatch):
    """benchmarks/prune_pairs.py on 2,048 pairs: every method's curve, cached retrains reused on a rerun."""
    mod = _load("prune_pairs")
    out = tmp_path / "p.json"
    argv = ["prune_pairs.py", "--n-train", "2048", "--keep", "0.5", "--seeds", "1", "--n-test", "500",
            "--workdir", str(tmp_path / "w"), "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    doc = json.loads(out.read_text())
    res = doc["result"]
    assert doc["meta"]["argv"]["n_train"] == 2048 and doc["meta"]["threads"] == 1
    assert len(doc["meta"]["load_average"]) == 3 and doc["meta"]["machine"]
    assert set(res["methods"]) == {"random", "clip-score", "diffin", "diffin-self"}
    for m, row in res["methods"].items():
        (pt,) = row["curve"]
        assert pt["n_kept"] == 1024 and 0 <= pt["retrieval_accuracy_mean"] <= 1 and pt["infonce_mean"] > 0
        assert (row["auc_mismatched"] is None) == (m == "random")
    cached = sorted(p.name for p in (tmp_path / "w" / "prune-pairs-n2048").glob("*_seed0.json"))
    assert len(cached) == 5  # full + 4 methods
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()  # resumes from the cache: the same numbers
    assert json.loads(out.read_text())["result"]["methods"] == res["methods"]
