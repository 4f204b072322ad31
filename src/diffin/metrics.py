"""How well influence scores match ground truth, and how well they find noisy labels.

Every score here follows the sign of docs/method.md §2: ``score(z) = f(θ_T^{−z}) − f(θ_T)``,
the change of the target (a loss) if z had been removed. Positive: z helped; negative: z hurt.

* Agreement with replayed removal (data deletion): :func:`pearson`, :func:`spearman`,
  :func:`kendall`, :func:`mae`, :func:`topk_jaccard`.
* Linear datamodeling score over random subsets: :func:`lds`, with a bootstrap interval over
  subsets (:func:`lds_interval`) and the paired bootstrap of two methods' difference
  (:func:`lds_bootstrap_diff`).
* Label-noise detection (data cleaning): :func:`detection_auc`, :func:`recall_at`.

All functions take array-likes (numpy arrays, lists, CPU tensors), compute in float64 and
raise :class:`diffin.ConfigError` on empty or mismatched inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from ._errors import ConfigError

__all__ = ["detection_auc", "kendall", "lds", "lds_bootstrap_diff", "lds_interval", "mae", "pearson", "recall_at",
           "spearman", "topk_jaccard"]


# ---------------------------------------------------------------------- input checks
def _vector(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ConfigError(f"{name} must be 1-D (one value per sample), got shape {a.shape}")
    if a.size == 0:
        raise ConfigError(f"{name} is empty; pass at least one value")
    return a


def _pair(a: Any, b: Any, names: tuple[str, str] = ("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    x, y = _vector(a, names[0]), _vector(b, names[1])
    if x.shape != y.shape:
        raise ConfigError(
            f"{names[0]} has {x.size} values but {names[1]} has {y.size}; pass one value per "
            "sample in the same order"
        )
    return x, y


def _constant(x: np.ndarray) -> bool:
    return bool(np.all(x == x[0]))


def _correlation(fn: Any, a: Any, b: Any) -> float:
    x, y = _pair(a, b)
    if x.size < 2 or _constant(x) or _constant(y):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(x, y).statistic)


# ---------------------------------------------------------------------- agreement
def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two score vectors of shape (N,).

    Returns ``nan`` (no exception, no warning) when either input is constant or N < 2.
    """
    return _correlation(stats.pearsonr, a, b)


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation of two vectors of shape (N,) (ties get average ranks).

    Returns ``nan`` when either input is constant or N < 2.
    """
    return _correlation(stats.spearmanr, a, b)


def kendall(a: Any, b: Any) -> float:
    """Kendall's τ-b of two vectors of shape (N,) (tie-corrected).

    Returns ``nan`` when either input is constant or N < 2.
    """
    return _correlation(stats.kendalltau, a, b)


def mae(pred: Any, actual: Any) -> float:
    """Mean absolute error ``mean |pred − actual|`` of shape-(N,) vectors, in the target's units
    (loss units for the default target)."""
    p, a = _pair(pred, actual, ("pred", "actual"))
    return float(np.mean(np.abs(p - a)))


def _extremes(x: np.ndarray, k: int) -> set[int]:
    """The ids of the k smallest and the k largest values (ties: lower id first)."""
    low = np.argsort(x, kind="stable")[:k]
    high = np.argsort(-x, kind="stable")[:k]
    return set(low.tolist()) | set(high.tolist())


def topk_jaccard(pred: Any, actual: Any, k: int = 10) -> float:
    """Jaccard overlap ``|P ∩ A| / |P ∪ A|`` of the extreme samples of two score vectors (N,).

    ``P`` is the union of the ``k`` largest (most helpful) and the ``k`` smallest (most harmful)
    ids of ``pred``; ``A`` the same for ``actual``. Ties are broken by the lower id. When
    ``2k ≥ N`` both sets hold every id and the result is 1.
    """
    p, a = _pair(pred, actual, ("pred", "actual"))
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k must be a positive int, got {k!r}")
    k = min(int(k), p.size)
    sp, sa = _extremes(p, k), _extremes(a, k)
    return len(sp & sa) / len(sp | sa)


# ---------------------------------------------------------------------- LDS
def _lds_parts(subset_masks: Any, subset_actual: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checked inputs of :func:`lds`: the predicted changes ``pred`` (S, Q) = Σ of the removed
    samples' scores, and the actual changes (S, Q)."""
    masks = np.asarray(subset_masks)
    if masks.ndim != 2 or masks.size == 0:
        raise ConfigError(f"subset_masks must be a non-empty (S, N) array, got shape {masks.shape}")
    if masks.dtype != np.bool_:
        if not np.isin(masks, (0, 1)).all():
            raise ConfigError("subset_masks must be boolean (True = sample kept in that subset)")
        masks = masks.astype(bool)
    n_sub, n = masks.shape
    actual = np.asarray(subset_actual, dtype=np.float64)
    sc = np.asarray(scores, dtype=np.float64)
    if sc.ndim not in (1, 2) or sc.shape[0] != n:
        raise ConfigError(f"scores must have shape ({n},) or ({n}, Q) to match subset_masks, got {sc.shape}")
    if actual.ndim not in (1, 2) or actual.shape[0] != n_sub:
        raise ConfigError(
            f"subset_actual must have shape ({n_sub},) or ({n_sub}, Q) to match subset_masks, "
            f"got {actual.shape}"
        )
    if actual.ndim != sc.ndim or (sc.ndim == 2 and sc.shape[1] != actual.shape[1]):
        raise ConfigError(
            f"scores {sc.shape} and subset_actual {actual.shape} must both be 1-D or both 2-D with "
            "the same number Q of target columns"
        )
    if sc.ndim == 1:
        sc, actual = sc[:, None], actual[:, None]
    if sc.shape[1] == 0:
        raise ConfigError("scores have no target columns (Q = 0)")
    pred = (~masks).astype(np.float64) @ sc  # (S, Q): Σ_{z ∈ R_s} score(z)
    return pred, actual


