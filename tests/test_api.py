"""``diffin.influence`` / ``diffin.score``: keywords against a config, and the key of saved scores."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import diffin
from _tiny import record


def _run(tiny, **kw):
    kw.setdefault("train", (tiny.X, tiny.Y))
    kw.setdefault("target", (tiny.Xv, tiny.Yv))
    return diffin.score(tiny.run, tiny.make(), tiny.loss, progress=False, **kw)


def test_influence_honours_the_config_when_no_keyword_is_given(tiny_run):
    cfg = diffin.ScoreConfig(method="tracin", pairwise=True)
    got = diffin.influence(tiny_run.run, tiny_run.make(), tiny_run.loss, train=(tiny_run.X, tiny_run.Y),
                           target=(tiny_run.Xv, tiny_run.Yv), config=cfg, progress=False)
    assert got.shape == (24, 8)  # pairwise: one column per target example
    want = _run(tiny_run, method="tracin", pairwise=True).scores
    np.testing.assert_array_equal(got, want)
    res = _run(tiny_run, config=cfg)
    assert res.method == "tracin" and res.variant == "tracin" and res.target_kind == "pairwise"


def test_a_keyword_given_explicitly_overrides_the_config(tiny_run):
    cfg = diffin.ScoreConfig(method="tracin", pairwise=True)
    kw = dict(train=(tiny_run.X, tiny_run.Y), target=(tiny_run.Xv, tiny_run.Yv), config=cfg, progress=False)
    got = diffin.influence(tiny_run.run, tiny_run.make(), tiny_run.loss, method="diffin", pairwise=False, **kw)
    np.testing.assert_array_equal(got, _run(tiny_run, method="diffin").scores)
    got = diffin.influence(tiny_run.run, tiny_run.make(), tiny_run.loss, pairwise=False, **kw)
    np.testing.assert_array_equal(got, _run(tiny_run, method="tracin").scores)  # method from the config
    res = _run(tiny_run, config=cfg, method="grad-dot", seed=5)
    assert res.method == "grad-dot" and res.target_kind == "pairwise" and res.config.seed == 5
    assert cfg.method == "tracin" and cfg.seed == 0  # the caller's config is not changed


def test_saved_scores_carry_the_key_of_run_data_and_config(tiny_run, tmp_path):
    res = _run(tiny_run, method="tracin", out=tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "scores.json").read_text())
    run = diffin.load_run(tiny_run.run)
    assert meta["key"]["run"] == run.fingerprint
    assert set(meta["key"]) == {"run", "train", "target"} and meta["key"] == res.key
    assert meta["config"]["method"] == "tracin"
    again = _run(tiny_run, method="tracin", out=tmp_path / "out")  # the same: written again
    np.testing.assert_array_equal(again.scores, res.scores)


def _forbid_scoring(monkeypatch):
    """Make any estimator run or input check fail the test: refusals must come first."""
    from diffin import _api

    def boom(*a, **k):
        raise AssertionError("scoring started before the output folder was checked")

    monkeypatch.setattr(_api, "ScoringContext", boom)
    monkeypatch.setattr(_api, "check_inputs", boom)


@pytest.mark.parametrize("change", ["train", "target", "config", "run"])
def test_scores_from_other_data_config_or_run_are_refused_before_computing(tiny_run, tmp_path, monkeypatch,
                                                                          change):
    out = tmp_path / "out"
    first = _run(tiny_run, method="tracin", out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    kw: dict = {"method": "tracin"}
    tiny = tiny_run
    if change == "train":
        Y = tiny.Y.clone()
        Y[3] = (Y[3] + 1) % 3  # one relabelled row
        kw["train"] = (tiny.X, Y)
    elif change == "target":
        kw["target"] = (tiny.Xv[:5], tiny.Yv[:5])
    elif change == "config":
        kw["seed"] = 7
    else:  # the same folder, recorded again with another recipe (momentum: in the manifest)
        shutil.rmtree(tiny_run.run)
        tiny = record(tiny_run.run, opt_kw={"lr": 0.1, "momentum": 0.5})
    _forbid_scoring(monkeypatch)
    names = {"train": "training data", "target": "target data", "config": "seed: 0 -> 7", "run": "run"}
    with pytest.raises(diffin.OutputExistsError, match=f"different.*{names[change]}.*overwrite=True"):
        _run(tiny, out=out, **kw)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written
    monkeypatch.undo()
    res = _run(tiny, out=out, overwrite=True, **kw)
    meta = json.loads((out / "scores.json").read_text())
    assert meta["key"] == res.key != first.key or change == "config"
    np.testing.assert_array_equal(np.load(out / "scores.npy"), res.scores)


def test_save_refuses_another_result_and_overwrite_replaces_it(tiny_run, tmp_path):
    a = _run(tiny_run, method="tracin")
    b = _run(tiny_run, method="tracin", train=(tiny_run.X * 1.5, tiny_run.Y))
    a.save(tmp_path / "o")
    with pytest.raises(diffin.OutputExistsError, match="training data"):
        b.save(tmp_path / "o")
    b.save(tmp_path / "o", overwrite=True)
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "scores.npy"), b.scores)


def test_a_with_ids_dataset_keys_like_the_plain_dataset(tiny_run, tmp_path):
    ds = torch.utils.data.TensorDataset(tiny_run.X, tiny_run.Y)
    _run(tiny_run, method="tracin", train=ds, out=tmp_path / "o")
    _run(tiny_run, method="tracin", train=diffin.with_ids(ds), out=tmp_path / "o")  # not refused
