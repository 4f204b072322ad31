"""Diff-In by the backward (adjoint) sweep, docs/method.md §4.1 and §4.3, on any optimizer
with a rule in :mod:`diffin.trajectory.optim` (SGD with momentum, Nesterov, dampening and weight
decay; Adam; AdamW; parameter groups; gradient-norm clipping; accumulated micro-batches).

With the adjoint (θ̄_t, s̄_t) = ∂f/∂(θ_t, s_t) of the training state (s: the optimizer's state):

    θ̄_T = ∇f(θ_T), s̄_T = 0
    for t = T−1 … 0:
        (w, θ̄', s̄_t) = the transpose of step t's linearisation applied to (θ̄_{t+1}, s̄_{t+1})
                        (``Trajectory.adjoint``: the optimizer rule, then the clip transpose;
                        w is the coefficient of the step's raw batch gradient g)
        for z in B_t:  score(z) += ⟨w, Δg_z⟩            (keep: Δg_z = −G_z(θ_t)/|B_t|)
        θ̄_t = θ̄' + H_{B_t}(θ_t)·w

For plain SGD this is exactly  score(z) += (η_t/|B_t|)⟨θ̄_{t+1}, G_z⟩,
θ̄_t = θ̄_{t+1} − η_t(H_{B_t} + λI)θ̄_{t+1}.  One batch HVP and one per-sample inner product per
step serve every training sample together; with central differences both come from two
gradient evaluations at θ_t ± εŵ. Adam's and clipping's w depend on the step's gradient g:
the replay keeps it with the state (within the memory budget); the frozen variants compute it
at the frozen θ. SGD without clipping needs no g (its w does not depend on it).

Variants differ in the state used at step t:

* ``diffin-exact``  — replayed forward from the nearest earlier checkpoint (segment by segment).
* ``diffin-frozen`` — θ and the optimizer state (and its step count) of the nearest earlier
  checkpoint (no replay); g is the batch gradient at that θ.
* ``diffin-expected`` — no batch ids: frozen as above, H_{B_t} and g from proxy batches,
  each sample credited its expected share |B|/N of every step.

Every segment starts from its checkpoint, so the sweep's state between two segments is (θ̄, s̄,
the scores so far, group values, the proxy RNG, the growth diagnostics): saved there through
``ctx.resume`` and restored, a killed sweep finishes bit-identically (docs/method.md §4.1,
"Resumable sweeps").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .._errors import ResumeMismatchError
from .._resume import SweepState
from ..targets import Target
from ..trajectory import TrainState, Trajectory
from .base import Estimator as _Estimator
from .base import EstimatorOutput, GroupAccumulator, ScoringContext, add_removal_contrib, exact_costs_less

if TYPE_CHECKING:
    from tqdm import tqdm

SELF_CHUNK = 64


class _Sweep(_Estimator):
    """Shared driver: mean / pairwise targets in one sweep, self-influence in chunks."""

    needs_rule = True
    group_acc: GroupAccumulator | None = None
    growth: float = 1.0  # largest ‖θ̄_t‖ / ‖θ̄_T‖ seen at segment ends (see note_growth)
    _norm_T: float | None = None
    _saved: SweepState | None = None  # the state to resume from (ctx.resume.load()), used once
    _outer: Callable[[], SweepState] | None = None  # the self-influence chunk loop's part of a save

    def note_growth(self, A: Tensor, start: bool = False) -> None:
        """Track how much the adjoint θ̄ grew from θ̄_T (called with ``start`` at T, then at every
        segment's start). Linearised training dynamics at the edge of stability (η·λ_max(H) > 2 for
        many steps) make it grow exponentially; the growth goes into the diagnostics and explains
        non-finite scores."""
        n = float(A.norm())
        if start or self._norm_T is None:
            self._norm_T = max(n, torch.finfo(A.dtype).tiny)
            return
        self.growth = max(self.growth, n / self._norm_T) if n == n else float("inf")

    def score(self, ctx: ScoringContext) -> EstimatorOutput:
        tgt = ctx.target
        self._saved = ctx.resume.load()
        if tgt.kind == "self":
            scores = torch.zeros(ctx.n_train, dtype=torch.float64)
            first = 0
            if self._saved is not None:
                first = int(self._saved.meta["chunk"])
                scores = self._saved.tensors["self_scores"].to(scores.dtype)
            step = SELF_CHUNK
            if ctx.fm.coupled:  # whole chunks of the self target's (docs/method.md §4.7)
                c = ctx.member_chunk()
                step = c * max(1, SELF_CHUNK // c)
            for start in range(first, ctx.n_train, step):
                self._outer = lambda s=start: SweepState({"self_scores": scores}, {"chunk": s})
                ids = np.arange(start, min(start + step, ctx.n_train))
                m = self.sweep(ctx, tgt.subset(ids))
                scores[ids] = m[torch.as_tensor(ids), torch.arange(len(ids))].cpu()
            self._outer = None
        else:
            m = self.sweep(ctx, tgt)
            scores = m[:, 0] if tgt.kind == "mean" else m
        groups = None
        if self.group_acc is not None:
            groups = self.group_acc.values
            groups = groups[:, 0] if tgt.kind == "mean" else groups
        diag = {"replay_drift": ctx.trajectory.drift, "adjoint_growth": self.growth,
                "optimizer": ctx.run.optimizer.kind,
                "clip_grad_norm": ctx.trajectory.clip_norm}
        return EstimatorOutput(scores, self.name, diag, group_scores=groups)

    def sweep(self, ctx: ScoringContext, target: Target) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def begin(
        self, ctx: ScoringContext, target: Target, rng: np.random.Generator | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], int]:
        """The start of a sweep: θ̄_T = ∇f(θ_T) (Q, P), zero scores (N, Q) and s̄ = {}, or the
        state saved at a segment boundary when the sweep resumes (:meth:`restore`); with the index
        of the first segment still to do in :meth:`remaining`'s order."""
        A, scores = _start(ctx, target)
        self.note_growth(A, start=True)
        first, A, scores, S = self.restore(ctx, A, scores, {}, rng)
        return A, scores, S, first

    @staticmethod
    def remaining(ctx: ScoringContext, first: int, bar: tqdm) -> Iterator[tuple[int, int, int]]:
        """``(i, c0, c1)`` of the checkpoint segments still to do, last segment first (i counts
        from the last), after advancing ``bar`` past the steps of the ``first`` done already."""
        segments = list(reversed(ctx.run.segments))
        bar.update(sum(c1 - c0 for c0, c1 in segments[:first]))
        for i in range(first, len(segments)):
            c0, c1 = segments[i]
            yield i, c0, c1

    def restore(
        self, ctx: ScoringContext, A: Tensor, scores: Tensor, S: dict[str, Tensor],
        rng: np.random.Generator | None = None,
    ) -> tuple[int, Tensor, Tensor, dict[str, Tensor]]:
        """Continue from the saved state, if any (once): returns the index of the first segment
        still to do in ``reversed(ctx.run.segments)`` and the adjoint θ̄ (Q, P), the scores (N, Q)
        and s̄ at that boundary; sets the group values, the proxy RNG ``rng``, the growth and the
        replay drift. Without a saved state: ``(0, A, scores, S)`` unchanged."""
        st, self._saved = self._saved, None
        if st is None:
            return 0, A, scores, S
        if st.meta.get("variant") != self.name:
            raise ResumeMismatchError(
                f"the saved sweep state is of {st.meta.get('variant')!r}, this scoring runs {self.name!r}; "
                "pass overwrite=True (--overwrite) to discard it and start again"
            )
        T = st.tensors
        A = T["A"].to(device=A.device, dtype=A.dtype)
        scores = T["scores"].to(device=scores.device, dtype=scores.dtype)
        S = {k.removeprefix("S."): v.to(A.device) for k, v in T.items() if k.startswith("S.")}
        if self.group_acc is not None:
            self.group_acc.values = T["groups"].to(self.group_acc.values.dtype)
        if rng is not None:
            rng.bit_generator.state = st.meta["rng"]
        self.growth, self._norm_T = float(st.meta["growth"]), float(st.meta["norm_T"])
        ctx.trajectory.drift = float(st.meta["drift"])
        return int(st.meta["next_segment"]), A, scores, S

    def save_point(
        self, ctx: ScoringContext, steps: int, next_segment: int, A: Tensor, scores: Tensor,
        S: dict[str, Tensor], rng: np.random.Generator | None = None,
    ) -> None:
        """After a segment of ``steps`` steps: offer the state at this boundary (``next_segment``:
        the index of the next segment in ``reversed(ctx.run.segments)``) to ``ctx.resume``, which
        saves it when due. Nothing after the sweep's last segment."""
        n_segments = len(ctx.run.segments)
        if next_segment >= n_segments:
            return

        def state() -> SweepState:
            tensors = {"A": A, "scores": scores, **{f"S.{k}": v for k, v in S.items()}}
            if self.group_acc is not None:
                tensors["groups"] = self.group_acc.values
            meta = {"variant": self.name, "next_segment": next_segment, "growth": self.growth,
                    "norm_T": self._norm_T, "drift": ctx.trajectory.drift,
                    "rng": None if rng is None else rng.bit_generator.state,
                    "where": f"{self.name}, {next_segment} of {n_segments} segments done"}
            if self._outer is not None:
                outer = self._outer()
                tensors.update(outer.tensors)
                meta.update(outer.meta)
                meta["where"] += f", self-influence chunk from sample {outer.meta['chunk']}"
            return SweepState(tensors, meta)

        ctx.resume.maybe_save(steps, state)