def lds(subset_masks: Any, subset_actual: Any, scores: Any) -> float:
    """Linear datamodeling score (Park et al. 2023) of removal-sign scores.

    Args:
        subset_masks: (S, N) bool, ``True`` where sample n was KEPT in the model retrained on
            subset s. The removed set of subset s is ``R_s = {n : not subset_masks[s, n]}``.
        subset_actual: (S,) or (S, Q): the target of each retrained model, ``f(θ_T^{−R_s})``, or
            its change ``f(θ_T^{−R_s}) − f(θ_T)`` (the same up to a shift per column, which
            Spearman ignores). Q columns for Q targets.
        scores: (N,) or (N, Q): removal-sign scores, ``score(z) = f(θ_T^{−z}) − f(θ_T)``.

    Returns:
        The Spearman correlation, across the S subsets, between the predicted change
        ``pred_s = Σ_{z ∈ R_s} score(z)`` and ``subset_actual[s]``; averaged over the Q columns
        when 2-D (columns whose correlation is undefined are left out; ``nan`` if all are).

    Sign: removal-sign scores add up over the removed set, so the prediction sums over the
    REMOVED samples, not the kept ones. Since ``Σ_{R_s} = Σ_all − Σ_{kept}``, this equals
    ``−Σ_{z kept} score(z)`` up to a constant: Park et al.'s datamodel sum over the kept set,
    with the sign flipped because those attributions measure up-weighting. Perfect,
    additive scores give +1; scores of the wrong sign give negative values.
    """
    pred, actual = _lds_parts(subset_masks, subset_actual, scores)
    per_column = np.array([spearman(pred[:, q], actual[:, q]) for q in range(pred.shape[1])])
    if np.all(np.isnan(per_column)):
        return float("nan")
    return float(np.nanmean(per_column))


