"""Debiasing by removal (``diffin debias``), coverage-centric pruning (rule ``stratified``), AUM, and
``diffin-retrain`` with ``removal_fraction``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffin
from _tiny import assert_close, record
from diffin._errors import ConfigError, DataMismatchError
from diffin.bench.builtin.spurious import add_patch, load_mnist5k_spurious
from diffin.bench.builtin.trainer import batch_order
from diffin.cli import main
from diffin.tasks import DebiasConfig, PruneConfig, TaskInputs, builtin_inputs, debias, prune, select
from diffin.tasks._debias import alignment, group_scores
from diffin.tasks._heuristics import importance
from diffin.tasks._prune import _shares, auto_rule, cover, stratified

EXACT = {"hvp": "exact", "dots": "jvp"}


# --------------------------------------------------------------------------- stratified (CCS)
def test_stratified_drops_the_hardest_and_spreads_the_budget_over_the_bins():
    # difficulty 0..99 in 10 equal-width bins of 10 after dropping the 20 hardest (80..99)
    d = np.arange(100.0)
    kept = stratified(d, 16, hard_cut=0.2, strata=8, rng=np.random.default_rng(0))
    assert kept.size == 16 and np.unique(kept).size == 16
    assert d[kept].max() < 80  # the hard cut went first
    np.testing.assert_array_equal(np.bincount((d[kept] // 10).astype(int), minlength=8), [2] * 8)


def test_stratified_gives_a_small_bin_all_it_has_and_the_rest_to_the_others():
    # one bin holds 2 samples, the other 98: a budget of 10 takes both from the small bin
    d = np.concatenate([np.zeros(98), np.ones(2)])
    kept = stratified(d, 10, hard_cut=0.0, strata=2, rng=np.random.default_rng(1))
    assert kept.size == 10 and set(np.flatnonzero(d == 1)) <= set(kept.tolist())


def test_stratified_cuts_less_when_the_rest_could_not_fill_the_budget():
    d = np.arange(10.0)
    kept = stratified(d, 9, hard_cut=0.5, strata=3, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(kept), np.arange(9))  # only the single hardest went


def test_select_stratified_uses_minus_the_score_as_difficulty_and_balances_classes():
    rng = np.random.default_rng(0)
    v = rng.normal(size=300)
    labels = np.repeat([0, 1, 2], 100)
    kept = select(v, 0.2, "stratified", seed=3, hard_cut=0.1)
    assert kept.size == 60
    assert np.isin(np.argsort(v)[:30], kept).sum() == 0  # signed: the 30 most harmful dropped first
    kept_u = select(v, 0.2, "stratified", signed=False, seed=3, hard_cut=0.1)
    assert np.isin(np.argsort(-v)[:30], kept_u).sum() == 0  # unsigned: the 30 highest (hardest) dropped
    kept_b = select(v, 0.2, "stratified", labels, class_balanced=True, seed=3)
    np.testing.assert_array_equal(np.bincount(labels[kept_b]), [20, 20, 20])
    with pytest.raises(ConfigError, match="hard_cut"):
        select(v, 0.2, "stratified", hard_cut=1.0)


def test_auto_rule_stratifies_below_its_threshold():
    assert auto_rule(0.05, 0.5, 0.15) == "stratified"
    assert auto_rule(0.2, 0.5, 0.15) == "drop-harmful"
    assert auto_rule(0.6, 0.5, 0.15) == "keep-influential"
    v = np.random.default_rng(1).normal(size=200)
    np.testing.assert_array_equal(select(v, 0.1, "auto", seed=2, stratify_below=0.15),
                                  select(v, 0.1, "stratified", seed=2))


def test_method_rule_specs_are_parsed_and_checked():
    cfg = PruneConfig(methods="diffin,aum:stratified", rule="auto")
    assert cfg.rule_of("aum:stratified") == ("aum", "stratified") and cfg.rule_of("diffin") == ("diffin", "auto")
    with pytest.raises(ConfigError, match="rule must be one of"):
        PruneConfig(methods="aum:sideways")


# --------------------------------------------------------------------------- cover
def _blobs(sizes, dim=6, seed=0):
    """Rows in well-separated directions, one direction per blob of the given sizes."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[: len(sizes)] * 10
    return np.concatenate([c + 0.1 * rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)]), \
        np.repeat(np.arange(len(sizes)), sizes)


