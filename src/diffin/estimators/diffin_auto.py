"""``diffin``: the Diff-In variant that answers the question asked with what the recording holds
(:mod:`.diffin_sweep` for the replayed run, :mod:`.diffin_retrain` for a fresh retraining)."""

from __future__ import annotations

from .base import Estimator, EstimatorOutput, ScoringContext, check_coupled, log
from .diffin_retrain import DiffInRetrain
from .diffin_sweep import DiffInExact, DiffInExpected, _Sweep


class DiffIn(Estimator):
    """Picks the best Diff-In variant for the question asked and what the recording allows:
    ``predicts="replay"``: exact, else expected; ``predicts="retrain"``: diffin-retrain."""

    name = "diffin"
    supports_batch_loss = True
    summary = ("Diff-In, best variant for the question (predicts=replay: diffin-exact, else "
               "diffin-expected; predicts=retrain: diffin-retrain)")
    needs_rule = True

    def score(self, ctx: ScoringContext) -> EstimatorOutput:
        chosen: type[_Sweep]
        if ctx.config.predicts == "retrain":
            chosen = DiffInRetrain
        else:
            chosen = DiffInExact if ctx.run.has_batch_ids else DiffInExpected
        if ctx.fm.coupled:
            check_coupled(chosen.name, chosen.supports_batch_loss, ctx.target.kind, ctx.config.predicts)
        log.info("diffin: using variant %s", chosen.name)
        out = chosen().score(ctx)  # group scores come with it when the variant supports them
        out.variant = chosen.name
        return out
