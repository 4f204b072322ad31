"""Diff-In's checkpoint closed form, docs/method.md §4.2, as the authors' public code has it:

    I(z) = Σ_{t∈T_m} −(t·η_t²)/(N·m) · ⟨∇f(θ_t), H_{B_t} G_z + H_z G_{B_t}⟩

T_m are the recorded checkpoints after step 0 (m of them), or with ``closed_form_checkpoints=m``
m of them evenly spaced, the last included (:func:`evenly_spaced`; the diagnostics report m and
the steps used), t the checkpoint's step, η_t the
learning rate of step t (of step T−1 for θ_T), B_t a proxy batch drawn at the checkpoint
(``proxy_batches`` batches of ``proxy_batch_size`` averaged). The formula measures up-weighting;
diffin reports its negative so that the sign and units follow docs/method.md §2:

    score(z) = Σ_t (t·η_t²)/(N·m) · ( ⟨H_B ∇f, G_z⟩ + ∇fᵀ H_z G_B )

by the symmetry of H_B (one HVP per checkpoint, then one JVP pass over all samples) and a
mixed second directional derivative of l(z; θ) along ∇f and G_B (exact: one triple-backward pass).
``first_order=True`` adds the TracIn-CP term of the same checkpoints. The truncation behind the
formula, (I − tηH) ≈ I, holds only while t·η·‖H‖ ≪ 1; benchmarks show where it breaks.

The formula is the paper's, for SGD: on a run trained with any other optimizer (Adam, AdamW,
...) it is refused by name (:class:`diffin.UnsupportedMethodError`) rather than run with a
meaning it does not have; ``diffin`` / ``diffin-exact`` follow those optimizers exactly. With
parameter groups of different learning rates, η_t is group 0's (``Run.lrs``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, vmap
from torch.func import jvp

from .._errors import ResumeMismatchError, UnsupportedMethodError
from .._functional import fd_epsilon
from .._resume import SweepState
from ..recording.run import Run
from .base import Estimator, EstimatorOutput, ScoringContext


class DiffInClosedForm(Estimator):
    name = "diffin-closed-form"
    summary = "Diff-In closed form over checkpoints (paper's Eq. 9; truncated, no batch order)"

    @classmethod
    def check(cls, run: Run, target_kind: str = "mean", predicts: str = "replay", coupled: bool = False) -> None:
        super().check(run, target_kind, predicts, coupled)
        if run.optimizer.kind != "SGD":
            raise UnsupportedMethodError(
                f"method {cls.name!r} is the paper's closed form for SGD; this run used "
                f"{run.optimizer.kind}. Use 'diffin' (it follows {run.optimizer.kind}'s steps exactly) "
                "or 'tracin'"
            )

    def score(self, ctx: ScoringContext) -> EstimatorOutput:
        run, fm, cfg = ctx.run, ctx.fm, ctx.config
        N = ctx.n_train
        tgt = ctx.target
        Q = 1 if tgt.kind == "self" else tgt.size
        recorded = [c for c in run.checkpoint_steps if c > 0]
        steps = evenly_spaced(recorded, cfg.closed_form_checkpoints)
        m = len(steps)
        scores = torch.zeros(N, Q, dtype=torch.float64, device=fm.device)
        rng = np.random.default_rng(cfg.seed)
        b = ctx.proxy_batch_size()
        k = cfg.proxy_batches or 1
        prev = 0
        coefs: list[float] = []
        start = 0
        saved = ctx.resume.load()
        if saved is not None:  # continue after the checkpoints already done (docs/method.md §4.1)
            if saved.meta.get("variant") != self.name:
                raise ResumeMismatchError(
                    f"the saved state is of {saved.meta.get('variant')!r}, this scoring runs {self.name!r}; "
                    "pass overwrite=True (--overwrite) to discard it and start again"
                )
            start = int(saved.meta["next_checkpoint"])
            scores = saved.tensors["scores"].to(scores.dtype)
            rng.bit_generator.state = saved.meta["rng"]
            coefs = [float(v) for v in saved.meta["coefficients"]]
            prev = steps[start - 1] if start else 0
        with ctx.bar(m, self.name) as bar:
            bar.update(start)
            for j, c in enumerate(steps):
                if j < start:
                    continue
                theta = ctx.trajectory.theta(c)
                eta = float(run.lrs[min(c, run.n_steps - 1)])
                coef = c * eta**2 / (N * m)
                coefs.append(coef)
                first = float(np.sum(run.lrs[prev:c])) / N if cfg.first_order else 0.0
                prev = c
                proxy = np.concatenate([rng.choice(N, size=b, replace=False) for _ in range(k)])
                xp, yp = ctx.train.get(proxy)
                GB, _ = fm.loss_grad(theta, xp, yp)  # (P,)
                if tgt.kind == "self":
                    self._self_terms(ctx, theta, xp, yp, GB, coef, first, scores)
                else:
                    g = tgt.grads(fm, theta)  # (Q, P)
                    for ids, s in self._pair_terms(ctx, theta, xp, yp, GB, g):
                        s = coef * s
                        if first:
                            s = s + first * fm.dots(theta, *ctx.train.get(ids), g)
                        scores[ids] += s.T.double()
                bar.update()
                if j + 1 < m:
                    ctx.resume.maybe_save(c - (steps[j - 1] if j else 0), self._state(j + 1, m, scores, rng, coefs))

        out = scores if tgt.kind == "pairwise" else scores[:, 0]
        diag: dict[str, object] = {"coefficients": coefs, "m": m, "steps": steps, "recorded_checkpoints": len(recorded)}
        asked = cfg.closed_form_checkpoints
        if asked is not None and asked > len(recorded):
            diag["note"] = (f"closed_form_checkpoints={asked} but the run has {len(recorded)} checkpoints after "
                            f"step 0: all {len(recorded)} used")
        return EstimatorOutput(out, self.name, diag)

    def _state(self, nxt: int, m: int, scores: Tensor, rng: np.random.Generator,
               coefs: list[float]) -> Callable[[], SweepState]:
        """The resume state after ``nxt`` of the m checkpoints: the scores so far, the proxy RNG
        and the coefficients used (a per-checkpoint done-mark: checkpoints are visited in order)."""
        def state() -> SweepState:
            return SweepState({"scores": scores}, {
                "variant": self.name, "next_checkpoint": nxt, "rng": rng.bit_generator.state,
                "coefficients": list(coefs), "where": f"{self.name}, {nxt} of {m} checkpoints done"})
        return state

    @staticmethod
    def _pair_terms(ctx, theta, xp, yp, GB, g):  # noqa: ANN001, ANN205
        """Yield (ids, ⟨∇f, H_B G_z + H_z G_B⟩ of shape (Q, B)) chunk by chunk.

        Exact mode: ⟨H_B ∇f, G_z⟩ (one HVP, one JVP pass) plus the mixed second derivative
        ∇fᵀ H_z G_B (exact: one triple backward). Finite differences: by the product rule the bracket
        is the derivative along ∇f of ⟨G_B(θ), G_z(θ)⟩, so
        ``(⟨G_B(θ⁺), G_z(θ⁺)⟩ − ⟨G_B(θ⁻), G_z(θ⁻)⟩) / 2ε · ‖∇f‖`` with θ± = θ ± ε∇f/‖∇f‖:
        two batch gradients and two JVP passes (forward differences: one of each more at θ).
        """
        fm, cfg = ctx.fm, ctx.config
        if ctx.hvp_mode == "exact":
            Hg = fm.hvp(theta, xp, yp, g, mode="exact")
            for ids, x, y in ctx.train.chunks(ctx.product_chunk()):
                yield ids, fm.mixed_second(theta, x, y, g, GB, plus_dots=Hg)
            return
        norms = g.norm(dim=1, keepdim=True)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        e = fd_epsilon(theta, ctx.hvp_mode, cfg.fd_eps)
        units = g / safe
        plus = theta + e * units  # (Q, P)
        minus = theta - e * units if ctx.hvp_mode == "central" else theta.expand_as(plus)
        denom = 2 * e if ctx.hvp_mode == "central" else e
        gb_plus, _ = fm.loss_grad_many(plus, xp, yp)
        gb_minus, _ = fm.loss_grad_many(minus, xp, yp)
        thetas = torch.cat([plus, minus])  # (2Q, P): both ends in one vmapped JVP pass
        tangents = torch.cat([gb_plus, gb_minus])
        Q = len(g)
        for ids, x, y in ctx.train.chunks(ctx.product_chunk()):
            rows = torch.cat([fm.dots_many(thetas[s : s + 8], x, y, tangents[s : s + 8])
                              for s in range(0, 2 * Q, 8)])
            yield ids, (rows[:Q] - rows[Q:]) * (norms / denom)

    @staticmethod
    def _self_terms(ctx, theta, xp, yp, GB, coef, first, scores) -> None:  # noqa: ANN001
        """Self-influence: ∇f = G_z, so each sample needs its own HVP: ⟨H_B G_z, G_z⟩ and
        G_zᵀ H_z G_B. Cost: one batch HVP per training sample per checkpoint."""
        fm, cfg = ctx.fm, ctx.config

        def own_mixed(th, xi, yi, a):  # aᵀ ∇²l(z) G_B for one sample
            def along_b(t2):
                return jvp(lambda t3: fm.losses(t3, xi[None], yi[None])[0], (t2,), (GB,))[1]

            return jvp(along_b, (th,), (a,))[1]

        for ids, x, y in ctx.train.chunks(64):
            G = fm.per_sample_grads(theta, x, y)  # (B, P)
            HG = fm.hvp(theta, xp, yp, G, mode=ctx.hvp_mode, eps=cfg.fd_eps)  # (B, P)
            t1 = (HG * G).sum(dim=1)
            t2 = vmap(own_mixed, in_dims=(None, 0, 0, 0))(theta, x, y, G)
            s = coef * (t1 + t2) + first * (G * G).sum(dim=1)
            scores[ids, 0] += s.double()


def evenly_spaced(steps: list[int], m: int | None) -> list[int]:
    """``m`` of the recorded checkpoint ``steps`` (ascending, M of them), evenly spaced and ending
    with the last: the ``ceil(j·M/m)``-th for j = 1..m, the subset the paper's checkpoints at
    T·j/m become on a run checkpointed every T/M steps. ``None`` or ``m >= M``: all of them."""
    M = len(steps)
    if m is None or m >= M:
        return list(steps)
    return [steps[(j * M + m - 1) // m - 1] for j in range(1, m + 1)]
