"""Label noise where cheap signals fail (pair-flip, instance-dependent), the AUM baseline, and what
``diffin clean`` promises: default baselines without costly methods, time estimates first, advice when
a baseline wins, before/after numbers on held-out data with the model's own running statistics."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffin._errors import ConfigError
from diffin.bench.builtin import TrainConfig, train
from diffin.bench.builtin.data import confusion_flip_labels, make_synthetic, pair_flip_labels
from diffin.bench.builtin.models import cross_entropy
from diffin.bench.builtin.setups import get_setup
from diffin.bench.builtin.trainer import evaluate
from diffin.report import winner
from diffin.tasks import CleanConfig, TaskInputs, builtin_inputs, clean
from diffin.tasks._clean import AUTO_DETECTOR, AUTO_DETECTOR_NO_RECIPE, COSTLY, DEFAULT_BASELINES, parts, rank_mean
from diffin.tasks._heuristics import importance


# ------------------------------------------------------------------ noise models
def test_pair_flip_sets_c_to_c_plus_1_in_every_class() -> None:
    s = pair_flip_labels(make_synthetic(200, 10, 10, 5, 4, seed=3), 0.3, seed=1)
    yc, y = s.y_train_clean.numpy(), s.y_train.numpy()
    assert np.array_equal(s.flipped, y != yc)
    assert np.all(y[s.flipped] == (yc[s.flipped] + 1) % 4)
    for c in range(4):  # exactly round(0.3 n_c) in every class
        assert s.flipped[yc == c].sum() == round(0.3 * (yc == c).sum())
    again = pair_flip_labels(make_synthetic(200, 10, 10, 5, 4, seed=3), 0.3, seed=1)
    assert np.array_equal(again.y_train.numpy(), y)
    with pytest.raises(ConfigError):
        pair_flip_labels(make_synthetic(20, 5, 5, 3, 2, seed=0), 0.5)


def test_confusion_flip_goes_to_the_confused_class_on_ambiguous_samples() -> None:
    """Two of three Gaussian classes overlap: flips of their samples go to each other, and the
    flipped samples sit closer to the other class's centre than the unflipped ones do."""
    g = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    y = np.repeat(np.arange(3), 200)
    x = centres[y] + g.normal(size=(600, 2)) * 0.5
    s = make_synthetic(600, 1, 1, 2, 3, seed=0)
    s.x_train, s.y_train = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    s.y_train_clean, s.flipped = s.y_train.clone(), np.zeros(600, dtype=bool)
    confusion_flip_labels(s, 0.1, seed=0)
    f, noisy = s.flipped, s.y_train.numpy()
    assert f.sum() == 60 and np.array_equal(f, noisy != y)
    pair = y < 2
    to_each_other = (noisy[f & pair] == 1 - y[f & pair]).mean()
    assert to_each_other > 0.75  # measured 45 of 54
    assert (f & (y == 2)).sum() < (f & (y == 0)).sum() and (f & (y == 2)).sum() < (f & (y == 1)).sum()
    d_other = np.abs(x[:, 0] - np.where(y == 0, 1.0, 0.0))
    assert d_other[f & pair].mean() < d_other[~f & pair].mean()


@pytest.mark.parametrize("name, n_flipped", [("mnist5k-asym", 150), ("mnist5k-human", 100)])
def test_memorising_noise_setups(name: str, n_flipped: int) -> None:
    setup = get_setup(name)
    assert setup.noise_seed == 0 and setup.train.epochs == 100
    data = setup.data()
    assert data.flipped.sum() == n_flipped and data.sizes() == {"train": 500, "val": 500, "test": 500}
    # another training seed keeps the noisy labels (they follow the noise seed)
    other = setup.with_changes(train=dataclasses.replace(setup.train, seed=2)).data()
    assert torch.equal(other.y_train, data.y_train)


def test_cnn_setup_of_user_size() -> None:
    """mnist5k-cnn-4k: the 4,000-sample CNN on which clean's default baselines are timed."""
    setup = get_setup("mnist5k-cnn-4k")
    data = setup.data()
    assert data.sizes() == {"train": 4000, "val": 500, "test": 500} and data.flipped.sum() == 400
    model = setup.model(data)
    assert any(isinstance(m, nn.Conv2d) for m in model.modules())
    assert model(data.x_train[:3]).shape == (3, 10) and next(model.parameters()).dtype == torch.float32


