"""Scores that cannot be trusted say so: the trust measures of every result, the
UnstableInfluenceWarning at their limits, the removal check, the limited horizon; the tiny BERT of
issue 20 warns at AdamW lr 2e-3 and not at 5e-4."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffin
from diffin._errors import ConfigError
from diffin._trust import GROWTH_LIMIT, REMOVAL_LIMIT, SCALE_LIMIT, assess, removal_error

ROOT = Path(__file__).resolve().parents[1]


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    X = torch.randn(96, 8, dtype=torch.float64)
    Y = (X[:, 0] > 0).long()
    Y[:8] = 1 - Y[:8]  # wrong labels to memorise
    return (X[:64], Y[:64]), (X[64:], Y[64:])


def _record(path: Path, lr: float, steps: int = 200) -> torch.nn.Module:
    (X, Y), _ = _data()
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).double()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(0)
    with diffin.Recorder(path, model, opt, checkpoint_every=20) as rec:
        for _ in range(steps):
            ids = rng.choice(64, 8, replace=False)
            loss = F.cross_entropy(model(X[ids]), Y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(ids)
    return model


def _score(path: Path, model: torch.nn.Module, **kw: object) -> tuple[diffin.ScoreResult, list[type]]:
    train, val = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = diffin.score(path, model, _loss, train=train, target=val, progress=False, **kw)
    return res, [w.category for w in caught]


def test_assess_names_each_measure_past_its_limit() -> None:
    ok = assess({"adjoint_growth": 2.0, "replay_drift": 1e-15}, np.array([0.01, -0.02]), np.array([0.5]))
    assert ok["stable"] and ok["reasons"] == [] and ok["score_scale"] == pytest.approx(0.04)
    bad = assess({"adjoint_growth": 10 * GROWTH_LIMIT, "removal_check": {"ids": [3, 4], "error": 2 * REMOVAL_LIMIT}},
                 np.array([0.0, 3 * SCALE_LIMIT, np.nan]), np.array([1.0]))
    assert not bad["stable"]
    assert [r.split()[0:2] for r in bad["reasons"]] == [["1", "scores"], ["the", "adjoint"], ["the", "largest"],
                                                        ["the", "2"]]
    assert removal_error(np.array([1.0, 2.0]), np.array([1.0, 1.0])) == 1.0


def test_stable_run_is_trusted_and_unstable_one_warns(tmp_path: Path) -> None:
    stable, cats = _score(tmp_path / "s", _record(tmp_path / "s", 1e-3))
    trust = stable.diagnostics["trust"]
    assert trust["stable"] and diffin.UnstableInfluenceWarning not in cats
    assert trust["adjoint_growth"] < 10 and trust["score_scale"] < 0.5
    unstable, cats = _score(tmp_path / "u", _record(tmp_path / "u", 0.05), check_removals=2)
    trust = unstable.diagnostics["trust"]
    assert diffin.UnstableInfluenceWarning in cats and not trust["stable"]
    assert trust["score_scale"] > SCALE_LIMIT
    check = unstable.diagnostics["removal_check"]
    assert len(check["ids"]) == 2 and set(check["ids"]) <= set(np.argsort(-np.abs(unstable.scores))[:2].tolist())
    # the replayed removals are an order of magnitude below what the linearisation predicts
    assert trust["removal_error"] > REMOVAL_LIMIT
    assert np.abs(check["predicted"]).max() > 10 * np.abs(check["replayed"]).max()


def test_removal_check_on_a_stable_run_agrees(tmp_path: Path) -> None:
    res, _ = _score(tmp_path / "s", _record(tmp_path / "s", 1e-3), check_removals=2)
    check = res.diagnostics["removal_check"]
    assert res.diagnostics["trust"]["removal_error"] == check["error"] < 1.0
    assert np.sign(check["predicted"]).tolist() == np.sign(check["replayed"]).tolist()


def test_horizon_keeps_only_the_last_steps(tmp_path: Path) -> None:
    model = _record(tmp_path / "r", 1e-3, steps=40)
    full, _ = _score(tmp_path / "r", model)
    same, _ = _score(tmp_path / "r", model, horizon=40)
    np.testing.assert_array_equal(full.scores, same.scores)
    last, _ = _score(tmp_path / "r", model, horizon=1)
    in_last = diffin.load_run(tmp_path / "r").batch(39)
    assert np.all(last.scores[np.setdiff1d(np.arange(64), in_last)] == 0)
    assert np.all(last.scores[in_last] != 0)
    with pytest.raises(ConfigError):
        diffin.ScoreConfig(horizon=0)
    with pytest.raises(ConfigError):
        diffin.ScoreConfig(check_removals=-1)


def _trust_bench():
    spec = importlib.util.spec_from_file_location("trust_bench", ROOT / "benchmarks" / "trust.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.parametrize("lr, warns", [(2e-3, True), (5e-4, False)])
def test_tiny_bert_warns_at_lr_2e3_not_at_5e4(tmp_path: Path, lr: float, warns: bool) -> None:
    """Issue 20's run: BertForSequenceClassification (2 layers, hidden 64, eager attention, dropout
    0) trained by a plain AdamW loop on 128 token sequences with 15% flipped labels, 160 steps."""
    pytest.importorskip("transformers", reason="needs transformers (the hf extra)")
    bench = _trust_bench()
    n, length = 128, 16
    bench.train_bert(tmp_path / "run", lr, epochs=20, n_train=n, length=length, dtype=torch.float32)
    X, y, Xv, yv = bench.bert_data(n_train=n, length=length)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = diffin.score(tmp_path / "run", bench.TinyBert(torch.float32, 0, length), bench.ce, train=(X, y),
                           target=(Xv, yv), progress=False)
    warned = any(issubclass(w.category, diffin.UnstableInfluenceWarning) for w in caught)
    assert warned == warns, res.diagnostics["trust"]
    assert res.diagnostics["trust"]["stable"] == (not warns)


def test_task_reports_show_the_trust_of_their_scores(tmp_path: Path) -> None:
    from diffin.tasks import TaskInputs
    from diffin.tasks._delete import DeleteConfig, delete

    model = _record(tmp_path / "u", 0.05)
    train, val = _data()
    inp = TaskInputs(run=tmp_path / "u", model_factory=lambda: model, loss_fn=_loss, train=train, val=val)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", diffin.UnstableInfluenceWarning)
        res = delete(inp, DeleteConfig(random_groups=2, group_size=2), out=tmp_path / "d", progress=False)
    assert res["trust"]["diffin"]["stable"] is False
    report = (tmp_path / "d" / "report.md").read_text()
    assert "Can these scores be trusted?" in report and "**no**" in report
