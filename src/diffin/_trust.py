"""Whether a result's scores can be trusted: the linearisation's health, measured on every result
(docs/method.md §4.10, docs/guides/trust.md).

Diff-In scores are the first-order effect of removing a sample, carried back through the
linearised training dynamics. Where those dynamics are unstable (steps at the edge of stability,
η·λ_max > 2 for many steps; Adam's normalisation amplifying tiny gradients), the adjoint grows
exponentially, the first-order effect stops describing a real removal, and the scores grow to
sizes no single sample can have. Three measures, each cheap:

* ``adjoint_growth``: the largest ‖θ̄_t‖ / ‖θ̄_T‖ over the sweep (the sweep variants report it);
* ``score_scale``: the largest |score| over the target's own size (the mean |f| over targets at
  θ_T): a removal of one sample that would move the target by more than the target itself;
* ``replay_drift``: how far replaying training from the checkpoints lands from the recorded ones
  (the run is not the one being linearised; ``ReplayDriftWarning`` covers it on its own);

and one that costs a replay, asked for with ``ScoreConfig.check_removals = k``: the k samples with
the largest |score| removed for real (replayed removal, float64 if the model is), their predicted
and replayed effects compared (``removal_error``: the largest |predicted − replayed| over the
largest |replayed|, so 1 means the prediction is off by the size of the effect itself).

A result is marked unstable when a measure passes its limit; :func:`warn_if_unstable` then raises
an :class:`~diffin._errors.UnstableInfluenceWarning` that says what to do.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._errors import UnstableInfluenceWarning

if TYPE_CHECKING:
    from .estimators import ScoringContext

GROWTH_LIMIT = 100.0
"""Adjoint growth above which the linearised dynamics are taken as unstable. Measured
(BENCHMARKS.md, "When scores cannot be trusted"): stable runs stayed at 1.0–13 (the mnist5k benches
1.0–1.5, tiny BERTs at AdamW 5e-4 1.4 and 5.1), unstable ones reached 774 (tiny BERT, AdamW 1e-3,
160 steps) and 2e6–3e8 (2e-3)."""
SCALE_LIMIT = 1.0
"""Score scale above which a sample's predicted effect exceeds the target itself: for a
non-negative loss a score below −f is impossible (the loss would become negative), and one above f
(the target doubling without one sample) is implausible for any but a handful of samples."""
REMOVAL_LIMIT = 10.0
"""``removal_error`` above which the prediction of the checked removals is off by an order of
magnitude. The largest predicted removals are the least linear ones even in stable runs (on
mnist5k-mlp, Pearson 0.998 against replayed removal, the two largest overshoot by about 100%), so
the limit is not 1; in unstable runs the error is orders of magnitude larger."""
DRIFT_LIMIT = 1e-3
"""Replay drift above which the replayed run is not the recorded one (ReplayDriftWarning's own
threshold is reported there; this one only marks the trust field)."""


def assess(diagnostics: dict[str, Any], scores: np.ndarray, target_values: np.ndarray | None) -> dict[str, Any]:
    """The ``trust`` field of a result: the measures, their limits, ``stable`` and the reasons.

    ``scores``: (N,) or (N, Q); ``target_values``: f at θ_T, (Q,) (or the own losses (N,) for
    self-influence); None when they could not be computed."""
    finite = scores[np.isfinite(scores)]
    growth = diagnostics.get("adjoint_growth")
    drift = diagnostics.get("replay_drift")
    size = None
    if target_values is not None and np.size(target_values):
        size = float(np.mean(np.abs(np.asarray(target_values, dtype=np.float64))))
    top = float(np.max(np.abs(finite))) if finite.size else 0.0
    scale = None
    if size is not None and size > 0:
        scale = top / size
    out: dict[str, Any] = {
        "adjoint_growth": None if growth is None else float(growth),
        "score_scale": scale,
        "target_size": size,
        "replay_drift": None if drift is None else float(drift),
        "limits": {"adjoint_growth": GROWTH_LIMIT, "score_scale": SCALE_LIMIT, "removal_error": REMOVAL_LIMIT,
                   "replay_drift": DRIFT_LIMIT},
    }
    check = diagnostics.get("removal_check")
    if check is not None:
        out["removal_error"] = check["error"]
    reasons = []
    if finite.size < scores.size:
        reasons.append(f"{scores.size - finite.size} scores are not finite")
    if growth is not None and not float(growth) <= GROWTH_LIMIT:
        reasons.append(f"the adjoint grew by {float(growth):.3g} over the sweep (limit {GROWTH_LIMIT:g})")
    if scale is not None and scale > SCALE_LIMIT:
        reasons.append(f"the largest |score| is {scale:.3g} times the target's own size {size:.3g} "
                       f"(limit {SCALE_LIMIT:g}): one sample cannot move the target that much")
    if check is not None and not check["error"] <= REMOVAL_LIMIT:
        reasons.append(f"the {len(check['ids'])} largest predicted removals, replayed, are off by "
                       f"{check['error']:.3g} times their real effect (limit {REMOVAL_LIMIT:g})")
    if drift is not None and not float(drift) <= DRIFT_LIMIT:
        reasons.append(f"replaying training drifts {float(drift):.3g} (relative) from the recorded checkpoints")
    out["stable"] = not reasons
    out["reasons"] = reasons
    return out


def removal_error(predicted: np.ndarray, replayed: np.ndarray) -> float:
    """max |predicted − replayed| / max |replayed| (inf when the replayed effects are all 0 and the
    predictions are not)."""
    p, r = np.asarray(predicted, np.float64), np.asarray(replayed, np.float64)
    gap, size = float(np.max(np.abs(p - r))), float(np.max(np.abs(r)))
    if size > 0:
        return gap / size
    return 0.0 if gap == 0 else math.inf


def check_removals(ctx: ScoringContext, scores: np.ndarray, k: int, progress: bool) -> dict[str, Any]:
    """Replay the removal of the ``k`` samples with the largest |score| (summed over targets) for
    real and compare: ``{"ids", "predicted", "replayed", "error"}`` (error: :func:`removal_error`
    over every checked sample and target). One replay of the run with k + 1 copies side by side."""
    from .groundtruth import replay_states  # noqa: PLC0415 - groundtruth imports the scoring API

    flat = np.abs(np.nan_to_num(scores.reshape(scores.shape[0], -1), nan=np.inf)).sum(axis=1)
    ids = np.argsort(-flat, kind="stable")[: min(k, len(flat))]
    with torch.no_grad():
        full, finals = replay_states(ctx.trajectory, [np.array([i]) for i in ids], ctx.config.convention,
                                     ctx.config.replay_memory_mb, progress=progress)
        base = ctx.target.values(ctx.fm, full.theta)
        replayed = torch.stack([ctx.target.values(ctx.fm, th) - base for th in finals.theta])
    replayed_np = replayed.detach().to("cpu", torch.float64).numpy().reshape(len(ids), -1)
    predicted = scores[ids].reshape(len(ids), -1).astype(np.float64)
    return {"ids": ids.tolist(), "predicted": predicted.tolist(), "replayed": replayed_np.tolist(),
            "error": removal_error(predicted, replayed_np)}


def warn_if_unstable(trust: dict[str, Any], variant: str, stacklevel: int = 3) -> None:
    """Raise :class:`UnstableInfluenceWarning` when ``trust`` says the scores cannot be trusted."""
    if trust.get("stable", True):
        return
    warnings.warn(
        f"{variant}: these scores cannot be trusted — {'; '.join(trust['reasons'])}. The training run is "
        "unstable under small changes (steps at the edge of stability or Adam amplifying tiny gradients), so "
        "a first-order removal effect does not describe what removing a sample does to it; in float64 the "
        "replayed removals themselves may be chaotic there. What to do: score the question 'what would "
        "retraining do' (predicts='retrain', averaged over seeds); limit the horizon (horizon=H: only the last "
        "H steps carry influence back); score in float64; train with a smaller learning rate (or a larger "
        "Adam eps); or use a first-order method ('tracin', 'grad-dot'). docs/guides/trust.md explains the "
        "measures; the result's diagnostics['trust'] holds them",
        UnstableInfluenceWarning, stacklevel=stacklevel,
    )
