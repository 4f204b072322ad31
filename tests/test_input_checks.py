"""Input checks before scoring: non-finite data, label dtypes, errors from the user's model and
loss, and training rows that no recorded batch contained."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import diffin
from _tiny import ce


def _influence(tiny, **kw):
    kw.setdefault("train", (tiny.X, tiny.Y))
    kw.setdefault("target", (tiny.Xv, tiny.Yv))
    return diffin.influence(tiny.run, kw.pop("model", None) or tiny.make(), kw.pop("loss", tiny.loss),
                            progress=False, **kw)


@pytest.mark.parametrize("where", ["train", "target"])
def test_nan_or_inf_in_the_data_is_a_named_error_listing_the_ids(tiny_run, where):
    X, Xv = tiny_run.X.clone(), tiny_run.Xv.clone()
    if where == "train":
        X[5, 1] = float("nan")
        X[17, 0] = float("inf")
        data = {"train": (X, tiny_run.Y)}
    else:
        Xv[3, 2] = float("nan")
        data = {"target": (Xv, tiny_run.Yv)}
    with pytest.raises(diffin.NonFiniteDataError) as exc:
        _influence(tiny_run, **data)
    msg = str(exc.value)
    assert ("[5, 17]" if where == "train" else "[3]") in msg
    assert "NaN or Inf" in msg and ("2 rows" if where == "train" else "1 rows") in msg
    assert isinstance(exc.value, diffin.DataMismatchError)


def test_nonfinite_check_streams_in_chunks_and_names_at_most_ten_ids(tiny_run):
    X = tiny_run.X.clone()
    X[::2, 0] = float("nan")  # 12 bad rows, spread over several chunks of 5
    with pytest.raises(diffin.NonFiniteDataError, match=r"12 rows.*\[0, 2, 4, 6, 8, 10, 12, 14, 16, 18\]\."):
        _influence(tiny_run, train=(X, tiny_run.Y), batch_size=5)


def test_non_finite_regression_targets_are_named_too(record_tiny):
    tiny = record_tiny(regression=True)
    Y = tiny.Y.clone()
    Y[9, 1] = float("nan")
    with pytest.raises(diffin.NonFiniteDataError, match=r"targets of 1 rows.*\[9\]"):
        _influence(tiny, train=(tiny.X, Y))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_integer_labels_of_another_dtype_are_cast_for_the_loss(tiny_run, dtype):
    for method in ("diffin", "tracin"):
        ref = _influence(tiny_run, method=method)
        got = _influence(tiny_run, method=method, train=(tiny_run.X, tiny_run.Y.to(dtype)),
                         target=(tiny_run.Xv, tiny_run.Yv.to(dtype)))
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14 * np.abs(ref).max())
    got = _influence(tiny_run, train=(tiny_run.X, tiny_run.Y.to(dtype)), target="self")
    assert np.all(np.isfinite(got))


def test_a_shape_error_in_the_model_says_what_diffin_called(tiny_run):
    X = tiny_run.X[:, :3]  # the model expects 4 features
    with pytest.raises(diffin.ModelCallError) as exc:
        _influence(tiny_run, train=(X, tiny_run.Y))
    msg = str(exc.value)
    assert "calling model(x) on 2 training inputs of shape (2, 3) (dtype float64) failed" in msg
    assert isinstance(exc.value.__cause__, RuntimeError)  # the original, chained
    with pytest.raises(diffin.ModelCallError, match=r"model\(x\) on 2 target inputs of shape \(2, 5\)"):
        _influence(tiny_run, target=(torch.zeros(8, 5, dtype=torch.float64), tiny_run.Yv))


def test_a_failing_loss_says_what_diffin_called(tiny_run):
    Yf = tiny_run.Y.double().unsqueeze(1)  # float (B, 1) targets for cross-entropy over 3 classes

    with pytest.raises(diffin.ModelCallError, match=r"loss_fn\(outputs, targets\) on model outputs of shape "
                       r"\(2, 3\) \(dtype float64\) and 2 training targets of shape \(2, 1\)") as exc:
        _influence(tiny_run, train=(tiny_run.X, Yf))
    assert exc.value.__cause__ is not None


def test_a_loss_without_one_value_per_sample_keeps_its_named_error(tiny_run):
    with pytest.raises(diffin.LossShapeError, match="reduction='none'"):
        _influence(tiny_run, loss=lambda o, y: nn.functional.cross_entropy(o, y))


def _record_on_first_rows(path, X, Y, n_used: int):
    """SGD over only the first ``n_used`` rows, ids recorded, no n_train given to the Recorder."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(X.shape[1], 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(2)
    with diffin.Recorder(path, model, optimizer=opt, checkpoint_every=3) as rec:
        for _ in range(2):
            perm = torch.randperm(n_used, generator=g)
            for s in range(0, n_used, 4):
                b = perm[s : s + 4]
                loss = ce(model(X[b]), Y[b]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.step(b, lr=0.2)
    return model


def test_rows_never_in_a_recorded_batch_warn_and_score_zero_in_the_sweep(tmp_path):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 4, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (20,), generator=g)
    model = _record_on_first_rows(tmp_path / "run", X, Y, n_used=16)
    target = (X[:6], Y[:6])
    with pytest.warns(diffin.UntrainedRowsWarning, match=r"4 of the 20 training rows \(first ids: "
                      r"\[16, 17, 18, 19\]\) were never in any recorded batch.*score 0"):
        s = diffin.influence(tmp_path / "run", model, ce, train=(X, Y), target=target, method="diffin-exact",
                             progress=False)
    assert np.all(s[16:] == 0) and np.all(s[:16] != 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", diffin.UntrainedRowsWarning)  # the rows actually used: no warning
        diffin.influence(tmp_path / "run", model, ce, train=(X[:16], Y[:16]), target=target, progress=False)


def test_nonfinite_scores_warning_no_longer_blames_fd_eps_first(tiny_run, caplog, monkeypatch):
    """The data is checked before scoring, so a NaN score points at the run or the HVPs."""
    from diffin.estimators import get_estimator

    cls = get_estimator("tracin")
    real = cls.score

    def nan_scores(self, ctx):
        out = real(self, ctx)
        out.scores[0] = float("nan")
        return out

    monkeypatch.setattr(cls, "score", nan_scores)
    with caplog.at_level("WARNING", logger="diffin"):
        s = _influence(tiny_run, method="tracin")
    assert np.isnan(s[0])
    assert "although the data is finite" in caplog.text and "hvp='exact'" in caplog.text
