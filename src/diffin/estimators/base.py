"""The estimator protocol, its registry, and the context every estimator scores in.

An estimator scores every training sample against a target:

    score(z) ≈ f(θ_T^{−z}) − f(θ_T)      (docs/method.md §2; positive = z helped)

Subclasses set ``name`` (registering themselves), declare what they need from the recording
(``needs_batch_ids``, ``needs_sgd``) and implement :meth:`Estimator.score`. They may read the
run, the functional model, the data and the target through :class:`ScoringContext`, and nothing
else.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from .._data import DataSource
from .._errors import ConfigError, UnknownMethodError, UnsupportedMethodError
from .._functional import FlatModel
from .._progress import progress_bar
from ..config import ScoreConfig
from ..recording.run import Run
from ..targets import Target

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger("diffin")


NON_SMOOTH = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.FractionalMaxPool2d,
)
"""Layers whose gradient jumps: finite-difference HVPs across them are unreliable."""


class ReplayDriftWarning(UserWarning):
    """Replaying training from a checkpoint did not land on the next checkpoint."""


@dataclass
class EstimatorOutput:
    """Scores (N,) or (N, Q) in loss units, the variant actually run, and diagnostics."""

    scores: Tensor
    variant: str
    diagnostics: dict[str, Any] = field(default_factory=dict)
    group_scores: Tensor | None = None  # (K,) or (K, Q): whole-group removals, when supported


class ScoringContext:
    """What an estimator may touch: the run, the model as a function of θ, data and target."""

    def __init__(
        self,
        run: Run,
        fm: FlatModel,
        train: DataSource,
        target: Target,
        config: ScoreConfig,
        progress: bool = True,
        groups: list[np.ndarray] | None = None,
    ) -> None:
        self.run = run
        self.groups = groups
        self.fm = fm
        self.train = train
        self.target = target
        self.config = config
        self.progress = progress
        self.n_train = len(train)
        self.drift = 0.0  # largest relative replay drift seen (see replay_reversed)
        self._hvp_mode: str | None = None
        self.hvp_reason = ""

    # ------------------------------------------------------------------ second order
    @property
    def hvp_mode(self) -> str:
        """The HVP mode estimators use: the config's, or for ``"auto"`` central differences
        unless the model is non-smooth (see :meth:`_resolve_hvp`)."""
        if self._hvp_mode is None:
            self._hvp_mode, self.hvp_reason = self._resolve_hvp()
        return self._hvp_mode

    def _resolve_hvp(self) -> tuple[str, str]:
        """Central differences of gradients jump where a perturbation θ ± εv̂ crosses a kink
        (ReLU, max-pool, |x|): one crossing among thousands of pre-activations spoils an HVP, and
        the sweep carries the error. ``auto`` therefore uses the exact HVP when the model holds a
        known non-smooth layer, or when central differences disagree with the exact HVP on a
        probe batch at θ_T (which also catches functional kinks like ``F.relu``)."""
        cfg = self.config
        if cfg.hvp != "auto":
            return cfg.hvp, "set by the config"
        kinks = sorted({type(m).__name__ for m in self.fm.model.modules() if isinstance(m, NON_SMOOTH)})
        if kinks:
            return "exact", f"non-smooth layers {kinks}"
        theta, _ = self.checkpoint(self.run.n_steps)
        ids = np.arange(min(self.n_train, 256))
        x, y = self.train.get(ids)
        g = torch.Generator().manual_seed(cfg.seed)
        v = torch.randn(theta.numel(), generator=g, dtype=torch.float64).to(theta.dtype)
        try:
            exact = self.fm.hvp(theta, x, y, v, mode="exact")
        except (RuntimeError, NotImplementedError) as e:  # an op without forward-mode AD
            return "central", f"exact HVP unavailable ({type(e).__name__}); finite differences"
        fd = self.fm.hvp(theta, x, y, v, mode="central", eps=cfg.fd_eps)
        rel = float((fd - exact).norm() / exact.norm().clamp(min=torch.finfo(theta.dtype).tiny))
        tol = 1e-4 if theta.dtype == torch.float64 else 5e-2
        if rel > tol:
            return "exact", f"central differences off by {rel:.1e} (relative) on a probe batch"
        return "central", f"smooth model (probe agreement {rel:.1e})"

    # ------------------------------------------------------------------ trajectory
    def checkpoint(self, step: int) -> tuple[Tensor, Tensor | None]:
        """θ_c (P,) and the SGD momentum buffer v_c (P,) or None, at a checkpoint step.

        Buffers and frozen parameters of that checkpoint are installed in the functional model.
        """
        ck = self.run.load_checkpoint(step)
        frozen = {n: t for n, t in ck.params.items() if n not in set(self.fm.spec.names)}
        self.fm.set_constants({**frozen, **ck.buffers})
        theta = self.fm.flatten(ck.params)
        mom = self.fm.flatten(ck.momentum) if ck.momentum is not None else None
        return theta, mom

    def batch(self, t: int) -> tuple[np.ndarray, Tensor, Tensor]:
        """Ids, inputs and targets of the recorded batch of step t."""
        ids = self.run.batch(t)
        x, y = self.train.get(ids)
        return ids, x, y

    def first_step_fresh(self, t: int) -> bool:
        """True at step 0 when the optimizer started without momentum buffers (PyTorch then
        initialises the buffer with the gradient itself)."""
        return t == 0 and self.run.optimizer.momentum != 0 and not self._has_momentum0()

    def _has_momentum0(self) -> bool:
        return bool(self.run._ckpt_entries[0].get("has_momentum", False))

    def sgd_step(
        self, theta: Tensor, v: Tensor | None, t: int, x: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """One recorded training step θ_t → θ_{t+1} (and momentum), as torch.optim.SGD does."""
        g, _ = self.fm.loss_grad(theta, x, y)
        return self.sgd_update(theta, v, t, g)

    def sgd_update(
        self, theta: Tensor, v: Tensor | None, t: int, g: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Apply step t's SGD update given the batch gradient g (P,) (weight decay added here)."""
        opt = self.run.optimizer
        if opt.weight_decay:
            g = g + opt.weight_decay * theta
        eta = float(self.run.lrs[t])
        a, alpha, beta = opt.sgd_coefficients(self.first_step_fresh(t))
        if opt.momentum == 0:
            return theta - eta * g, None
        v_old = torch.zeros_like(theta) if v is None else v
        return theta - eta * (alpha * g + beta * v_old), opt.momentum * v_old + a * g

    def replay_reversed(self, c0: int, c1: int) -> Iterator[tuple[int, Tensor]]:
        """Yield (t, θ_t) for t = c1−1 … c0, replaying training forward from checkpoint c0.

        Memory holds at most about ``replay_memory_mb`` of states: when a segment's states do not
        fit, anchors are kept every s steps and each stretch is replayed again (twice the replay
        cost, memory O(√segment)). The replayed θ_{c1} is compared with the recorded one; the
        relative drift is kept in ``self.drift`` and warned about when large.
        """
        theta, v = self.checkpoint(c0)
        length = c1 - c0
        per_state = theta.numel() * theta.element_size() * (2 if v is not None or
                                                            self.run.optimizer.momentum else 1)
        cap = max(2, int(self.config.replay_memory_mb * 2**20 // per_state))
        stride = 1 if length <= cap else math.ceil(length / (cap // 2))
        if stride > cap // 2 + 1:
            raise ConfigError(
                f"a segment of {length} steps needs more than {self.config.replay_memory_mb} MB of "
                "replay memory even with two-level replay; raise replay_memory_mb or record "
                "checkpoints more often"
            )
        anchors: list[tuple[int, Tensor, Tensor | None]] = []
        stored: list[Tensor] = []
        for t in range(c0, c1):
            if stride == 1:
                stored.append(theta)
            elif (t - c0) % stride == 0:
                anchors.append((t, theta, v))
            _, x, y = self.batch(t)
            theta, v = self.sgd_step(theta, v, t, x, y)
        self._note_drift(c0, c1, theta)
        if stride == 1:
            for i in range(length - 1, -1, -1):
                yield c0 + i, stored[i]
            return
        for t_a, th, vv in reversed(anchors):
            end = min(t_a + stride, c1)
            local: list[Tensor] = []
            for t in range(t_a, end):
                local.append(th)
                _, x, y = self.batch(t)
                th, vv = self.sgd_step(th, vv, t, x, y)
            for i in range(len(local) - 1, -1, -1):
                yield t_a + i, local[i]

    def _note_drift(self, c0: int, c1: int, replayed: Tensor) -> None:
        recorded, _ = self.checkpoint(c1)
        start, _ = self.checkpoint(c0)
        moved = float((recorded - start).norm())
        rel = float((replayed - recorded).norm()) / max(moved, torch.finfo(recorded.dtype).tiny)
        self.drift = max(self.drift, rel)
        tol = 100 * torch.finfo(recorded.dtype).eps ** 0.5
        if rel > tol:
            warnings.warn(
                f"replaying steps {c0}..{c1} from the checkpoint lands {rel:.2e} (relative to the "
                f"segment's movement) away from the recorded checkpoint {c1}. The scores assume "
                "the recorded loop is reproducible: same loss_fn (mean over the batch), the "
                "recorded lr, no dropout/augmentation randomness, SGD as recorded.",
                ReplayDriftWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ helpers
    def bar(self, total: int, desc: str) -> tqdm:
        """A progress bar over ``total`` steps (silent when progress is off or off a terminal)."""
        return progress_bar(total, desc, self.progress, unit="step")

    def proxy_batch_size(self) -> int:
        if self.config.proxy_batch_size is not None:
            return min(self.config.proxy_batch_size, self.n_train)
        hint = self.run.batch_size_hint()
        return min(hint if hint else 128, self.n_train)


def add_removal_contrib(
    scores: Tensor, ids: np.ndarray, d: Tensor, convention: str
) -> None:
    """Add the first-order effect of removing each sample of a batch at one step.

    ``d`` (Q, B) holds ⟨w, ∇l_i(θ_t)⟩ where w is the adjoint's coefficient of the batch gradient
    g in this step's update (removal changes g by Δg). ``keep``: Δg = −k·G_z/|B| for a sample
    appearing k times; ``renormalize``: Δg = k·(G_B − G_z)/(|B| − k). The change of f is
    ⟨w, Δg⟩, added to ``scores`` (N, Q) at the sample's row.
    """
    B = len(ids)
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    d_u = d[:, torch.as_tensor(first)]  # (Q, U)
    k = torch.as_tensor(counts, dtype=d.dtype, device=d.device)
    if convention == "keep":
        contrib = -k * d_u / B
    else:
        mean = d.mean(dim=1, keepdim=True)
        rest = torch.as_tensor(B - counts, dtype=d.dtype, device=d.device)
        whole = rest == 0  # removing z empties the batch: the step's gradient vanishes
        contrib = torch.where(whole, -d_u, k * (mean - d_u) / torch.where(whole, 1, rest))
    scores.index_add_(0, torch.as_tensor(uniq, device=scores.device), contrib.T.to(scores.dtype))


class GroupAccumulator:
    """First-order effect of removing whole groups S at once, accumulated step by step.

    At a step whose batch B holds k members of S (with multiplicity), the batch gradient changes
    by Δg = −Σ_{z∈S∩B} G_z/|B| (keep) or (k·G_B − Σ_{z∈S∩B} G_z)/(|B| − k) (renormalize;
    −G_B if the whole batch is removed), and f by ⟨w, Δg⟩: computed from the same per-sample
    inner products d = ⟨w, G_i⟩ as the single-sample scores. Under ``keep`` the result is the
    sum of the members' scores; under ``renormalize`` it is not.
    """

    def __init__(self, groups: list[np.ndarray], n_train: int, q: int, convention: str) -> None:
        from scipy.sparse import csr_matrix

        rows = np.concatenate([np.asarray(g, dtype=np.int64) for g in groups])
        cols = np.concatenate([np.full(len(g), k) for k, g in enumerate(groups)])
        self.member = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_train, len(groups)))
        self.member.data[:] = 1.0  # a sample listed twice in a group is still removed once
        self.convention = convention
        self.values = torch.zeros(len(groups), q, dtype=torch.float64)

    def add(self, ids: np.ndarray, d: Tensor) -> None:
        """d (Q, B): ⟨w, G_i⟩ for the batch ``ids``."""
        rows = self.member[ids]  # (B, K) sparse
        if rows.nnz == 0:
            return
        hit = np.unique(rows.indices)
        R = torch.as_tensor(rows[:, hit].toarray(), dtype=torch.float64)  # (B, H)
        dd = d.to(torch.float64)
        summed = dd @ R  # (Q, H): Σ over members in the batch
        B = len(ids)
        if self.convention == "keep":
            contrib = -summed / B
        else:
            k = R.sum(0)  # (H,)
            rest = B - k
            mean = dd.mean(dim=1, keepdim=True)
            contrib = torch.where(rest > 0, (k * mean - summed) / rest.clamp(min=1), -mean)
        self.values[torch.as_tensor(hit)] += contrib.T


class Estimator:
    """Base class of all estimators; subclasses register by defining ``name``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_batch_ids: ClassVar[bool] = False
    needs_sgd: ClassVar[bool] = False
    supports_self: ClassVar[bool] = True
    linear_in_target: ClassVar[bool] = True
    """Scores are linear in the target's gradient ∇f, so the mean target's scores are the row mean
    of the pairwise matrix over the same examples (the tests check it for every estimator)."""
    registry: ClassVar[dict[str, type[Estimator]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            Estimator.registry[cls.name] = cls

    @classmethod
    def check(cls, run: Run, target_kind: str = "mean") -> None:
        """Raise :class:`UnsupportedMethodError` if the run (or target) is not supported."""
        if target_kind == "self" and not cls.supports_self:
            raise UnsupportedMethodError(f"method {cls.name!r} has no self-influence mode")
        if cls.needs_batch_ids and not run.has_batch_ids:
            raise UnsupportedMethodError(
                f"method {cls.name!r} needs the batch ids of every step, but this run recorded "
                "none. Pass ids to Recorder.step(ids, ...) when recording, or use "
                "'diffin-expected', 'diffin-closed-form' or 'tracin'."
            )
        if cls.needs_sgd and not run.optimizer.is_sgd:
            o = run.optimizer
            raise UnsupportedMethodError(
                f"method {cls.name!r} unrolls torch.optim.SGD steps (momentum and weight decay "
                f"included), but the run used {o.kind} (maximize={o.maximize}, uniform param "
                f"groups={o.uniform_groups}). Use 'tracin' for this run."
            )

    def score(self, ctx: ScoringContext) -> EstimatorOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def get_estimator(name: str) -> type[Estimator]:
    try:
        return Estimator.registry[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; available: {', '.join(sorted(Estimator.registry))}"
        ) from None


def available_methods() -> dict[str, str]:
    """Registered method names and one-line summaries."""
    return {n: c.summary for n, c in sorted(Estimator.registry.items())}