def test_cover_keeps_one_sample_per_direction_however_small_its_blob():
    f, blob = _blobs([200, 100, 5, 3])
    kept = cover(f, 4, np.random.default_rng(0))
    assert sorted(blob[kept].tolist()) == [0, 1, 2, 3]  # random picks would all but miss the small ones


def test_cover_keeps_each_clusters_member_nearest_its_centroid():
    # two blobs; within each, one row sits at the blob's mean direction, the others spread around it
    f, _ = _blobs([30, 30], seed=2)
    f[0], f[30] = [10, 0, 0, 0, 0, 0], [0, 10, 0, 0, 0, 0]
    f[1:30, 2:] += np.random.default_rng(3).choice([-1.0, 1.0], size=(29, 4))  # spread evenly around
    f[31:, 2:] += np.random.default_rng(4).choice([-1.0, 1.0], size=(29, 4))
    assert sorted(cover(f, 2, np.random.default_rng(0)).tolist()) == [0, 30]


def test_cover_reads_directions_not_sizes():
    f, blob = _blobs([50, 50])
    f[:50] *= np.linspace(0.01, 100, 50)[:, None]  # one blob's rows over four orders of magnitude
    kept = cover(f, 2, np.random.default_rng(1))
    assert sorted(blob[kept].tolist()) == [0, 1]


def test_cover_spreads_a_budget_larger_than_its_clusters_by_size():
    f, blob = _blobs([60, 30, 10])
    kept = cover(f, 20, np.random.default_rng(0), max_clusters=3)
    assert kept.size == 20 and np.unique(kept).size == 20
    np.testing.assert_array_equal(np.bincount(blob[kept]), [12, 6, 2])
    np.testing.assert_array_equal(_shares(np.array([5, 1, 100]), 30), [1, 0, 29])  # 30·size/106, remainders
    np.testing.assert_array_equal(_shares(np.array([1, 1, 1, 7]), 9), [1, 1, 1, 6])
    np.testing.assert_array_equal(_shares(np.array([2, 3]), 5), [2, 3])  # never more than a cluster has