def _start(ctx: ScoringContext, target: Target) -> tuple[Tensor, Tensor]:
    """θ̄_T = ∇f(θ_T) (Q, P) and zero scores (N, Q). The HVP mode is resolved first, so its probe
    (which installs θ_T's buffers) runs at the same point whether or not the sweep resumes."""
    _ = ctx.hvp_mode
    theta_T = ctx.trajectory.theta(ctx.run.n_steps)
    A = target.grads(ctx.fm, theta_T)  # (Q, P)
    scores = torch.zeros(ctx.n_train, A.shape[0], dtype=torch.float64, device=A.device)
    return A, scores


STATS_KEY = "__running_stats__"
"""Where a saved sweep state keeps r̄, the adjoint of the running statistics, beside s̄."""


def _stats_start(ctx: ScoringContext, target: Target) -> Tensor | None:
    """r̄_T = ∂f/∂r_T (Q, R) for a model whose train-mode BatchNorm layers keep running statistics
    (the eval-mode target reads them, docs/method.md §4.8); None otherwise. Call after
    :func:`_start` (θ_T's buffers installed)."""
    fm = ctx.fm
    if not fm.stat_names or not ctx.trajectory.train_mode:
        return None
    at_T = ctx.trajectory.state(ctx.run.n_steps)  # θ_T and r_T from one read of the checkpoint
    assert at_T.stats is not None
    return target.stat_grads(fm, at_T.theta, at_T.stats)


