"""clean / delete / prune on the tiny built-in setup: outputs, selection rules, resume, bad input.

Cache keys and the retraining recipe: tests/test_task_keys.py; reports: tests/test_reports.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

import diffin
from diffin import metrics
from diffin._errors import ConfigError, InvalidIdsError, OutputExistsError
from diffin.tasks import (
    CleanConfig,
    DeleteConfig,
    PruneConfig,
    builtin_inputs,
    clean,
    delete,
    prune,
    select,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return builtin_inputs("tiny", 0.1, out), out


# ------------------------------------------------------------------ clean
def test_clean_outputs_and_detection(tiny, tmp_path):
    inp, _ = tiny
    res = clean(inp, CleanConfig(method="diffin", retrain=True, baselines="tracin,loss,cleanlab", cleanlab_folds=3),
                out=tmp_path / "c", progress=False)
    assert res["n_flagged"] == 12 and len(res["flagged_ids"]) == 12
    assert set(res["detection"]) == {"diffin", "tracin", "loss", "cleanlab"}
    for d in res["detection"].values():
        assert 0 <= d["auc"] <= 1 and set(d["recall_at"]) == {"0.05", "0.1", "0.2"}
    r = res["retrain"]
    for k in ("before", "after", "random_removal", "oracle_removal"):
        assert {"test_accuracy", "test_loss"} <= set(r[k])
    saved = json.loads((tmp_path / "c" / "clean.json").read_text())
    assert saved["flagged_ids"] == res["flagged_ids"]
    lines = (tmp_path / "c" / "clean.csv").read_text().splitlines()
    assert len(lines) == 121 and lines[0].startswith("id,label,true_label,flipped")
    assert sum(int(row.split(",")[-1]) for row in lines[1:]) == 12
    assert (tmp_path / "c" / "report.md").exists()
    # the flagged samples are the highest-harm ones: lowest diffin scores
    s = diffin.influence(inp.run, inp.model_factory(), inp.loss_fn, train=inp.train, target=inp.val,
                         progress=False)
    assert set(res["flagged_ids"]) == set(np.argsort(s, kind="stable")[:12].tolist())


def test_clean_self_influence_and_count(tiny, tmp_path):
    inp, _ = tiny
    res = clean(inp, CleanConfig(no_validation=True, count=5, baselines="loss", method="tracin"),
                progress=False)
    assert res["ranking"] == "self-influence" and res["n_flagged"] == 5


def test_clean_resume_reuses_scores_and_refuses_other_configs(tiny, tmp_path, monkeypatch):
    inp, _ = tiny
    cfg = CleanConfig(baselines="tracin")
    first = clean(inp, cfg, out=tmp_path / "c", progress=False)

    def boom(*a, **k):
        raise AssertionError("scores should have been reused")

    monkeypatch.setattr("diffin.tasks._common.score", boom)
    again = clean(inp, cfg, out=tmp_path / "c", progress=False)
    assert again["flagged_ids"] == first["flagged_ids"]
    monkeypatch.undo()
    with pytest.raises(OutputExistsError, match="fraction"):
        clean(inp, CleanConfig(baselines="tracin", fraction=0.2), out=tmp_path / "c", progress=False)
    res = clean(inp, CleanConfig(baselines="tracin", fraction=0.2), out=tmp_path / "c", overwrite=True,
                progress=False)
    assert res["n_flagged"] == 24


@pytest.mark.parametrize("bad", [dict(fraction=0.0), dict(fraction=1.5), dict(count=0)])
def test_clean_bad_fractions(bad):
    with pytest.raises(ConfigError):
        CleanConfig(**bad)


def test_clean_count_larger_than_data(tiny):
    with pytest.raises(ConfigError, match="count"):
        clean(tiny[0], CleanConfig(count=10_000, baselines=""), progress=False)


# ------------------------------------------------------------------ delete
def test_delete_random_groups(tiny, tmp_path):
    inp, _ = tiny
    res = delete(inp, DeleteConfig(random_groups=6, group_size=4), out=tmp_path / "d", progress=False)
    assert len(res["groups"]) == 6 and res["prediction"] == "group-sweep"
    # under `keep` the group sweep equals the sum of member scores up to float64 rounding
    sums = np.array([g["predicted_sum"] for g in res["groups"]])
    floor = 1e-12 * np.abs(sums).max()
    for g in res["groups"]:
        assert len(g["ids"]) == 4
        np.testing.assert_allclose(g["predicted"], g["predicted_sum"], rtol=1e-9, atol=floor)
    for k in ("pearson", "spearman", "mae"):
        assert np.isfinite(res[k])
    assert res["pearson"] > 0.8
    assert (tmp_path / "d" / "predicted_vs_actual.png").exists()
    assert len((tmp_path / "d" / "delete.csv").read_text().splitlines()) == 7


def test_delete_ids_file_renormalize_and_resume(tiny, tmp_path, monkeypatch):
    inp, _ = tiny
    f = tmp_path / "ids.txt"
    f.write_text("1, 2, 3\n# a comment\n10 11\n40\n")
    cfg = DeleteConfig(ids=str(f), convention="renormalize")
    res = delete(inp, cfg, out=tmp_path / "d", progress=False)
    assert [g["ids"] for g in res["groups"]] == [[1, 2, 3], [10, 11], [40]]
    assert set(res["by_prediction"]) == {"sum", "group-sweep"}
    monkeypatch.setattr("diffin.tasks._delete.replay_removal",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("not resumed")))
    again = delete(inp, cfg, out=tmp_path / "d", progress=False)
    assert [g["actual"] for g in again["groups"]] == [g["actual"] for g in res["groups"]]


def test_delete_bad_ids(tiny, tmp_path):
    inp, _ = tiny
    f = tmp_path / "ids.txt"
    f.write_text("1 2 999\n")
    with pytest.raises(InvalidIdsError, match="999"):
        delete(inp, DeleteConfig(ids=str(f)), progress=False)
    f.write_text("1 two\n")
    with pytest.raises(ConfigError, match="integer"):
        delete(inp, DeleteConfig(ids=str(f)), progress=False)
    with pytest.raises(ConfigError, match="exist"):
        delete(inp, DeleteConfig(ids=str(tmp_path / "nope.txt")), progress=False)
    with pytest.raises(InvalidIdsError, match="empty"):
        delete(inp, DeleteConfig(), groups=[[1, 2], []], progress=False)


# ------------------------------------------------------------------ prune
def test_select_rules():
    v = np.array([0.5, -0.3, 0.2, -0.1, 0.9, 0.0, -0.7, 0.4])
    np.testing.assert_array_equal(select(v, 0.5, "keep-helpful"), [0, 2, 4, 7])
    # drop-harmful: the 3 negatives go first (6, 1, 3); the 4th dropped at random from the rest
    kept = select(v, 0.5, "drop-harmful", seed=1)
    assert len(kept) == 4 and not {1, 3, 6} & set(kept.tolist())
    kept = select(v, 0.75, "drop-harmful")
    np.testing.assert_array_equal(kept, [0, 2, 3, 4, 5, 7])  # only the two most harmful dropped
    np.testing.assert_array_equal(select(v, 0.5, "drop-harmful", signed=False), [0, 2, 4, 7])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    kept = select(v, 0.5, "keep-helpful", labels, class_balanced=True)
    np.testing.assert_array_equal(kept, [0, 2, 4, 7])
    assert np.bincount(labels[kept]).tolist() == [2, 2]
    with pytest.raises(ConfigError, match="no samples"):
        select(v, 0.01)
    for f in (0.0, 1.2):
        with pytest.raises(ConfigError):
            select(v, f)


def test_prune_curves_and_resume(tiny, tmp_path, monkeypatch):
    inp, _ = tiny
    cfg = PruneConfig(keep="0.3,0.7", methods="diffin,tracin,random,loss,el2n,grand,forgetting", seeds=1)
    res = prune(inp, cfg, out=tmp_path / "p", progress=False)
    assert set(res["curves"]) == {"diffin", "tracin", "random", "loss", "el2n", "grand", "forgetting"}
    for pts in res["curves"].values():
        assert [p["keep"] for p in pts] == [0.3, 0.7]
        for p in pts:
            assert 0 <= p["test_accuracy_mean"] <= 1 and p["test_accuracy_std"] >= 0
    assert res["curves"]["diffin"][0]["n_kept"] == 36
    assert (tmp_path / "p" / "prune_curves.png").exists()
    monkeypatch.setattr("diffin.tasks._common.train_builtin",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("not resumed")))
    again = prune(inp, cfg, out=tmp_path / "p", progress=False)
    assert again["curves"] == res["curves"]


def test_prune_bad_input(tiny):
    with pytest.raises(ConfigError):
        PruneConfig(keep="0.5,1.5")
    with pytest.raises(ConfigError):
        PruneConfig(keep="abc")
    with pytest.raises(ConfigError, match="unknown"):
        prune(tiny[0], PruneConfig(keep="0.5", methods="nope", seeds=1), progress=False)


def test_self_influence_of_large_sets_comes_from_the_embedding(tiny, tmp_path, monkeypatch):
    """Above SELF_EMBED_MIN_N samples, clean's and prune's METHOD-self read the embedding's self-influence
    (saved in out/embedding-METHOD and reused), not one exact sweep per chunk of samples."""
    from diffin.tasks import _self

    inp, _ = tiny
    monkeypatch.setattr(_self, "SELF_EMBED_MIN_N", 10)
    monkeypatch.setattr(_self, "SELF_EMBED_DIM", 8)
    res = clean(inp, CleanConfig(baselines="diffin-self"), out=tmp_path / "c", progress=False)
    emb = diffin.load_embedding(tmp_path / "c" / "embedding-diffin", model=inp.model_factory(), loss_fn=inp.loss_fn,
                                train=inp.train)
    assert emb.dim == 8 and emb.projection.kind == "gradients"
    own = emb.self_influence()
    flipped = inp.flipped
    assert res["detection"]["diffin-self"]["auc"] == pytest.approx(metrics.detection_auc(-own, flipped))
    monkeypatch.setattr("diffin.tasks._common.score", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    again = clean(inp, CleanConfig(baselines="diffin-self"), out=tmp_path / "c", progress=False)
    assert again["detection"]["diffin-self"] == res["detection"]["diffin-self"]


def test_self_influence_of_very_large_sets_is_the_horizon_self_influence(tiny, tmp_path, monkeypatch):
    """From SELF_HORIZON_MIN_N samples, clean's and prune's METHOD-self rank by the sketched horizon-0
    self-influence standardised within each batch (docs/method.md §4.11), no embedding built."""
    from diffin.tasks import _self

    inp, _ = tiny
    monkeypatch.setattr(_self, "SELF_EMBED_MIN_N", 10)
    monkeypatch.setattr(_self, "SELF_HORIZON_MIN_N", 10)
    res = clean(inp, CleanConfig(baselines="diffin-self"), out=tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "embedding-diffin").exists()
    own = diffin.self_influence(inp.run, inp.model_factory(), inp.loss_fn, train=inp.train,
                                dim=_self.SELF_HORIZON_DIM, progress=False).standardized
    assert res["detection"]["diffin-self"]["auc"] == pytest.approx(metrics.detection_auc(-own, inp.flipped))
