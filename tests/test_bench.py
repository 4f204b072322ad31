"""`diffin bench` on the tiny setup: the JSON schema and that the numbers are what they claim."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _tiny import tolerance
from diffin import metrics
from diffin.bench import BenchConfig, load_results, run_bench
from diffin.cli import main

KEYS = {"method", "variant", "pearson", "spearman", "kendall", "jaccard_top10", "mae", "lds", "seconds",
        "peak_rss_mb"}


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out.json"
    cfg = BenchConfig(methods="diffin,tracin,grad-cos,if-cg", n_removed=12, lds_subsets=6, lds_examples=3)
    run_bench(["tiny"], cfg, str(out), workdir=str(out.parent / "work"), quiet=True)
    return out


def test_json_schema(bench_json):
    doc = json.loads(bench_json.read_text())
    for key in ("setup", "n_train", "train_seconds", "ground_truth", "results", "machine", "config"):
        assert key in doc
    gt = doc["ground_truth"]
    assert gt["kind"] == "replayed-removal" and gt["convention"] == "keep" and gt["n_removed"] == 12
    assert isinstance(gt["seconds"], float)
    methods = [r["method"] for r in doc["results"]]
    assert methods == ["diffin", "tracin", "grad-cos", "if-cg"]
    for r in doc["results"]:
        assert set(r) >= KEYS
        assert -1 <= r["pearson"] <= 1 and r["seconds"] > 0
    assert doc["results"][0]["variant"] == "diffin-exact"
    assert np.isnan(doc["results"][2]["mae"])  # grad-cos is unitless
    assert "linearisation_ceiling" in doc
    assert load_results(bench_json)[0]["setup"] == "tiny"


def test_metrics_recomputed_from_saved_scores(bench_json, tmp_path):
    """The bench's Pearson for diffin equals the one computed from scores and a fresh replay."""
    import diffin
    from diffin.bench.builtin import get_setup
    from diffin.groundtruth import replay_removal

    doc = json.loads(bench_json.read_text())
    setup = get_setup("tiny")
    data = setup.data()
    run = bench_json.parent / "work" / "tiny"
    ids = doc["ground_truth"]["removed_ids"]
    kw = dict(train=(data.x_train, data.y_train), target=(data.x_val, data.y_val), progress=False)
    actual = replay_removal(run, setup.model(data), setup.loss_fn, remove=ids, **kw)
    s = diffin.influence(run, setup.model(data), setup.loss_fn, **kw)
    # Pearson is a smooth O(1) function of its inputs, whose rounding (float64) is far below √ε/10
    rtol, _ = tolerance(torch.float64)
    assert doc["results"][0]["pearson"] == pytest.approx(metrics.pearson(s[ids], actual), abs=rtol)


def test_cli_bench(tmp_path, capsys):
    out = tmp_path / "b.json"
    code = main(["bench", "--setup", "tiny", "--json", str(out), "--methods", "diffin,tracin",
                 "--n-removed", "8", "--lds-subsets", "0", "--quiet"])
    assert code == 0
    assert "pearson" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert [r["method"] for r in doc["results"]] == ["diffin", "tracin"]
    assert "lds" not in doc


def test_bench_setups_include_adam_and_clipping() -> None:
    from diffin.bench import BENCH_SETUPS
    from diffin.bench.builtin import get_setup

    assert {"mnist5k-mlp-adamw", "mnist5k-mlp-clip", "mnist5k-mlp-adamw-groups"} <= set(BENCH_SETUPS)
    for name in BENCH_SETUPS:
        get_setup(name)  # every listed setup exists


def test_method_refused_by_name_gets_an_error_row(tmp_path, monkeypatch, capsys):
    """A method that refuses the run (UnsupportedMethodError) leaves a row with its message; the
    other methods are still scored, and a clipping run reports the share of clipped steps."""
    import dataclasses

    import diffin.bench.harness as bench
    from diffin._errors import UnsupportedMethodError
    from diffin.bench.builtin import setups

    real = bench.score

    def score(*a, method, **kw):
        if method == "tracin":
            raise UnsupportedMethodError("tracin cannot score this run; use diffin")
        return real(*a, method=method, **kw)

    monkeypatch.setattr(bench, "score", score)
    tiny = setups.get_setup("tiny")
    recipe = dataclasses.replace(tiny.train, optimizer="adamw", lr=0.01, weight_decay=0.01, schedule="cosine",
                                 weight_decay_on="weights", clip_grad_norm=0.5)  # the user recipe, tiny
    monkeypatch.setitem(setups.SETUPS, "tiny-clip", tiny.with_changes(name="tiny-clip", train=recipe))
    cfg = BenchConfig(methods="tracin,diffin", n_removed=6, lds_subsets=0)
    doc = run_bench(["tiny-clip"], cfg, str(tmp_path / "b.json"), workdir=str(tmp_path / "w"), quiet=True)
    bad, good = doc["results"]
    assert bad == {"method": "tracin", "variant": "error: tracin cannot score this run; use diffin",
                   "error": "tracin cannot score this run; use diffin"}
    assert good["method"] == "diffin" and good["variant"] == "diffin-exact" and -1 <= good["pearson"] <= 1
    assert doc["optimizer"] == "adamw"
    assert doc["clip_grad_norm"] == 0.5 and 0 < doc["clipped_fraction"] <= 1
    assert "of the steps clipped" in capsys.readouterr().out


@pytest.mark.slow
def test_adam_speed_script(tmp_path, monkeypatch, capsys):
    """benchmarks/adam_speed.py runs end to end on the tiny setup (its timings are not asserted)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "adam_speed.py"
    spec = importlib.util.spec_from_file_location("adam_speed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "a.json"
    monkeypatch.setattr(sys, "argv", ["adam_speed.py", "--setup", "tiny", "--repeats", "1", "--rounds", "1",
                                      "--json", str(out)])
    mod.main()
    doc = json.loads(out.read_text())
    assert doc["variants"] == {"sgd": "diffin-exact", "adamw": "diffin-exact"}
    assert doc["adamw_recipe"]["optimizer"] == "adamw" and doc["adamw_recipe"]["lr"] == 1e-3
    assert doc["ratio_adamw_over_sgd"] == pytest.approx(doc["seconds"]["adamw"] / doc["seconds"]["sgd"], rel=1e-12)
    assert all(len(v) == 1 and v[0] > 0 for v in doc["seconds_all"].values())
    assert "AdamW run / on the SGD run" in capsys.readouterr().out
