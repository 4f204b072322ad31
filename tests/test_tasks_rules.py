"""Pruning's selection rules and scores, cleaning's combined detector, the memorising setup."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

import diffin
from diffin._errors import ConfigError
from diffin.bench.builtin import get_setup
from diffin.bench.builtin.data import load_mnist5k
from diffin.bench.builtin.trainer import train
from diffin.metrics import detection_auc
from diffin.tasks import CleanConfig, PruneConfig, builtin_inputs, clean, select
from diffin.tasks._clean import rank_mean
from diffin.tasks._common import losses_at, theta_final
from diffin.tasks._prune import scoring


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return builtin_inputs("tiny", 0.1, tmp_path_factory.mktemp("tiny"))


def test_keep_influential_keeps_the_largest_magnitudes():
    v = np.array([0.5, -0.3, 0.2, -0.1, 0.9, 0.0, -0.7, 0.4])
    # |v| = .5 .3 .2 .1 .9 0 .7 .4: the four largest are ids 4, 6, 0, 7
    np.testing.assert_array_equal(select(v, 0.5, "keep-influential"), [0, 4, 6, 7])
    np.testing.assert_array_equal(select(v, 0.25, "keep-influential"), [4, 6])


def test_auto_switches_rule_at_the_kept_fraction():
    rng = np.random.default_rng(3)
    v = rng.normal(size=200)
    for f in (0.1, 0.3, 0.45):
        np.testing.assert_array_equal(select(v, f, "auto", seed=5), select(v, f, "drop-harmful", seed=5))
    for f in (0.5, 0.7, 0.9):
        np.testing.assert_array_equal(select(v, f, "auto", seed=5), select(v, f, "keep-influential"))
    # another switch moves the boundary
    np.testing.assert_array_equal(select(v, 0.5, "auto", seed=5, switch=0.8), select(v, 0.5, "drop-harmful", seed=5))
    np.testing.assert_array_equal(select(v, 0.3, "auto", switch=0.2), select(v, 0.3, "keep-influential"))


@pytest.mark.parametrize("rule", ["auto", "drop-harmful", "keep-helpful", "keep-influential"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_every_rule_keeps_exactly_k_and_class_balanced_keeps_each_class_fraction(rule, fraction):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [50, 120, 30])
    v = rng.normal(size=labels.size) + labels  # scores that favour class 2 unless balanced
    kept = select(v, fraction, rule, seed=1)
    assert kept.size == round(fraction * labels.size) and np.unique(kept).size == kept.size
    kept = select(v, fraction, rule, labels, class_balanced=True, seed=1)
    counts = np.bincount(labels[kept], minlength=3)
    np.testing.assert_array_equal(counts, [round(fraction * n) for n in (50, 120, 30)])


def test_retrain_scores_ask_the_estimator_for_a_retraining_prediction():
    assert scoring("diffin", "replay") == ("diffin", {})
    assert scoring("diffin", "retrain") == ("diffin", {"predicts": "retrain"})
    assert scoring("tracin", "retrain") == ("tracin", {"predicts": "retrain"})


@pytest.mark.parametrize("bad", [dict(switch=0.0), dict(switch=1.5), dict(scores="fresh"), dict(rule="best")])
def test_prune_config_rejects_bad_options(bad):
    with pytest.raises(ConfigError):
        PruneConfig(**bad)


def test_memorising_setup_drives_the_flipped_labels_loss_near_zero(tmp_path):
    """The recipe of ``mnist5k-memorise`` on a 64-sample slice: every label, flipped ones
    included, is fitted (training loss far below the ln 10 ≈ 2.3 of chance)."""
    setup = get_setup("mnist5k-memorise")
    small = setup.with_changes(load=lambda dt: load_mnist5k(64, 16, 16, seed=0, dtype=dt),
                               train=replace(setup.train, checkpoint_every=0))
    data = small.data()
    assert data.flipped.sum() == round(0.1 * 64)
    model = small.model(data)
    train(model, data.x_train, data.y_train, small.train, tmp_path / "run")
    with torch.no_grad():
        losses = small.loss_fn(model(data.x_train), data.y_train)
    flipped = torch.as_tensor(data.flipped)
    assert losses.mean() < 0.05 and losses[flipped].max() < 0.2
    assert (model(data.x_train).argmax(1) == data.y_train).all()


def test_rank_mean_is_the_mean_rank_percentile():
    a = np.array([3.0, 1.0, 2.0, 10.0])
    b = np.array([0.1, 0.4, 0.3, 0.2])
    # ranks of a: 3 1 2 4; of b: 1 4 3 2 -> mean percentiles (3+1)/8, (1+4)/8, (2+3)/8, (4+2)/8
    np.testing.assert_allclose(rank_mean([a, b]), [0.5, 0.625, 0.625, 0.75], rtol=0, atol=1e-15)
    # ties share their average rank; one signal gives its own percentile
    np.testing.assert_allclose(rank_mean([np.array([1.0, 1.0, 2.0])]), [0.5, 0.5, 1.0], rtol=0, atol=1e-15)


def test_combined_detector_ranks_loss_and_self_influence(tiny, tmp_path):
    inp = tiny
    res = clean(inp, CleanConfig(method="combined", baselines="loss,tracin-self", count=12),
                out=tmp_path / "c", progress=False)
    assert set(res["detection"]) == {"combined", "loss", "tracin-self"}
    fm, theta, _ = theta_final(inp)
    loss = losses_at(fm, theta, inp.train)
    self_infl = diffin.influence(inp.run, inp.model_factory(), inp.loss_fn, train=inp.train, target="self",
                                 method="tracin", progress=False)
    expected = (rankdata(loss) + rankdata(self_infl)) / (2 * inp.n_train)
    assert set(res["flagged_ids"]) == set(np.argsort(-expected, kind="stable")[:12].tolist())
    assert res["detection"]["combined"]["auc"] == pytest.approx(detection_auc(-expected, inp.flipped), abs=1e-12)
    header = (tmp_path / "c" / "clean.csv").read_text().splitlines()[0]
    assert "harm_combined" in header and "harm_tracin-self" in header


@pytest.mark.parametrize("bad", ["", "combined", "loss,combined"])
def test_combined_needs_other_signals(bad):
    with pytest.raises(ConfigError, match="combine"):
        CleanConfig(combine=bad)


def test_prune_by_self_influence_keeps_the_least_self_influential(tiny, tmp_path):
    """``METHOD-self`` in prune: the kept set at fraction f is the f·N samples of lowest self-influence
    (diffin's, scored against 'self'), and detection ranks by high self-influence."""
    from diffin.tasks import prune
    from diffin.tasks._common import TaskState
    from diffin.tasks._prune import _values

    out = prune(tiny, PruneConfig(keep="0.5", methods="tracin-self,random", seeds=1), out=tmp_path / "p",
                progress=False)
    assert set(out["curves"]) == {"tracin-self", "random"}
    assert "tracin-self" in out["detection"]
    own = diffin.score(tiny.ensure_run(), tiny.model_factory(), tiny.loss_fn, train=tiny.train, target="self",
                       method="tracin", progress=False).scores
    state = TaskState(None, tiny.ensure_run(), {"data": tiny.data_fingerprints()})
    v, signed = _values("tracin-self", tiny, state, PruneConfig(), False)
    assert not signed
    np.testing.assert_allclose(v, -own, rtol=1e-6, atol=1e-12 * np.abs(own).max())
    kept = select(v, 0.5, signed=False)
    assert own[kept].max() <= np.sort(own)[kept.size - 1] + 1e-12 * np.abs(own).max()
    with pytest.raises(ConfigError, match="self-influence"):
        _values("nope-self", tiny, state, PruneConfig(), False)