def _row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row pair of a, b (R, S) (average ranks for ties); ``nan``
    where a row is constant."""
    ra, rb = stats.rankdata(a, axis=1), stats.rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(axis=1) / den, np.nan)


def _boot_lds(pred: np.ndarray, actual: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """LDS of each bootstrap resample (rows ``idx`` (B, S) of the subsets): (B,), averaged over
    the Q columns whose correlation is defined (``nan`` if none is)."""
    per = np.stack([_row_spearman(pred[idx, q], actual[idx, q]) for q in range(pred.shape[1])], axis=1)
    out = np.full(per.shape[0], np.nan)
    ok = ~np.all(np.isnan(per), axis=1)
    out[ok] = np.nanmean(per[ok], axis=1)
    return out


def _boot_indices(n_sub: int, n_boot: int, seed: int, level: float) -> np.ndarray:
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ConfigError(f"n_boot must be a positive int, got {n_boot!r}")
    if n_sub < 3:
        raise ConfigError(f"a bootstrap over subsets needs at least 3 subsets, got {n_sub}")
    return np.random.default_rng(seed).integers(0, n_sub, size=(int(n_boot), n_sub))


def _percentiles(boot: np.ndarray, level: float) -> tuple[float, float]:
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def lds_interval(subset_masks: Any, subset_actual: Any, scores: Any, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> dict[str, float]:
    """:func:`lds` with a percentile bootstrap interval over subsets.

    The S subsets (rows of ``subset_masks`` and ``subset_actual``) are resampled with
    replacement ``n_boot`` times (``np.random.default_rng(seed)``); the LDS of each resample
    gives the interval's ends, the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles.

    Returns: ``{"lds": LDS on all subsets, "low": ..., "high": ...}``.
    """
    pred, actual = _lds_parts(subset_masks, subset_actual, scores)
    idx = _boot_indices(pred.shape[0], n_boot, seed, level)
    low, high = _percentiles(_boot_lds(pred, actual, idx), level)
    return {"lds": lds(subset_masks, subset_actual, scores), "low": low, "high": high}


def lds_bootstrap_diff(subset_masks: Any, subset_actual: Any, scores_a: Any, scores_b: Any, n_boot: int = 2000,
                       seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """The difference LDS(a) − LDS(b) of two methods on the same subsets, with a paired
    bootstrap interval: each of ``n_boot`` resamples draws S subset rows with replacement and
    computes both LDS on the same rows, so the subsets' shared difficulty cancels.

    Returns: ``{"diff": LDS_a − LDS_b on all subsets, "low": ..., "high": ...}`` (percentile
    interval at ``level``); an interval above 0 says a beats b on this truth.
    """
    pred_a, actual = _lds_parts(subset_masks, subset_actual, scores_a)
    pred_b, _ = _lds_parts(subset_masks, subset_actual, scores_b)
    idx = _boot_indices(pred_a.shape[0], n_boot, seed, level)
    boot = _boot_lds(pred_a, actual, idx) - _boot_lds(pred_b, actual, idx)
    low, high = _percentiles(boot, level)
    diff = lds(subset_masks, subset_actual, scores_a) - lds(subset_masks, subset_actual, scores_b)
    return {"diff": float(diff), "low": low, "high": high}


# ---------------------------------------------------------------------- label-noise detection
def _flags(flipped: Any, n: int) -> np.ndarray:
    f = np.asarray(flipped)
    if f.ndim != 1 or f.shape[0] != n:
        raise ConfigError(f"flipped must be a 1-D mask of {n} values (one per score), got shape {f.shape}")
    if f.dtype != np.bool_:
        if not np.isin(f, (0, 1)).all():
            raise ConfigError("flipped must be boolean (True = label was flipped)")
        f = f.astype(bool)
    return f


def detection_auc(scores: Any, flipped: Any) -> float:
    """ROC-AUC of finding flipped labels by ranking samples from most harmful (lowest score)
    up. ``scores`` (N,) removal-sign scores, ``flipped`` (N,) bool.

    1.0: every flipped sample scores below every clean one; 0.5: chance. ``nan`` when
    ``flipped`` is all True or all False (AUC undefined).
    """
    s = _vector(scores, "scores")
    f = _flags(flipped, s.size)
    if f.all() or not f.any():
        return float("nan")
    # Mann–Whitney: the probability that a flipped sample ranks as more harmful than a clean one,
    # ties counted half (average ranks); equal to sklearn's roc_auc_score(flipped, -scores).
    ranks = stats.rankdata(-s)
    n_pos, n_neg = int(f.sum()), int((~f).sum())
    return float((ranks[f].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def recall_at(
    scores: Any, flipped: Any, fractions: Sequence[float] = (0.05, 0.1, 0.2)
) -> dict[float, float]:
    """Share of the flipped samples found when inspecting a fraction of the data, lowest
    scores (most harmful) first.

    Args:
        scores: (N,) removal-sign scores.
        flipped: (N,) bool mask of the samples whose label was flipped.
        fractions: fractions of the N samples inspected, each in (0, 1]: the
            ``round(fraction · N)`` lowest-scoring samples (at least one) are inspected.

    Returns:
        ``{fraction: recall}``, recall in [0, 1] (``nan`` when nothing was flipped). Equal
        scores are inspected in order of their index.
    """
    s = _vector(scores, "scores")
    f = _flags(flipped, s.size)
    fr = list(np.atleast_1d(np.asarray(fractions, dtype=np.float64)))
    if not fr:
        raise ConfigError("fractions is empty; pass fractions of the data to inspect, e.g. (0.1,)")
    bad = [x for x in fr if not 0.0 < x <= 1.0]
    if bad:
        raise ConfigError(f"fractions must lie in (0, 1], got {bad}")
    order = np.argsort(s, kind="stable")
    found = np.cumsum(f[order])
    total = int(f.sum())
    out: dict[float, float] = {}
    for x in fr:
        m = max(1, int(round(x * s.size)))
        out[float(x)] = float(found[m - 1] / total) if total else float("nan")
    return out
