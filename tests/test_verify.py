"""diffin.verify and `diffin verify`: scores against replayed removals of the same run."""

from __future__ import annotations

import json

import numpy as np
import pytest

import diffin
from _tiny import assert_close, record
from diffin.cli import main
from diffin.groundtruth import replay_removal
from diffin.metrics import pearson, spearman


def test_verify_is_the_scores_against_replayed_removal(tmp_path):
    """float64: the replayed effects are replay_removal's, the predictions the method's scores of
    the same ids, the correlations those of the two vectors; on a smooth tiny run the exact sweep
    tracks replayed removal closely."""
    tiny = record(tmp_path / "r", n=30, epochs=2, opt_kw={"lr": 0.05})
    res = diffin.verify(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv), n=8,
                        method="diffin-exact", seed=3)
    assert len(res.ids) == 8 and len(set(res.ids.tolist())) == 8 and np.all(np.diff(res.ids) > 0)
    truth = replay_removal(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv),
                           remove=[int(i) for i in res.ids], progress=False)
    assert_close(res.actual, truth)
    assert_close(res.predicted, tiny.score("diffin-exact").scores[res.ids])
    assert res.pearson == pytest.approx(pearson(res.predicted, res.actual))
    assert res.spearman == pytest.approx(spearman(res.predicted, res.actual))
    assert res.max_abs_error == pytest.approx(np.abs(res.predicted - res.actual).max())
    assert res.pearson > 0.99 and res.variant == "diffin-exact"
    again = diffin.verify(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv),
                          ids=res.ids, scores=tiny.score("diffin-exact").scores)
    assert_close(again.actual, res.actual)


def test_verify_refuses_what_it_cannot_check(tmp_path):
    tiny = record(tmp_path / "r")
    kw = dict(train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv))
    with pytest.raises(diffin.ConfigError, match="n <= "):
        diffin.verify(tiny.run, tiny.make(), tiny.loss, n=10_000, **kw)
    with pytest.raises(diffin.ConfigError, match="mean target"):
        diffin.verify(tiny.run, tiny.make(), tiny.loss, train=(tiny.X, tiny.Y), target="self")
    with pytest.raises(diffin.ConfigError, match="n >= 2"):
        diffin.verify(tiny.run, tiny.make(), tiny.loss, n=1, **kw)


def test_cli_verify(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--setup", "tiny", "--out", str(run), "--quiet"]) == 0
    out = tmp_path / "verify.json"
    assert main(["verify", str(run), "--n", "5", "--method", "diffin-exact", "--json", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "Pearson" in text and "Spearman" in text and "5 replayed removals" in text
    doc = json.loads(out.read_text())
    assert len(doc["ids"]) == 5 and len(doc["actual"]) == 5 and -1 <= doc["pearson"] <= 1
