"""The closed form on m evenly spaced checkpoints (``closed_form_checkpoints``, docs/method.md §4.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffin
from _tiny import assert_close, record
from diffin import _reference as ref
from diffin._data import DataSource
from diffin._functional import FlatModel
from diffin.estimators.diffin_closed_form import evenly_spaced
from diffin.targets import MeanLoss


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 12 samples, batch 6, 4 epochs: 8 steps, a checkpoint every 2 → checkpoints 2, 4, 6, 8 after step 0
    return record(tmp_path_factory.mktemp("cf") / "r", n=12, batch=6, epochs=4, every=2)


def _by_hand(tiny, steps: list[int], batch: int, seed: int) -> torch.Tensor:
    """docs/method.md §4.2 on the given checkpoints with dense Hessians, sample by sample:
    Σ_t t·η_t²/(N·m) · ⟨∇f, H_B G_z + H_z G_B⟩, proxy batches drawn as the estimator draws them."""
    run = diffin.load_run(tiny.run)
    fm = FlatModel(tiny.make(), tiny.loss, run.trainable)
    train = DataSource((tiny.X, tiny.Y), torch.float64, torch.device("cpu"))
    val = MeanLoss(DataSource((tiny.Xv, tiny.Yv), torch.float64, torch.device("cpu")))
    N, m = len(train), len(steps)
    rng = np.random.default_rng(seed)
    out = torch.zeros(N, dtype=torch.float64)
    for c in steps:
        th = fm.flatten(run.load_checkpoint(c).params)
        eta = float(run.lrs[min(c, run.n_steps - 1)])
        xp, yp = train.get(rng.choice(N, size=batch, replace=False))
        HB, GB = ref.dense_hessian(fm, th, xp, yp), ref.loop_grads(fm, th, xp, yp).mean(0)
        g = val.grads(fm, th)[0]
        for z in range(N):
            xz, yz = train.get(np.array([z]))
            Gz, Hz = ref.loop_grads(fm, th, xz, yz)[0], ref.dense_hessian(fm, th, xz, yz)
            out[z] += c * eta**2 / (N * m) * float(g @ (HB @ Gz + Hz @ GB))
    return out


def test_evenly_spaced_ends_with_the_last():
    s = [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert evenly_spaced(s, None) == s
    assert evenly_spaced(s, 10) == s
    assert evenly_spaced(s, 25) == s
    assert evenly_spaced(s, 1) == [30]
    assert evenly_spaced(s, 2) == [15, 30]
    assert evenly_spaced(s, 3) == [12, 21, 30]
    assert evenly_spaced(s, 5) == [6, 12, 18, 24, 30]


def test_all_checkpoints_is_the_default(tiny):
    default = tiny.score("diffin-closed-form", hvp="exact", seed=3)
    every = tiny.score("diffin-closed-form", hvp="exact", seed=3, closed_form_checkpoints=4)
    np.testing.assert_array_equal(every.scores, default.scores)
    assert default.diagnostics["m"] == every.diagnostics["m"] == 4
    assert default.diagnostics["steps"] == every.diagnostics["steps"] == [2, 4, 6, 8]
    assert "note" not in every.diagnostics


def test_two_of_four_checkpoints_equal_the_formula_by_hand(tiny):
    got = tiny.score("diffin-closed-form", hvp="exact", seed=5, closed_form_checkpoints=2)
    assert got.diagnostics["m"] == 2
    assert got.diagnostics["steps"] == [4, 8]
    want = _by_hand(tiny, [4, 8], batch=6, seed=5)
    assert_close(got.scores, want)
    # not the all-checkpoint value: the option changes what is computed
    full = _by_hand(tiny, [2, 4, 6, 8], batch=6, seed=5)
    assert not np.allclose(got.scores, full.numpy(), rtol=1e-3)


def test_two_checkpoints_central_differences(tiny):
    got = tiny.score("diffin-closed-form", hvp="central", seed=5, closed_form_checkpoints=2).scores
    assert_close(got, _by_hand(tiny, [4, 8], batch=6, seed=5), computation="fd")


def test_more_than_recorded_uses_all_and_says_so(tiny):
    default = tiny.score("diffin-closed-form", hvp="exact", seed=3)
    many = tiny.score("diffin-closed-form", hvp="exact", seed=3, closed_form_checkpoints=50)
    np.testing.assert_array_equal(many.scores, default.scores)
    assert many.diagnostics["m"] == 4
    assert "closed_form_checkpoints=50" in many.diagnostics["note"]


@pytest.mark.parametrize("bad", [0, -2])
def test_fewer_than_one_is_refused(bad):
    with pytest.raises(diffin.ConfigError, match="closed_form_checkpoints must be >= 1"):
        diffin.ScoreConfig(closed_form_checkpoints=bad)