def test_cover_fills_up_when_rows_repeat():
    f = np.repeat(np.eye(3), [10, 10, 10], axis=0)  # 3 distinct rows, 5 asked for
    kept = cover(f, 5, np.random.default_rng(0))
    assert kept.size == 5 and np.unique(kept).size == 5
    assert set((np.arange(30)[kept] // 10).tolist()) == {0, 1, 2}
    with pytest.raises(ConfigError, match="cover keeps"):
        cover(f, 0)


def test_select_cover_drops_the_harmful_first_and_needs_features():
    f, blob = _blobs([40, 40, 40])
    v = np.linspace(-1, 1, 120)[np.random.default_rng(5).permutation(120)]
    kept = select(v, 0.1, "cover", seed=0, features=f)
    assert kept.size == 12 and (v[kept] >= 0).all() and set(blob[kept].tolist()) == {0, 1, 2}
    labels = blob
    kept_b = select(v, 0.1, "cover", labels, class_balanced=True, seed=0, features=f)
    np.testing.assert_array_equal(np.bincount(labels[kept_b]), [4, 4, 4])
    # keeping more than the harmless: only as many harmful go as may
    kept_all = select(v, 0.9, "cover", seed=0, features=f)
    np.testing.assert_array_equal(np.sort(kept_all), np.sort(np.argsort(v)[12:]))
    with pytest.raises(ConfigError, match="influence embeddings"):
        select(v, 0.1, "cover")
    assert auto_rule(0.1, 0.5, 0.0, 0.25) == "cover" and auto_rule(0.3, 0.5, 0.0, 0.25) == "drop-harmful"
    np.testing.assert_array_equal(select(v, 0.1, "auto", seed=0, cover_below=0.25, features=f), kept)


# --------------------------------------------------------------------------- AUM
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    inp = builtin_inputs("tiny", 0.1, tmp_path_factory.mktemp("tiny"))
    inp.ensure_run()
    return inp


def test_aum_is_the_mean_margin_before_each_step_of_a_plain_replay(tiny):
    """Reference: the built-in trainer's loop written out (same θ_0, batch order, SGD step), the
    margin of each batch member computed before its step, averaged per sample."""
    cfg = tiny.train_config
    model = tiny.model_factory()
    x, y = tiny.train
    n = len(y)
    total, count = np.zeros(n), np.zeros(n)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    for pos in batch_order(n, cfg.batch_size, cfg.epochs, cfg.seed):
        ids = torch.as_tensor(pos)
        out = model(x[ids])
        with torch.no_grad():
            own = out[torch.arange(len(ids)), y[ids]]
            other = out.clone()
            other[torch.arange(len(ids)), y[ids]] = -torch.inf
            np.add.at(total, pos, (own - other.max(1).values).numpy())
            np.add.at(count, pos, 1)
        loss = torch.nn.functional.cross_entropy(out, y[ids])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_close(importance("aum", tiny), -total / count)


# --------------------------------------------------------------------------- removal_fraction
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_removal_fraction_linearises_around_the_run_with_every_weight_scaled(tmp_path, momentum):
    """With every loss weight s = 1 − α, SGD (with momentum too) takes the steps of a run at
    learning rate s·η: diffin-retrain with ``removal_fraction = α`` on the η run equals (float64,
    full-data proxies) diffin-retrain on a run recorded at s·η, divided by s (that run's credits
    carry s·η, the reweighted sweep's η: a sample's weight moves the batch gradient by G_z/|B|
    at any s)."""
    alpha, lr = 0.4, 0.1
    kw = {"momentum": momentum} if momentum else {}
    base = record(tmp_path / "a", n=18, opt_kw={"lr": lr, **kw})
    scaled = record(tmp_path / "b", n=18, opt_kw={"lr": (1 - alpha) * lr, **kw})
    got = base.score("diffin-retrain", proxy_batch_size=18, removal_fraction=alpha, **EXACT).scores
    want = scaled.score("diffin-retrain", proxy_batch_size=18, **EXACT).scores / (1 - alpha)
    assert_close(got, want)
    plain = base.score("diffin-retrain", proxy_batch_size=18, **EXACT).scores
    assert np.abs(plain - got).max() > 1e-3 * np.abs(plain).max()  # it does change the scores


def test_removal_fraction_is_checked():
    with pytest.raises(ConfigError, match="removal_fraction"):
        diffin.ScoreConfig(removal_fraction=1.0)


def test_removal_fraction_needs_batch_ids(tmp_path):
    tiny = record(tmp_path / "r", ids=False)
    with pytest.raises(ConfigError, match="batch ids"):
        tiny.score("diffin-retrain", removal_fraction=0.5, batch_size=6)


def test_prune_retrain_subset_scores_each_fraction_at_its_own_removal(tiny, tmp_path):
    res = prune(tiny, PruneConfig(keep="0.3,0.7", methods="diffin,random", scores="retrain-subset", seeds=1),
                out=tmp_path / "p", progress=False)
    assert set(res["curves"]) == {"diffin", "random"}
    cfgs = {p.name: json.loads((p / "scores.json").read_text())["config"]
            for p in (tmp_path / "p").glob("scores-diffin-keep*")}
    assert {k: c["removal_fraction"] for k, c in cfgs.items()} == pytest.approx(
        {"scores-diffin-keep0.3": 0.7, "scores-diffin-keep0.7": 0.3})


def test_prune_runs_ccs_on_aum_beside_another_rule(tiny, tmp_path):
    res = prune(tiny, PruneConfig(keep="0.3", methods="diffin,aum:stratified,random", seeds=1),
                out=tmp_path / "p", progress=False)
    assert set(res["curves"]) == {"diffin", "aum:stratified", "random"}
    assert (tmp_path / "p" / "retrains" / "aum@stratified_keep0.3_seed0.json").exists()


def test_prune_auto_covers_the_embedding_below_its_threshold(tiny, tmp_path):
    res = prune(tiny, PruneConfig(keep="0.2,0.4", methods="diffin,random", seeds=1, cover_below=0.3),
                out=tmp_path / "p", progress=False)
    assert [p["rule"] for p in res["curves"]["diffin"]] == ["cover", "drop-harmful"]
    emb = diffin.load_embedding(tmp_path / "p" / "embedding-diffin")
    assert emb.n == tiny.n_train
    kept = json.loads((tmp_path / "p" / "retrains" / "diffin_keep0.2_seed0.json").read_text())
    assert kept["result"]["n_kept"] == round(0.2 * tiny.n_train)
    with pytest.raises(ConfigError, match="rule cover needs an influence embedding"):
        prune(tiny, PruneConfig(keep="0.2", methods="loss:cover", seeds=1), out=tmp_path / "q", progress=False)


# --------------------------------------------------------------------------- the spurious setup
def test_spurious_split_has_the_stated_agreement_and_groups():
    s = load_mnist5k_spurious(400, 200, 200, patch=2, value=0.3)
    patched = s.x_train.reshape(-1, 28, 28)[:, 1:3, 1:3].amin((1, 2)) >= 0.3
    y = s.y_train.numpy()
    assert (patched.numpy() == y.astype(bool)).mean() == pytest.approx(0.95)
    np.testing.assert_array_equal(s.groups_train, 2 * y + patched.numpy())
    for g, yy in ((s.groups_val, s.y_val), (s.groups_test, s.y_test)):
        assert (g % 2 == yy.numpy()).mean() == pytest.approx(0.5)
    assert set(np.unique(s.y_train.numpy())) == {0, 1}
    x = torch.zeros(2, 784)
    out = add_patch(x, np.array([True, False])).reshape(2, 28, 28)
    assert out[0, 1:3, 1:3].eq(0.3).all() and out[0].sum() == pytest.approx(1.2) and out[1].sum() == 0


# --------------------------------------------------------------------------- debias
@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """The tiny setup's run with two groups per class half (a synthetic attribute: the sign of the
    first feature), for the debiasing pipeline."""
    inp = builtin_inputs("tiny", None, tmp_path_factory.mktemp("g"))
    inp.ensure_run()
    gv = (inp.val[0][:, 0] > 0).long().numpy() + 2 * (inp.val[1].numpy() == 0)
    gt = (inp.test[0][:, 0] > 0).long().numpy() + 2 * (inp.test[1].numpy() == 0)
    return inp, gv, gt


def test_group_scores_are_the_mean_of_the_pairwise_columns_of_each_group(grouped):
    inp, gv, _ = grouped
    from diffin.tasks._common import prepare_task

    state = prepare_task(inp, "debias-test", DebiasConfig(), None, False)
    G = int(gv.max()) + 1
    per = group_scores(inp, state, "diffin", EXACT, gv, G, progress=False)
    pair = diffin.influence(inp.run, inp.model_factory(), inp.loss_fn, train=inp.train, target=inp.val,
                            pairwise=True, progress=False, **EXACT)
    want = np.stack([pair[:, gv == g].mean(1) for g in range(G)], 1)
    assert_close(per, want)
    tau, w = alignment(per, np.array([1.0, 2.0, 0.5, 0.5]))
    np.testing.assert_allclose(w, [0.0, 1.0, -0.5, -0.5])
    np.testing.assert_allclose(tau, per @ w)


def test_debias_reports_every_method_and_chooses_k_on_validation(grouped, tmp_path):
    inp, gv, gt = grouped
    cfg = DebiasConfig(fractions="0.05,0.1", jtt_upweights="3", jtt_epochs="final", seeds=2)
    res = debias(inp, cfg, tmp_path / "d", groups=gv.tolist(), test_groups=gt, progress=False)
    m = res["methods"]
    assert set(m) == {"erm", "random", "jtt", "diffin"}
    for r in m.values():
        assert 0 <= r["worst_group_accuracy"] <= 1 and 0 <= r["average_accuracy"] <= 1
        assert len(r["per_seed_worst_group_accuracy"]) == 2
    curve = m["diffin"]["curve"]
    best = max(curve, key=lambda c: c["val_worst_group_accuracy"])
    assert m["diffin"]["removed"] == best["removed"] and best["removed"] in (6, 12)
    assert m["random"]["removed"] == m["diffin"]["removed"] and m["erm"]["removed"] == m["jtt"]["removed"] == 0
    assert m["diffin"]["worst_group_accuracy"] == best["test_worst_group_accuracy"]
    saved = json.loads((tmp_path / "d" / "debias.json").read_text())
    assert saved["methods"]["diffin"]["removed"] == m["diffin"]["removed"]
    assert (tmp_path / "d" / "report.md").exists() and (tmp_path / "d" / "debias.csv").exists()
    # a second call reuses every retrain and score
    again = debias(inp, cfg, tmp_path / "d", groups=gv.tolist(), test_groups=gt, progress=False)
    assert again["methods"]["diffin"] == m["diffin"]


def test_debias_peers_are_skipped_with_a_reason_when_absent(grouped, tmp_path):
    from diffin.peers import available_peers

    if available_peers().get("trak") == "ok":
        pytest.skip("traker is installed here")
    inp, gv, gt = grouped
    cfg = DebiasConfig(fractions="0.05", baselines="", peers=True, seeds=1)
    res = debias(inp, cfg, tmp_path / "d", groups=gv, test_groups=gt, progress=False)
    assert "diffin[peers]" in res["methods"]["trak"]["skipped"]


def test_group_names_map_validation_and_test_alike():
    from diffin.tasks._debias import _as_groups

    names = np.array(["a", "b", "c"])
    np.testing.assert_array_equal(_as_groups(["c", "a", "c"], 3, "g", names), [2, 0, 2])
    np.testing.assert_array_equal(_as_groups(np.array(["b", "c"]), 2, "g", names), [1, 2])
    np.testing.assert_array_equal(_as_groups(torch.tensor([1, 0]), 2, "g"), [1, 0])


def test_debias_input_errors(grouped, tmp_path):
    inp, gv, gt = grouped
    with pytest.raises(ConfigError, match="group label"):
        debias(inp, DebiasConfig(seeds=1), tmp_path / "a", progress=False)
    with pytest.raises(DataMismatchError, match="one group label per sample"):
        debias(inp, DebiasConfig(seeds=1), tmp_path / "b", groups=gv[:-1], test_groups=gt, progress=False)
    with pytest.raises(ConfigError, match="one group only"):
        debias(inp, DebiasConfig(seeds=1), tmp_path / "c", groups=np.zeros_like(gv), test_groups=gt, progress=False)
    with pytest.raises(ConfigError, match="fractions"):
        DebiasConfig(fractions="0.5,1.5")
    with pytest.raises(ConfigError, match="baselines"):
        DebiasConfig(baselines="dfr")
    nogroups = TaskInputs(run=inp.run, model_factory=inp.model_factory, loss_fn=inp.loss_fn, train=inp.train,
                          val=inp.val, test=None)
    with pytest.raises(ConfigError, match="test data"):
        debias(nogroups, DebiasConfig(seeds=1), None, groups=gv, test_groups=gt, progress=False)


def test_cli_debias_with_groups_from_the_data(grouped, tmp_path, capsys, monkeypatch):
    inp, gv, gt = grouped
    npz = tmp_path / "data.npz"
    np.savez(npz, x_train=inp.train[0].numpy(), y_train=inp.train[1].numpy(), x_val=inp.val[0].numpy(),
             y_val=inp.val[1].numpy(), x_test=inp.test[0].numpy(), y_test=inp.test[1].numpy(), g_val=gv, g_test=gt)
    (tmp_path / "tinymodel.py").write_text(
        "import torch\nfrom diffin.bench.builtin.models import mlp\n"
        "def build():\n    torch.manual_seed(0)\n    return mlp(6, 3, (8,), 'tanh').double()\n")
    monkeypatch.chdir(tmp_path)
    args = ["debias", "--run", str(inp.run), "--model", "tinymodel:build", "--data", str(npz), "--groups", "g",
            "--out", str(tmp_path / "o"), "--fractions", "0.05", "--jtt-upweights", "3", "--jtt-epochs", "final",
            "--seeds", "1", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "worst-group acc (test)" in out and "best worst-group accuracy" in out
    assert main([*args[:8], "missing", *args[9:]]) == 2
    assert "lacks the group arrays" in capsys.readouterr().err