def _frozen(traj: Trajectory, c0: int, c1: int) -> Iterator[tuple[int, TrainState, Tensor | None]]:
    """(t, state, g) for t = c1−1 … c0 with θ frozen at the checkpoint θ_{c0}.

    Rules whose adjoint does not depend on g (SGD without clipping) use the checkpoint's state
    for every step and need no gradient. Rules whose adjoint does (Adam, clipping) let the
    optimizer state and step count follow the segment's batches with gradients at θ_{c0}: frozen
    moments would treat every step after a fresh checkpoint (step 0) as Adam's first step, a
    sign-descent step whose sensitivity compounds without bound over the segment."""
    if traj.needs_gradient:
        yield from traj.replay_reversed(c0, c1, freeze_theta=True)
        return
    at = traj.state(c0)
    for t in range(c1 - 1, c0 - 1, -1):
        yield t, traj.frozen_state(at, t, c0), None


class DiffInExact(_Sweep):
    """Backward sweep with the state replayed from the nearest earlier checkpoint (best, default)."""

    name = "diffin-exact"
    supports_batch_loss = True
    summary = "Diff-In backward sweep, θ_t replayed from checkpoints (needs batch ids)"
    needs_batch_ids = True
    follows_recorded_order = True
    replay = True

    def sweep(self, ctx: ScoringContext, target: Target) -> Tensor:
        cfg, traj = ctx.config, ctx.trajectory
        need_g = traj.needs_gradient
        if ctx.groups is not None and target.kind != "self":
            self.group_acc = GroupAccumulator(ctx.groups, ctx.n_train, target.size, cfg.convention)
        ctx.prefer_exact = exact_costs_less(ctx.fm, self.replay)
        A, scores, S, first = self.begin(ctx, target)  # S: s̄, the adjoint of the optimizer's state
        traj.keep_graphs = self.replay and ctx.fm.keeps_graphs and ctx.hvp_mode == "exact"  # 2 passes, not 3
        R = _stats_start(ctx, target)  # r̄_T = ∂f/∂r_T (Q, R): the eval-mode target reads the running statistics
        if R is not None and STATS_KEY in S:
            R = S.pop(STATS_KEY)
        t_min = 0 if cfg.horizon is None else max(0, ctx.run.n_steps - cfg.horizon)
        with ctx.bar(ctx.run.n_steps, self.name) as bar:
            for i, c0, c1 in self.remaining(ctx, first, bar):
                if c1 <= t_min:  # a limited horizon: steps before T − H carry no influence
                    break
                states = traj.replay_reversed(c0, c1) if self.replay else _frozen(traj, c0, c1)
                for t, state, g in states:
                    if t < t_min:
                        break
                    ids, x, y = traj.batch(t)
                    if g is None and need_g:
                        with traj.at_step(t, state, x):
                            g = traj.gradient(state.theta, x, y)
                    A, S, R, d = traj.transpose(t, state, g, x, y, A, S, R, ctx.hvp_mode, cfg.fd_eps, cfg.dots)
                    add_removal_contrib(scores, ids, d, cfg.convention)
                    if self.group_acc is not None:
                        self.group_acc.add(ids, d)
                    bar.update()
                self.note_growth(A)
                self.save_point(ctx, c1 - c0, i + 1, A, scores, S if R is None else {**S, STATS_KEY: R})
        return scores


