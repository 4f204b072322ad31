"""diffin.metrics against scipy / sklearn and hand computations."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from _tiny import tolerance
from diffin import ConfigError
from diffin.metrics import detection_auc, kendall, lds, mae, pearson, recall_at, spearman, topk_jaccard

A = np.array([0.3, -1.2, 2.5, 0.0, 0.7, -0.4, 1.1, 0.7])
B = np.array([0.1, -0.9, 1.7, 0.4, 0.7, -1.0, 0.9, 0.2])
A_TIES = np.array([1.0, 2.0, 2.0, 3.0, 1.0, 5.0])
B_TIES = np.array([2.0, 2.0, 1.0, 4.0, 4.0, 6.0])
RTOL, FLOOR = tolerance(torch.float64)


def approx(expected: float) -> object:
    """A float64 statistic of size at most about 1 (correlations, AUCs, means of O(1) values),
    computed another way: relative tolerance from the dtype, absolute floor on the scale 1."""
    return pytest.approx(expected, rel=RTOL, abs=FLOOR)


# ---------------------------------------------------------------------- correlations
@pytest.mark.parametrize(("a", "b"), [(A, B), (A_TIES, B_TIES)], ids=["plain", "ties"])
def test_correlations_match_scipy(a: np.ndarray, b: np.ndarray) -> None:
    assert pearson(a, b) == approx(stats.pearsonr(a, b).statistic)
    assert spearman(a, b) == approx(stats.spearmanr(a, b).statistic)
    assert kendall(a, b) == approx(stats.kendalltau(a, b).statistic)
    for f in (pearson, spearman, kendall):
        assert isinstance(f(a, b), float)


def test_correlations_by_hand() -> None:
    x = [1.0, 2.0, 3.0, 4.0]
    assert pearson(x, [2.0, 4.0, 6.0, 8.0]) == approx(1.0)
    assert pearson(x, [1.0, 4.0, 9.0, 16.0]) == approx(25 / math.sqrt(5 * 129))
    assert spearman(x, [1.0, 4.0, 9.0, 16.0]) == approx(1.0)  # monotone
    assert spearman(x, [4.0, 3.0, 2.0, 1.0]) == approx(-1.0)
    # one discordant pair of 6: τ = (5 − 1) / 6
    assert kendall(x, [1.0, 3.0, 2.0, 4.0]) == approx(4 / 6)
    # ties: average ranks (1.5, 1.5, 3, 4) vs (1, 2, 3, 4)
    r = np.array([1.5, 1.5, 3.0, 4.0])
    expected = np.corrcoef(r, [1, 2, 3, 4])[0, 1]
    assert spearman([5.0, 5.0, 6.0, 7.0], [1.0, 2.0, 3.0, 4.0]) == approx(expected)


def test_correlations_accept_lists_and_tensors() -> None:
    assert pearson(torch.tensor(A), list(B)) == approx(stats.pearsonr(A, B).statistic)


@pytest.mark.parametrize("f", [pearson, spearman, kendall])
def test_constant_input_gives_nan_quietly(f: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(f(np.ones(5), A[:5]))  # type: ignore[operator]
        assert math.isnan(f(A[:5], np.full(5, 2.0)))  # type: ignore[operator]
        assert math.isnan(f([1.0], [2.0]))  # type: ignore[operator]


@pytest.mark.parametrize("f", [pearson, spearman, kendall, mae, topk_jaccard])
def test_bad_shapes(f: object) -> None:
    with pytest.raises(ConfigError, match="values"):
        f(A, B[:-1])  # type: ignore[operator]
    with pytest.raises(ConfigError, match="empty"):
        f([], [])  # type: ignore[operator]
    with pytest.raises(ConfigError, match="1-D"):
        f(A.reshape(2, 4), B.reshape(2, 4))  # type: ignore[operator]


# ---------------------------------------------------------------------- mae
def test_mae() -> None:
    assert mae([1.0, -2.0, 3.0], [0.5, -2.0, 5.0]) == approx((0.5 + 0.0 + 2.0) / 3)
    assert mae(A, B) == approx(np.mean(np.abs(A - B)))
    assert mae(A, A) == 0.0


# ---------------------------------------------------------------------- top-k Jaccard
def test_topk_jaccard_by_hand() -> None:
    pred = np.array([9.0, 1.0, 5.0, 0.0, 7.0, 3.0])
    actual = np.array([8.0, 2.0, 6.0, 7.0, 1.0, 3.0])
    # k=1: P = {top 0, bottom 3}; A = {top 0, bottom 4} → |{0}| / |{0, 3, 4}|
    assert topk_jaccard(pred, actual, k=1) == approx(1 / 3)
    # k=2: P = {0, 4} ∪ {3, 1}; A = {0, 3} ∪ {4, 1} → identical sets
    assert topk_jaccard(pred, actual, k=2) == 1.0
    assert topk_jaccard(pred, -pred, k=1) == 1.0  # top and bottom swap, sets equal
    assert topk_jaccard(pred, pred, k=3) == 1.0  # 2k ≥ N: every id
    assert topk_jaccard(pred, actual, k=10) == 1.0


def test_topk_jaccard_disjoint_and_ties() -> None:
    pred = np.array([10.0, -10.0, 0.0, 0.1, 0.2, 0.3])
    actual = np.array([0.0, 0.1, 10.0, -10.0, 0.2, 0.3])
    assert topk_jaccard(pred, actual, k=1) == 0.0
    # all ties: the lowest ids are taken for both ends, so both sets are {0, 1}
    assert topk_jaccard(np.zeros(6), np.array([0.0, 0.0, 1.0, 1.0, -1.0, -1.0]), k=1) == approx(0 / 2)
    assert topk_jaccard(np.zeros(6), np.zeros(6), k=2) == 1.0


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_topk_jaccard_bad_k(k: object) -> None:
    with pytest.raises(ConfigError, match="positive int"):
        topk_jaccard(A, B, k=k)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- LDS
def _additive_case(q: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, s = 30, 40
    scores = rng.normal(size=(n,) if q is None else (n, q))
    masks = rng.random((s, n)) < 0.5  # True = kept
    removed = ~masks
    actual = removed.astype(float) @ scores  # exact: f(θ^{−R}) − f(θ) = Σ_{z∈R} score(z)
    return masks, actual, scores


def test_lds_sign_convention_additive() -> None:
    masks, actual, scores = _additive_case(None)
    assert lds(masks, actual, scores) == approx(1.0)
    # actual as f(θ^{−R}) (a shift of the change) is the same to Spearman
    assert lds(masks, actual + 2.3, scores) == approx(1.0)
    # any monotone transform as well
    assert lds(masks, np.exp(actual), scores) == approx(1.0)
    # scores of the wrong sign (up-weighting convention) give −1
    assert lds(masks, actual, -scores) == approx(-1.0)
    # summing over the KEPT set instead would also give −1: the removed set is what counts
    kept_sum = masks.astype(float) @ scores
    assert spearman(kept_sum, actual) == approx(-1.0)


def test_lds_by_hand() -> None:
    masks = np.array([[True, False, True], [False, True, True], [True, True, False], [False, False, True]])
    scores = np.array([1.0, 2.0, 4.0])
    # removed sets: {1}, {0}, {2}, {0, 1} → predicted 2, 1, 4, 3
    actual = np.array([0.2, 0.1, 0.3, 0.4])
    expected = stats.spearmanr([2.0, 1.0, 4.0, 3.0], actual).statistic
    assert lds(masks, actual, scores) == approx(expected)
    assert lds(masks.astype(int), actual, scores) == approx(expected)


def test_lds_two_dimensional() -> None:
    masks, actual, scores = _additive_case(3)
    assert lds(masks, actual, scores) == approx(1.0)
    rng = np.random.default_rng(1)
    noisy = actual + rng.normal(scale=2.0, size=actual.shape)
    pred = (~masks).astype(float) @ scores
    per_col = [stats.spearmanr(pred[:, q], noisy[:, q]).statistic for q in range(3)]
    assert lds(masks, noisy, scores) == approx(np.mean(per_col))
    assert not np.allclose(per_col, per_col[0])  # the columns really differ
    # the 1-D and (N, 1) forms agree
    assert lds(masks, noisy[:, 0], scores[:, 0]) == approx(
        lds(masks, noisy[:, :1], scores[:, :1]))


def test_lds_skips_undefined_columns() -> None:
    masks, actual, scores = _additive_case(2)
    actual[:, 1] = 5.0  # constant column: its correlation is undefined
    assert lds(masks, actual, scores) == approx(1.0)
    assert math.isnan(lds(masks, np.ones(len(masks)), scores[:, 0]))


def test_lds_bad_shapes() -> None:
    masks, actual, scores = _additive_case(2)
    with pytest.raises(ConfigError, match="scores must have shape"):
        lds(masks, actual, scores[:-1])
    with pytest.raises(ConfigError, match="subset_actual must have shape"):
        lds(masks, actual[:-1], scores)
    with pytest.raises(ConfigError, match="same number Q"):
        lds(masks, actual[:, 0], scores)
    with pytest.raises(ConfigError, match="same number Q"):
        lds(masks, actual, scores[:, :1])
    with pytest.raises(ConfigError, match=r"\(S, N\)"):
        lds(masks[0], actual, scores)
    with pytest.raises(ConfigError, match=r"\(S, N\)"):
        lds(np.zeros((0, 30), dtype=bool), np.zeros(0), scores[:, 0])
    with pytest.raises(ConfigError, match="boolean"):
        lds(masks * 0.5, actual, scores)


# ---------------------------------------------------------------------- detection
def test_detection_auc_matches_sklearn() -> None:
    scores = np.array([-3.0, 0.5, -0.2, 1.0, -0.2, 2.0, -1.0, 0.0])
    flipped = np.array([True, False, True, False, False, False, False, True])
    assert detection_auc(scores, flipped) == approx(roc_auc_score(flipped, -scores))
    # by hand: 3 flipped × 5 clean = 15 pairs; a flipped sample wins a pair when its score is
    # lower, a tie counts one half. −3 beats all 5; −0.2 beats 3 and ties 1 (3.5); 0.0 beats 3
    assert detection_auc(scores, flipped) == approx((5 + 3.5 + 3) / 15)
    assert detection_auc(scores, flipped.astype(int)) == approx((5 + 3.5 + 3) / 15)


def test_detection_auc_extremes() -> None:
    flipped = np.array([1, 1, 0, 0, 0], dtype=bool)
    assert detection_auc([-2.0, -1.0, 0.0, 1.0, 2.0], flipped) == 1.0  # most harmful = flipped
    assert detection_auc([2.0, 1.0, 0.0, -1.0, -2.0], flipped) == 0.0
    assert detection_auc(np.zeros(5), flipped) == 0.5
    assert math.isnan(detection_auc([1.0, 2.0], [False, False]))
    assert math.isnan(detection_auc([1.0, 2.0], [True, True]))


def test_detection_bad_input() -> None:
    with pytest.raises(ConfigError, match="one per score"):
        detection_auc([1.0, 2.0, 3.0], [True, False])
    with pytest.raises(ConfigError, match="boolean"):
        detection_auc([1.0, 2.0], [0.5, 1.0])
    with pytest.raises(ConfigError, match="empty"):
        detection_auc([], [])
    with pytest.raises(ConfigError, match="one per score"):
        recall_at([1.0, 2.0, 3.0], [True, False])


def test_recall_at_by_hand() -> None:
    n = 20
    scores = np.arange(n, dtype=float)  # id i has score i: inspected in id order
    flipped = np.zeros(n, dtype=bool)
    flipped[[0, 3, 10, 19]] = True
    out = recall_at(scores, flipped, fractions=(0.05, 0.1, 0.2, 0.6, 1.0))
    assert list(out) == [0.05, 0.1, 0.2, 0.6, 1.0]
    # 1, 2, 4, 12, 20 samples inspected → found 1, 1, 2, 3, 4 of 4
    assert out == {0.05: 0.25, 0.1: 0.25, 0.2: 0.5, 0.6: 0.75, 1.0: 1.0}
    assert recall_at(scores, flipped) == {0.05: 0.25, 0.1: 0.25, 0.2: 0.5}


def test_recall_at_ties_stable_by_index() -> None:
    scores = np.array([0.0, -1.0, -1.0, -1.0, 0.0, 5.0, -1.0, 2.0, 2.0, 3.0])
    # lowest first, ties by index: 1, 2, 3, 6, 0, 4, 7, 8, 9, 5
    flipped = np.zeros(10, dtype=bool)
    flipped[[6, 0]] = True
    out = recall_at(scores, flipped, fractions=(0.3, 0.4, 0.5))
    assert out == {0.3: 0.0, 0.4: 0.5, 0.5: 1.0}
    assert recall_at(scores, flipped, fractions=[0.01]) == {0.01: 0.0}  # at least one inspected
    assert math.isnan(recall_at(scores, np.zeros(10, dtype=bool), fractions=(0.5,))[0.5])


@pytest.mark.parametrize("fractions", [(0.0,), (0.1, 1.5), (-0.2,), (math.nan,), ()])
def test_recall_at_bad_fractions(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError, match="fractions"):
        recall_at(A, A < 0, fractions=fractions)
