"""Check the scores on your own run: replay n removals and correlate (docs/guides/verify.md).

:func:`verify` scores every training sample of a recorded run (:func:`diffin.score`), picks n
training ids at random (seeded) among those the run trained on, replays the run with each of
them removed, side by side (:func:`diffin.groundtruth.replay_removal`: the n + 1 runs advance
together, one vmapped weighted-gradient evaluation per step), and compares the predicted
``f(θ_T^{−z}) − f(θ_T)`` with the replayed one: Pearson, Spearman, the largest error. In float64 the
replay is the exact trajectory-specific leave-one-out effect (docs/method.md §3), so the
correlation measures the estimate, not retraining noise.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ._api import score
from ._errors import ConfigError, DataMismatchError
from ._functional import LossFn
from .groundtruth import replay_removal
from .metrics import pearson, spearman
from .recording.run import Run, load_run


@dataclass
class VerifyResult:
    """What :func:`verify` measured.

    Attributes:
        ids: (n,) the removed training ids.
        predicted: (n,) the method's scores of those ids (loss units: the target's change if removed).
        actual: (n,) the replayed removal effects ``f(θ_T^{−z}) − f(θ_T)`` (loss units).
        pearson, spearman: correlations of ``predicted`` with ``actual``.
        max_abs_error: ``max |predicted − actual|`` (loss units).
        method, variant: the method asked for and the estimator that ran.
        score_seconds, replay_seconds: wall time of scoring all N samples and of the n replays.
    """

    ids: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    pearson: float
    spearman: float
    max_abs_error: float
    method: str
    variant: str
    score_seconds: float
    replay_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("ids", "predicted", "actual"):
            d[k] = np.asarray(d[k]).tolist()
        return d

    def summary(self) -> str:
        """Two lines: the correlations and the times."""
        return (f"{self.method} ({self.variant}) against {len(self.ids)} replayed removals: "
                f"Pearson {self.pearson:.4f}, Spearman {self.spearman:.4f}, largest error "
                f"{self.max_abs_error:.3g} (loss units)\n"
                f"scoring {self.score_seconds:.1f} s, replaying {len(self.ids)} removals side by side "
                f"{self.replay_seconds:.1f} s" + (f" (in {self.extra['replay_dtype']})" if "replay_dtype" in self.extra
                                                  else ""))


def pick_ids(run: Run, n_train: int, n: int, seed: int = 0) -> np.ndarray:
    """n distinct training ids drawn at random (seeded) among those in a recorded batch, sorted."""
    seen = np.zeros(n_train, dtype=bool)
    for t in range(run.n_steps):
        seen[run.batch(t)] = True
    pool = np.flatnonzero(seen)
    if n < 2:
        raise ConfigError(f"verify needs n >= 2 removals to correlate, got {n}")
    if n > len(pool):
        raise ConfigError(f"verify was asked for {n} removals but the run trained on {len(pool)} rows; "
                          f"pass n <= {len(pool)}")
    return np.sort(np.random.default_rng(seed).choice(pool, size=n, replace=False))


def verify(
    run: str | os.PathLike[str] | Run,
    model: nn.Module,
    loss_fn: LossFn,
    *,
    train: Any,
    target: Any,
    n: int = 24,
    method: str = "diffin",
    ids: Any = None,
    seed: int = 0,
    convention: str = "keep",
    scores: np.ndarray | None = None,
    progress: bool = False,
    memory_mb: float = 1024.0,
    **options: Any,
) -> VerifyResult:
    """Replay ``n`` removals of the run and correlate ``method``'s scores with them.

    Args:
        run, model, loss_fn, train, target: as for :func:`diffin.influence` (a mean target:
            ``(inputs, targets)`` or a Dataset; ``"self"`` and pairwise targets are not supported).
        n: removals to replay (ids drawn at random among the trained rows with ``seed``).
        method: the estimator whose scores are checked (``diffin.methods()``).
        ids: check these training ids instead of drawing ``n``.
        convention: ``"keep"`` or ``"renormalize"``, the same for scores and replay.
        scores: (N,) scores already computed with this method (skips scoring).
        memory_mb: budget of the parameter copies replayed side by side.
        options: further :class:`diffin.ScoreConfig` fields for the scoring.

    Returns a :class:`VerifyResult`. Cost: one scoring, plus one replay of the run with n + 1
    parameter copies side by side.
    """
    if isinstance(target, str):
        raise ConfigError(f"verify checks a mean target (validation inputs and targets), got {target!r}")
    run_obj = run if isinstance(run, Run) else load_run(run)
    if not run_obj.has_batch_ids:
        raise DataMismatchError("verify replays removals, which needs the batch ids of every step; record them")
    t0 = time.perf_counter()
    variant = method
    if scores is None:
        res = score(run_obj, model, loss_fn, train=train, target=target, method=method, progress=progress,
                    convention=convention, **options)
        all_scores, variant = res.scores, res.variant
    else:
        all_scores = np.asarray(scores)
    score_s = time.perf_counter() - t0
    if all_scores.ndim != 1:
        raise ConfigError(f"verify checks one score per training sample, got scores of shape {all_scores.shape}")
    chosen = (pick_ids(run_obj, len(all_scores), n, seed) if ids is None
              else np.asarray(sorted({int(i) for i in ids}), dtype=np.int64))
    if len(chosen) < 2 or chosen.min() < 0 or chosen.max() >= len(all_scores):
        raise ConfigError(f"verify needs at least 2 distinct ids in [0, {len(all_scores)}), got {len(chosen)}")
    t1 = time.perf_counter()
    actual = replay_removal(run_obj, model, loss_fn, train=train, target=target, remove=[int(i) for i in chosen],
                            convention=convention, progress=progress, memory_mb=memory_mb)
    replay_s = time.perf_counter() - t1
    predicted = all_scores[chosen].astype(np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    dtype = next((p.dtype for p in model.parameters()), None)
    return VerifyResult(chosen, predicted, actual, pearson(predicted, actual), spearman(predicted, actual),
                        float(np.abs(predicted - actual).max()), method, variant, score_s, replay_s,
                        {"replay_dtype": str(dtype).replace("torch.", "")})