class DiffInFrozen(DiffInExact):
    """Backward sweep with θ and the optimizer state frozen at the nearest earlier checkpoint."""

    name = "diffin-frozen"
    summary = "Diff-In backward sweep, θ frozen at the nearest earlier checkpoint (needs batch ids)"
    replay = False


class DiffInExpected(_Sweep):
    """Backward sweep without batch ids: proxy batches and expected per-step credit.

    Each sample is in B_t with probability |B|/N, so its expected credit at step t is
    ⟨w_t, −G_z⟩/N. With θ frozen at checkpoint c over the segment, the credits sum to
    −⟨Σ_t w_t, G_z(θ_c)⟩/N: one pass of per-sample inner products per checkpoint.
    """

    name = "diffin-expected"
    summary = "Diff-In sweep from checkpoints and learning rates only (proxy batches)"

    def sweep(self, ctx: ScoringContext, target: Target) -> Tensor:
        cfg, fm, traj = ctx.config, ctx.fm, ctx.trajectory
        N = ctx.n_train
        b = ctx.proxy_batch_size()
        rng = np.random.default_rng(cfg.seed)
        ctx.prefer_exact = exact_costs_less(fm, replay=False)
        A, scores, S, first = self.begin(ctx, target, rng)
        with ctx.bar(ctx.run.n_steps, self.name) as bar:
            for i, c0, c1 in self.remaining(ctx, first, bar):
                at = traj.state(c0)
                theta = at.theta
                proxies = None
                if cfg.proxy_batches is not None:
                    proxies = [rng.choice(N, size=b, replace=False) for _ in range(cfg.proxy_batches)]
                W_sum = torch.zeros_like(A)
                evolved = None
                if traj.needs_gradient:  # the optimizer state follows the proxy batches (see _frozen)
                    ids_of = {t: (proxies[(t - c0) % len(proxies)] if proxies is not None
                                  else rng.choice(N, size=b, replace=False)) for t in range(c0, c1)}
                    evolved = traj.replay_reversed(c0, c1, freeze_theta=True,
                                                   batch_of=lambda t, m=ids_of: ctx.train.get(m[t]))
                for t in range(c1 - 1, c0 - 1, -1):
                    if evolved is not None:
                        _, state, g = next(evolved)
                        ids = ids_of[t]
                    else:
                        ids = (proxies[(t - c0) % len(proxies)] if proxies is not None
                               else rng.choice(N, size=b, replace=False))
                        state, g = traj.frozen_state(at, t, c0), None
                    x, y = ctx.train.get(ids)
                    W, A_direct, S = traj.adjoint(t, state, g, A, S)
                    W_sum += W
                    HW = fm.hvp(theta, x, y, W, mode=ctx.hvp_mode, eps=cfg.fd_eps)
                    A = A_direct + HW
                    bar.update()
                self.note_growth(A)
                pay_expected_credit(ctx, scores, theta, W_sum)
                self.save_point(ctx, c1 - c0, i + 1, A, scores, S, rng)
        return scores


def pay_expected_credit(ctx: ScoringContext, scores: Tensor, theta: Tensor, W_sum: Tensor) -> None:
    """scores (N, Q) −= the expected credit ⟨W_sum, G_z(θ)⟩/N of every sample (one streamed pass
    of per-sample inner products; W_sum (Q, P) is the summed coefficient of the steps paid for);
    under ``renormalize`` the credit is centred (the removed sample's weight goes to the others
    of its batch, of the recorded size or else the proxy size)."""
    cfg, N = ctx.config, ctx.n_train
    D = torch.cat([ctx.fm.dots(theta, x, y, W_sum).T for _, x, y in ctx.train.chunks(ctx.product_chunk())])
    D = D.to(scores.dtype)  # (N, Q)
    if cfg.convention == "keep":
        scores -= D / N
    else:
        bb = ctx.run.batch_size_hint() or ctx.proxy_batch_size()
        scores -= (bb / max(bb - 1, 1)) * (D - D.mean(dim=0, keepdim=True)) / N
