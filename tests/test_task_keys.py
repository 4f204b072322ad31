"""Task results keyed by what made them (run, data, setup and noise, config, retraining recipe),
refusals that touch nothing, and the retraining recipe of a user's run."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffin
from diffin._errors import ConfigError, OutputExistsError, RecipeError
from diffin.tasks import CleanConfig, PruneConfig, TaskInputs, builtin_inputs, clean, prune
from diffin.tasks._common import cached_score, prepare_task

RTOL = 1e-9  # float64 results of the same deterministic computation in another folder


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path → sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_clean(a: dict, b: dict) -> None:
    assert a["flagged_ids"] == b["flagged_ids"]
    assert set(a["detection"]) == set(b["detection"])
    for m in a["detection"]:
        np.testing.assert_allclose(a["detection"][m]["auc"], b["detection"][m]["auc"], rtol=RTOL, atol=0)


def harms(out: Path) -> np.ndarray:
    lines = (out / "clean.csv").read_text().splitlines()
    cols = lines[0].split(",")
    idx = [k for k, c in enumerate(cols) if c.startswith("harm_")]
    return np.array([[float(r.split(",")[k]) for k in idx] for r in lines[1:]])


def assert_close_harms(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-12 * np.abs(a).max())


def user_inputs(t, y: torch.Tensor | None = None, **kw) -> TaskInputs:
    """TaskInputs of a tiny user run (``tests/_tiny.py``), optionally with other training labels."""
    return TaskInputs(run=t.run, model_factory=t.make, loss_fn=t.loss, train=(t.X, t.Y if y is None else y),
                      val=(t.Xv, t.Yv), test=(t.Xv, t.Yv), **kw)


# ---------------------------------------------------------------------- (a) built-in setup, other noise
def test_clean_rerun_with_other_noise_refused_untouched_then_fresh(tmp_path: Path) -> None:
    out = tmp_path / "c"
    cfg = CleanConfig(baselines="tracin")
    clean(builtin_inputs("tiny", 0.1, out), cfg, out=out, progress=False)
    before = snapshot(out)
    fp = diffin.load_run(out / "run").fingerprint
    noisier = builtin_inputs("tiny", 0.2, out)
    with pytest.raises(OutputExistsError, match=r"setup\.noise: 0\.1 -> 0\.2") as e:
        clean(noisier, cfg, out=out, progress=False)
    assert "another folder" in str(e.value) and "overwrite" in str(e.value)
    assert snapshot(out) == before  # nothing touched, OUT/run included
    assert diffin.load_run(out / "run").fingerprint == fp
    again = clean(noisier, cfg, out=out, overwrite=True, progress=False)
    assert diffin.load_run(out / "run").fingerprint != fp  # the run was recorded again, with 20% noise
    fresh = clean(builtin_inputs("tiny", 0.2, tmp_path / "f"), cfg, out=tmp_path / "f", progress=False)
    assert again["n_flipped"] == fresh["n_flipped"] == 24
    assert_same_clean(again, fresh)
    assert_close_harms(harms(out), harms(tmp_path / "f"))


# ---------------------------------------------------------------------- (b) user run, other data
@pytest.mark.filterwarnings("ignore:replaying steps")  # other labels than the run was trained on
def test_clean_user_run_with_other_data_refused_then_fresh(record_tiny, tmp_path: Path) -> None:
    t = record_tiny()
    out = tmp_path / "c"
    cfg = CleanConfig(baselines="tracin,loss", count=4)
    first = clean(user_inputs(t), cfg, out=out, progress=False)
    before = snapshot(out)
    run_before = snapshot(t.run)
    other = user_inputs(t, y=(t.Y + 1) % 3)  # same shapes, other labels
    with pytest.raises(OutputExistsError, match=r"data\.train changed"):
        clean(other, cfg, out=out, progress=False)
    assert snapshot(out) == before and snapshot(t.run) == run_before
    again = clean(other, cfg, out=out, overwrite=True, progress=False)
    fresh = clean(other, cfg, out=tmp_path / "f", progress=False)
    assert again["flagged_ids"] == fresh["flagged_ids"] != first["flagged_ids"]
    assert_close_harms(harms(out), harms(tmp_path / "f"))
    assert snapshot(t.run) == run_before  # a user's run is never rewritten


@pytest.mark.filterwarnings("ignore:replaying steps")
def test_cached_scores_reused_only_for_their_own_key(record_tiny, tmp_path: Path) -> None:
    """A folder holding scores without a matching key (e.g. from an older diffin, or other data)
    recomputes them; the same inputs reuse them."""
    t = record_tiny()
    inp = user_inputs(t)
    state = prepare_task(inp, "clean", CleanConfig(), tmp_path / "c", overwrite=False)
    first = cached_score(inp, state, "tracin", inp.val, progress=False)
    (tmp_path / "c" / "config.json").unlink()
    other = user_inputs(t, y=(t.Y + 1) % 3)
    state2 = prepare_task(other, "clean", CleanConfig(), tmp_path / "c", overwrite=False)
    second = cached_score(other, state2, "tracin", other.val, progress=False)
    expected = diffin.influence(t.run, t.make(), t.loss, train=other.train, target=other.val, method="tracin",
                                progress=False)
    np.testing.assert_array_equal(second, expected)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(cached_score(other, state2, "tracin", other.val, progress=False), second)


# ---------------------------------------------------------------------- (c) prune, other recipe
def test_prune_rerun_with_other_recipe_refused_then_retrained(tmp_path: Path) -> None:
    out = tmp_path / "p"
    cfg = PruneConfig(keep="0.5", methods="diffin,random", seeds=1)
    first = prune(builtin_inputs("tiny", 0.1, out), cfg, out=out, progress=False)
    before = snapshot(out)
    slow = builtin_inputs("tiny", 0.1, out, train_overrides={"epochs": 1, "lr": 0.001})
    with pytest.raises(OutputExistsError, match=r"recipe\.train\.epochs: 3 -> 1.*recipe\.train\.lr: 0\.1 -> 0\.001"):
        prune(slow, cfg, out=out, progress=False)
    assert snapshot(out) == before
    again = prune(slow, cfg, out=out, overwrite=True, progress=False)
    fresh = prune(builtin_inputs("tiny", 0.1, tmp_path / "f", train_overrides={"epochs": 1, "lr": 0.001}), cfg,
                  out=tmp_path / "f", progress=False)
    assert again["recipe"]["train"]["epochs"] == 1 and again["recipe"]["train"]["lr"] == 0.001
    assert again["curves"] == fresh["curves"] and again["full_data"] == fresh["full_data"]
    assert again["full_data"] != first["full_data"]  # 1 epoch at lr 0.001 learns far less


# ---------------------------------------------------------------------- the recorded recipe
def test_prune_on_user_run_retrains_with_the_recorded_recipe(record_tiny, tmp_path: Path, monkeypatch) -> None:
    t = record_tiny(opt_kw={"lr": 0.02, "momentum": 0.9}, n=24, batch=6, epochs=2)
    inp = user_inputs(t)
    r = inp.recipe()
    c = r.config
    assert (c.lr, c.momentum, c.nesterov, c.weight_decay, c.batch_size, c.epochs) == (0.02, 0.9, False, 0.0, 6, 2)
    assert r.lrs is None  # a constant rate
    import diffin.tasks._common as common

    seen = []
    real = common.train_builtin

    def spy(model, x, y, config, run_dir, **kw):
        seen.append((config, kw["lrs"], kw["loss"]))
        return real(model, x, y, config, run_dir, **kw)

    monkeypatch.setattr(common, "train_builtin", spy)
    res = prune(inp, PruneConfig(keep="0.5", methods="random", seeds=1), progress=False)
    assert len(seen) == 2 and res["recipe"]["train"]["momentum"] == 0.9
    for config, lrs, loss in seen:
        assert (config.lr, config.momentum, config.batch_size, config.epochs) == (0.02, 0.9, 6, 2)
        assert lrs is None and loss is t.loss
    # explicit overrides go on top of the recorded recipe, field by field
    over = user_inputs(t, train_overrides={"momentum": 0.0, "epochs": 1})
    assert (over.recipe().config.momentum, over.recipe().config.epochs, over.recipe().config.lr) == (0.0, 1, 0.02)


def test_recorded_per_step_schedule_is_followed_exactly(tmp_path: Path) -> None:
    from diffin.bench.builtin import TrainConfig, mlp, train
    from diffin.bench.builtin.trainer import step_lrs

    torch.manual_seed(0)
    X = torch.randn(40, 5, dtype=torch.float64)
    Y = torch.randint(0, 3, (40,))
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.3, schedule="cosine", checkpoint_every=0, seed=1)
    make = lambda: mlp(5, 3, (4,)).double()  # noqa: E731
    train(make(), X, Y, cfg, tmp_path / "run")
    run = diffin.load_run(tmp_path / "run")
    inp = TaskInputs(run=tmp_path / "run", model_factory=make, train=(X, Y), val=(X, Y),
                     loss_fn=lambda o, y: F.cross_entropy(o, y, reduction="none"))
    r = inp.recipe()
    np.testing.assert_array_equal(np.asarray(r.lrs), run.lrs)
    assert (r.config.batch_size, r.config.epochs) == (8, 2)
    # the same number of steps follows the recorded rates exactly; fewer steps follow them by progress
    train(make(), X, Y, r.config, tmp_path / "again", lrs=r.lrs)
    np.testing.assert_array_equal(diffin.load_run(tmp_path / "again").lrs, run.lrs)
    np.testing.assert_array_equal(step_lrs(r.config, 5, r.lrs), run.lrs[[0, 2, 4, 6, 8]])
    inp.train_overrides = {"lr": 0.05}  # an explicit rate replaces the recorded schedule
    assert inp.recipe().lrs is None and inp.recipe().config.lr == 0.05


def test_recipe_errors_name_the_overrides(record_tiny, tmp_path: Path) -> None:
    t = record_tiny(ids=False)
    with pytest.raises(RecipeError, match="batch_size"):
        user_inputs(t).recipe()
    assert user_inputs(t, train_overrides={"batch_size": 6}).recipe().config.epochs == 2
    # Adam is reproduced by the trainer; an optimizer it cannot reproduce needs the recipe given
    for name, make_opt in (("adam", lambda m: torch.optim.Adam(m.parameters(), lr=0.01)),
                           ("adagrad", lambda m: torch.optim.Adagrad(m.parameters(), lr=0.01))):
        model = t.make()
        opt = make_opt(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", diffin.UnsupportedOptimizerWarning)
            rec = diffin.Recorder(tmp_path / name, model, optimizer=opt, checkpoint_every=2, n_train=24)
        for s in range(0, 24, 6):
            b = torch.arange(s, s + 6)
            loss = t.loss(model(t.X[b]), t.Y[b]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(b, lr=0.01)
        rec.close()
    adam = TaskInputs(run=tmp_path / "adam", model_factory=t.make, loss_fn=t.loss, train=(t.X, t.Y)).recipe()
    assert (adam.config.optimizer, adam.config.lr, adam.config.batch_size) == ("adam", 0.01, 6)
    adagrad = TaskInputs(run=tmp_path / "adagrad", model_factory=t.make, loss_fn=t.loss, train=(t.X, t.Y))
    with pytest.raises(RecipeError, match=r"Adagrad.*lr"):
        adagrad.recipe()
    r = TaskInputs(run=tmp_path / "adagrad", model_factory=t.make, loss_fn=t.loss, train=(t.X, t.Y),
                   train_overrides={"lr": 0.1}).recipe()
    assert (r.config.lr, r.config.momentum, r.config.batch_size) == (0.1, 0.0, 6) and "Adagrad" in r.source
    with pytest.raises(ConfigError, match="unknown training option"):
        user_inputs(t, train_overrides={"learning_rate": 0.1})


def test_interrupted_builtin_recording_is_rebuilt_and_other_runs_refused(tmp_path: Path) -> None:
    out = tmp_path / "c"
    inp = builtin_inputs("tiny", 0.1, out)
    assert not out.exists()  # building inputs writes nothing
    # a recording of this setup that was killed half-way: the marker is there, the run is not
    (out / "run").mkdir(parents=True)
    (out / "run" / ".diffin_setup_building.json").write_text(json.dumps(inp.setup_meta()))
    assert inp.run_state() == "missing"
    clean(inp, CleanConfig(baselines=""), out=out, progress=False)
    assert inp.run_state() == "ready" and not (out / "run" / ".diffin_setup_building.json").exists()
    # a run of another setup in the same place, with no task results beside it: refused untouched
    other = tmp_path / "o"
    clean(builtin_inputs("tiny", 0.2, other), CleanConfig(baselines=""), out=other, progress=False)
    (other / "config.json").unlink()
    before = snapshot(other)
    with pytest.raises(OutputExistsError, match="another run"):
        clean(builtin_inputs("tiny", 0.1, other), CleanConfig(baselines=""), out=other, progress=False)
    assert snapshot(other) == before


def test_recorded_recipe_of_an_adamw_run_with_groups_and_clipping(tmp_path):
    """An AdamW run (weight decay on weights only, clipping) retrains as AdamW with the same betas,
    ε, decay pattern and threshold; groups with different learning rates need an lr override."""
    from _tiny import record_loop
    from diffin.recording import load_run
    from diffin.tasks._common import recorded_recipe

    def two_groups(m, lr_bias):
        w = [p for p in m.parameters() if p.ndim >= 2]
        b = [p for p in m.parameters() if p.ndim < 2]
        return [{"params": w, "weight_decay": 0.05, "lr": 0.01}, {"params": b, "weight_decay": 0.0, "lr": lr_bias}]

    tiny = record_loop(tmp_path / "r", lambda m: torch.optim.AdamW(two_groups(m, 0.01), betas=(0.8, 0.95), eps=1e-7),
                       clip=0.5)
    cfg, lrs, source = recorded_recipe(load_run(tiny.run), len(tiny.X), {})
    assert (cfg.optimizer, cfg.beta1, cfg.beta2, cfg.eps) == ("adamw", 0.8, 0.95, 1e-7)
    assert (cfg.weight_decay, cfg.weight_decay_on, cfg.clip_grad_norm) == (0.05, "weights", 0.5)
    assert lrs is None and cfg.lr == 0.01 and "AdamW" in source
    other = record_loop(tmp_path / "o", lambda m: torch.optim.AdamW(two_groups(m, 0.02)))
    with pytest.raises(RecipeError, match="different learning rates"):
        recorded_recipe(load_run(other.run), len(other.X), {})
    cfg2, _, _ = recorded_recipe(load_run(other.run), len(other.X), {"lr": 0.01})
    assert cfg2.optimizer == "adamw" and cfg2.clip_grad_norm is None