# ------------------------------------------------------------------ AUM
def test_aum_equals_margins_taken_in_the_training_loop(tmp_path: Path) -> None:
    """AUM replayed from the recording equals the mean margin each sample had in the training
    forward pass of the loop that was recorded (float64)."""
    torch.manual_seed(0)
    data = make_synthetic(40, 8, 8, 4, 3, seed=1, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    make = lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()  # noqa: E731
    init = {k: v.clone() for k, v in model.state_dict().items()}
    import diffin

    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    total, seen = np.zeros(40), np.zeros(40)
    g = torch.Generator().manual_seed(0)
    with diffin.Recorder(tmp_path / "run", model, optimizer=opt, checkpoint_every=5, n_train=40) as rec:
        for _ in range(3):
            for ids in torch.randperm(40, generator=g).split(8):
                out = model(data.x_train[ids])
                o, lab = out.detach(), data.y_train[ids]
                margin = o.gather(1, lab[:, None])[:, 0] - o.scatter(1, lab[:, None], float("-inf")).max(1).values
                np.add.at(total, ids.numpy(), margin.numpy())
                np.add.at(seen, ids.numpy(), 1.0)
                loss = cross_entropy(out, data.y_train[ids]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.step(ids)

    def factory() -> nn.Module:
        m = make()
        m.load_state_dict(init)
        return m

    inp = TaskInputs(run=tmp_path / "run", model_factory=factory, loss_fn=cross_entropy,
                     train=(data.x_train, data.y_train))
    np.testing.assert_allclose(-importance("aum", inp), total / seen, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ diffin clean
def test_default_baselines_are_cheap_and_include_aum() -> None:
    names = CleanConfig().method_list()
    assert not set(names) & set(COSTLY)
    assert {"loss", "aum", "el2n", "forgetting", "cleanlab", "tracin-self"} <= set(names)
    assert "if-cg" not in DEFAULT_BASELINES


def test_costly_method_prints_its_time_estimate_first(tmp_path: Path) -> None:
    said: list[str] = []
    inp = builtin_inputs("tiny", 0.1, tmp_path)
    res = clean(inp, CleanConfig(baselines="if-cg,loss"), progress=False, log=said.append)
    assert len(said) == 1 and said[0].startswith("if-cg: about ") and "CG iterations" in said[0] and "HVP" in said[0]
    assert res["estimated_seconds"]["if-cg"] >= 0


def test_advice_and_winner_when_a_baseline_finds_the_flips_better(tmp_path: Path) -> None:
    inp = builtin_inputs("tiny", 0.1, tmp_path)
    res = clean(inp, CleanConfig(method="el2n", baselines="loss,aum"), progress=False)
    aucs = {m: d["auc"] for m, d in res["detection"].items()}
    best = max(aucs, key=aucs.get)
    assert res["winner"]["method"] == best and res["winner"]["line"].startswith(f"Best by ROC-AUC: {best}")
    if aucs[best] - aucs["el2n"] >= 0.01:
        assert res["advice"].startswith(f"{best} finds the flipped labels better")
        assert f"--method {best}" in res["advice"]
    else:
        assert "advice" not in res


def test_winner_line() -> None:
    w = winner({"a": 0.9, "b": 0.95, "c": float("nan")}, "ROC-AUC")
    assert w["method"] == "b" and w["runner_up"] == "a" and abs(w["lead"] - 0.05) < 1e-12
    assert w["line"] == "Best by ROC-AUC: b (0.95), 0.05 above a (0.9)."
    assert winner({"a": 1.0, "b": 2.0}, "MAE", higher_is_better=False)["method"] == "a"


def _bn_inputs(tmp_path: Path, with_test: bool) -> tuple[TaskInputs, nn.Module]:
    data = make_synthetic(96, 40, 40, 6, 3, seed=2, dtype=torch.float64)

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()

    model = make()
    train(model, data.x_train, data.y_train, TrainConfig(epochs=3, batch_size=16, lr=0.2, checkpoint_every=6),
          tmp_path / "run")
    inp = TaskInputs(run=tmp_path / "run", model_factory=make, loss_fn=cross_entropy,
                     train=(data.x_train, data.y_train), val=(data.x_val, data.y_val),
                     test=(data.x_test, data.y_test) if with_test else None,
                     train_config=TrainConfig(epochs=3, batch_size=16, lr=0.2, checkpoint_every=6))
    return inp, model


def test_retrain_evaluates_batchnorm_with_its_running_statistics(tmp_path: Path) -> None:
    inp, trained = _bn_inputs(tmp_path, with_test=True)
    res = clean(inp, CleanConfig(baselines="loss", retrain=True, count=5), progress=False)
    own = evaluate(trained, *inp.test)  # the trained module, its own running statistics
    before = res["retrain"]["before"]
    assert res["retrain"]["evaluated_on"] == "test"
    assert before["test_loss"] == pytest.approx(own["loss"], rel=1e-9)
    assert before["test_accuracy"] == pytest.approx(own["accuracy"])


def test_without_a_test_set_half_the_validation_set_is_held_out(tmp_path: Path) -> None:
    inp, _ = _bn_inputs(tmp_path, with_test=False)
    res = clean(inp, CleanConfig(baselines="loss", retrain=True, retrain_seeds=1, count=5), progress=False)
    assert res["retrain"]["evaluated_on"].startswith("held-out half of the validation set (20 samples")
    fresh = res["retrain_fresh"]
    # method auto with a recipe: the rank mean of per-class influence and cleanlab, its parts reported beside it
    assert set(fresh["removals"]) == {"none", AUTO_DETECTOR, *parts(AUTO_DETECTOR), "loss", "random"}
    assert all(r["n_removed"] == (0 if n == "none" else 5) for n, r in fresh["removals"].items())
    assert all(0 <= r["test_accuracy_mean"] <= 1 for r in fresh["removals"].values())


# ------------------------------------------------------------------ per-class targets, horizons
def test_group_mean_target_is_the_class_mean_of_pairwise_scores(tiny_run) -> None:
    """A sweep is linear in its target's gradient: the column of group g equals the mean of the
    pairwise columns of g's examples (float64), for diffin and tracin."""
    import diffin
    from diffin._data import DataSource
    from diffin.targets import GroupMeanLoss

    t = tiny_run
    groups = np.array([0, 1, 0, 2, 1, 0, 2, 2])
    for method in ("diffin", "tracin"):
        tgt = GroupMeanLoss(DataSource((t.Xv, t.Yv), torch.float64, torch.device("cpu")), groups)
        got = t.score(method, target=tgt).scores
        pair = diffin.score(t.run, t.make(), t.loss, train=(t.X, t.Y), target=(t.Xv, t.Yv), pairwise=True,
                            method=method, progress=False).scores
        want = np.stack([pair[:, groups == g].mean(1) for g in range(3)], 1)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    with pytest.raises(diffin.DiffinError):
        GroupMeanLoss(DataSource((t.Xv, t.Yv), torch.float64, torch.device("cpu")), np.array([0, 2, 0, 2, 0, 0, 2, 2]))


@pytest.mark.filterwarnings("ignore::diffin._errors.UntrainedRowsWarning")
def test_run_until_a_checkpoint_scores_the_first_segments(tiny_run) -> None:
    import diffin
    from diffin._errors import MissingFileError

    t = tiny_run
    run = diffin.load_run(t.run)
    c = run.checkpoint_steps[1]
    view = run.until(c)
    assert view.n_steps == c and view.checkpoint_steps == run.checkpoint_steps[:2] and len(view.lrs) == c
    assert view.fingerprint != run.fingerprint and run.until(run.n_steps) is run
    assert np.array_equal(view.batch(c - 1), run.batch(c - 1))
    # TracIn-CP's self-influence on the view is the first segment's term of the whole run's
    first = diffin.score(view, t.make(), t.loss, train=(t.X, t.Y), target="self", method="tracin", progress=False)
    coef = run.lrs[:c].sum() / len(t.X)
    fm = diffin._functional.FlatModel(t.make(), t.loss, run.trainable)
    theta = fm.flatten(run.load_checkpoint(c).params)
    sq = (fm.per_sample_grads(theta, t.X, t.Y) ** 2).sum(1).numpy()
    np.testing.assert_allclose(first.scores, coef * sq, rtol=1e-9)
    with pytest.raises(MissingFileError):
        run.until(c + 1)


def test_classes_detector_ranks_by_the_most_harmed_class(tmp_path: Path) -> None:
    """METHOD-classes: per-class harm percentiles from the per-class scores at the horizon
    checkpoint (here the run's end), the highest over classes; the horizon 'best-val' is the
    checkpoint after θ_0 with the lowest validation loss."""
    from scipy.stats import rankdata

    import diffin
    from diffin.tasks._classes import horizon_step

    inp = builtin_inputs("tiny", 0.1, tmp_path)
    res = clean(inp, CleanConfig(method="tracin-classes", baselines="", horizon="end", count=5), out=tmp_path / "c",
                progress=False)
    xv, yv = inp.val
    pair = diffin.score(inp.run, inp.model_factory(), inp.loss_fn, train=inp.train, target=(xv, yv), pairwise=True,
                        method="tracin", progress=False).scores
    S = np.stack([pair[:, yv.numpy() == c].mean(1) for c in range(3)], 1)
    harm = np.stack([rankdata(-S[:, c]) / len(S) for c in range(3)], 1).max(1)
    assert set(res["flagged_ids"]) == set(np.argsort(-harm, kind="stable")[:5].tolist())
    assert res["horizon"]["tracin-classes"]["step"] == diffin.load_run(inp.run).n_steps
    run = diffin.load_run(inp.run)
    step, curve = horizon_step(inp, run, "best-val")
    first_epoch = int(np.ceil(120 / 16))  # tiny: 120 samples, batch 16: all seen after 8 steps
    allowed = [i for i, c in enumerate(run.checkpoint_steps) if c >= first_epoch]
    assert len(curve) == len(run.checkpoint_steps)
    assert step == run.checkpoint_steps[min(allowed, key=lambda i: curve[i])]
    with pytest.raises(ConfigError):
        CleanConfig(horizon="soon")


def test_auto_flags_by_class_influence_with_a_labelled_validation_set(tmp_path: Path) -> None:
    inp = builtin_inputs("tiny", 0.1, tmp_path)
    assert clean(inp, CleanConfig(baselines="", count=3), progress=False)["method"] == AUTO_DETECTOR
    no_val = dataclasses.replace(inp, val=None)
    res = clean(no_val, CleanConfig(baselines="", count=3), progress=False)
    assert res["method"] == "diffin" and res["ranking"] == "self-influence"


def test_auto_without_a_recipe_flags_by_class_influence_alone(tmp_path: Path, monkeypatch) -> None:
    from diffin._errors import RecipeError

    inp = builtin_inputs("tiny", 0.1, tmp_path)

    def no_recipe(self, run=None):  # noqa: ANN001, ANN202
        raise RecipeError("no recipe in this test")

    monkeypatch.setattr(TaskInputs, "recipe", no_recipe)
    res = clean(inp, CleanConfig(baselines="", count=3), progress=False)
    assert res["method"] == AUTO_DETECTOR_NO_RECIPE and "cleanlab" not in res["seconds"]


def test_rank_mean_name_averages_its_parts_computed_once(tmp_path: Path) -> None:
    """``A+B``: the rank mean of A's and B's harms, each part scored once and reported beside it."""
    inp = builtin_inputs("tiny", 0.1, tmp_path)
    name = "tracin-classes+loss"
    res = clean(inp, CleanConfig(method=name, baselines="loss,aum", count=5), out=tmp_path / "c", progress=False)
    assert list(res["seconds"]) == ["tracin-classes", "loss", name, "aum"]
    import csv

    rows = list(csv.DictReader((tmp_path / "c" / "clean.csv").read_text().splitlines()))
    harm = {m: np.array([float(r[f"harm_{m}"]) for r in rows]) for m in ("tracin-classes", "loss", name)}
    np.testing.assert_allclose(harm[name], rank_mean([harm["tracin-classes"], harm["loss"]]), rtol=1e-8)
    want = np.argsort(-harm[name], kind="stable")[:5]
    assert set(res["flagged_ids"]) == set(want.tolist())
    assert parts("a+b+c") == ["a", "b", "c"] and parts("loss") == ["loss"]
