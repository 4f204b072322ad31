"""The estimator protocol, its registry, and the context every estimator scores in.

An estimator scores every training sample against a target:

    score(z) ≈ f(θ_T^{−z}) − f(θ_T)      (docs/method.md §2; positive = z helped)

Subclasses set ``name`` (registering themselves), declare what they need from the recording
(``needs_batch_ids``, ``needs_rule``) and implement :meth:`Estimator.score`. They may read the
run, the functional model, the data and the target through :class:`ScoringContext`, and nothing
else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from .._data import DataSource
from .._errors import (
    BatchLossUnsupportedError,
    UnknownMethodError,
    UnsupportedMethodError,
    UnsupportedOptimizerError,
)
from .._functional import FlatModel
from .._progress import progress_bar
from .._resume import NO_RESUME, SweepResume
from ..config import ScoreConfig
from ..recording.run import Run
from ..targets import MeanLoss, Target
from ..trajectory import Trajectory, check_rule

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger("diffin")
CHUNK_ACTIVATION_BYTES = 8 * 2**20
"""Activations one chunk of per-sample products may hold (:meth:`ScoringContext.product_chunk`)."""
MIN_CHUNK = 32
_PROBED: dict[tuple[Any, ...], tuple[str, str]] = {}
"""The HVP probe's answers (:meth:`ScoringContext._resolve_hvp`), by :meth:`ScoringContext._probe_key`."""


NON_SMOOTH = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.FractionalMaxPool2d,
)
"""Layers whose gradient jumps: finite-difference HVPs across them are unreliable."""


DENSE = (nn.Linear, nn.Bilinear, nn.Embedding, nn.LayerNorm)
"""Layers whose double backward costs about one more backward pass (matrix products, lookups,
normalisation over features): a model made only of them gets its exact HVP (one forward and two
backward passes) for less than central differences (two forward and two backward passes)."""


def exact_costs_less(fm: FlatModel, replay: bool) -> str:
    """Why exact HVPs cost a sweep less than central differences, or "" when they do not:

    * a replayed sweep keeps each step's gradient graph (``fm.keeps_graphs``): one backward pass of
      it per step, where the replay's gradient and central differences need 3 gradients;
    * a model whose parametrised layers are all :data:`DENSE`: measured on the speed MLP (tanh,
      ``diffin-frozen``, one thread) 4.4 s against 5.2 s; through convolutions the double backward
      costs more (a float64 CNN: 1.9 s against 0.8 s for 256 rows), so those keep differences."""
    if replay and fm.keeps_graphs:
        return ("replayed sweep: exact HVPs from each replayed step's own gradient graph "
                "(2 passes per step where finite differences need 3)")
    owners = [m for m in fm.model.modules() if next(m.parameters(recurse=False), None) is not None]
    if owners and all(isinstance(m, DENSE) for m in owners):
        return ("dense layers only: an exact HVP (a forward and two backward passes) costs less than "
                "central differences (two of each)")
    return ""


@dataclass
class EstimatorOutput:
    """Scores (N,) or (N, Q) in loss units, the variant actually run, and diagnostics."""

    scores: Tensor
    variant: str
    diagnostics: dict[str, Any] = field(default_factory=dict)
    group_scores: Tensor | None = None  # (K,) or (K, Q): whole-group removals, when supported


class ScoringContext:
    """What an estimator may touch: the run's trajectory (:class:`diffin.trajectory.Trajectory`:
    checkpoints, batches, steps, replay), the model as a function of θ, data, target, config,
    the HVP choice, progress bars, the removal groups, and ``resume``: the hook a sweep saves its
    state through at segment boundaries and restores it from (:class:`diffin._resume.SweepResume`:
    ``load()``, ``maybe_save(steps, state_fn)``; a no-op without an output folder)."""

    def __init__(
        self,
        run: Run,
        fm: FlatModel,
        train: DataSource,
        target: Target,
        config: ScoreConfig,
        progress: bool = True,
        groups: list[np.ndarray] | None = None,
        resume: SweepResume = NO_RESUME,
    ) -> None:
        self.run = run
        self.resume = resume
        self.groups = groups
        self.fm = fm
        self.train = train
        self.target = target
        self.config = config
        self.progress = progress
        self.n_train = len(train)
        self.trajectory = Trajectory(run, fm, train, memory_mb=config.replay_memory_mb)
        self._hvp_mode: str | None = None
        self.hvp_reason = ""
        self._chunk: int | None = None
        if isinstance(target, MeanLoss) and not fm.coupled:  # ∇f streamed in chunks of the same size
            target.batch_size = min(target.batch_size, self.product_chunk())
        self.prefer_exact = ""
        """Set by a sweep, before it asks for :attr:`hvp_mode`, to the reason exact HVPs cost it less
        than finite differences (:func:`exact_costs_less`); ``auto`` then picks them where they run."""

    def member_chunk(self) -> int:
        """Rows per chunk for passes over every training sample. For a batch-coupled loss a
        member's share depends on its batch mates: chunks are then consecutive ids in batches of
        the recorded training batch size (docs/method.md §4.7); otherwise :meth:`product_chunk`."""
        if self.fm.coupled:
            return int(self.run.batch_size_hint() or self.config.batch_size)
        return self.product_chunk()

    def product_chunk(self) -> int:
        """Rows per chunk of per-sample products (JVPs, gradients) over the training data:
        ``config.batch_size``, at most, and no more rows than hold :data:`CHUNK_ACTIVATION_BYTES`
        of activations (measured once on two rows, :meth:`FlatModel.activation_bytes`; at least
        :data:`MIN_CHUNK` rows). On a CPU a chunk whose activations outgrow the caches costs more per
        row (a float64 CNN of 8 channels on 28×28 inputs: 2.9 ms per row's JVP at 1,000 rows, 1.2 ms
        at 32) and its memory grows with it; an MLP's rows are small and keep large chunks. A
        batch-coupled loss keeps ``config.batch_size`` (its chunks are batches of the loss)."""
        cap = self.config.batch_size
        if self.fm.coupled:
            return cap
        if self._chunk is None:
            x, y = self.train.get(np.arange(min(self.n_train, 2)))
            per_row = self.fm.activation_bytes(x, y) / max(1, min(self.n_train, 2))
            self._chunk = int(max(MIN_CHUNK, CHUNK_ACTIVATION_BYTES // max(per_row, 1.0)))
        return max(1, min(cap, self._chunk))

    # ------------------------------------------------------------------ second order
    @property
    def hvp_mode(self) -> str:
        """The HVP mode estimators use: the config's, or for ``"auto"`` central differences
        unless the model is non-smooth (see :meth:`_resolve_hvp`)."""
        if self._hvp_mode is None:
            self._hvp_mode, self.hvp_reason = self._resolve_hvp()
        return self._hvp_mode

    @property
    def hvp_used(self) -> dict[str, str] | None:
        """``{"mode", "reason"}`` once an estimator asked for :attr:`hvp_mode`, else None (the
        estimator used no Hessian-vector products)."""
        if self._hvp_mode is None:
            return None
        return {"mode": self._hvp_mode, "reason": self.hvp_reason}

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
        if self.prefer_exact:
            theta = self.trajectory.theta(self.run.n_steps)
            x, y = self.train.get(np.arange(min(self.n_train, 2)))
            try:
                self.fm.hvp(theta, x, y, torch.ones_like(theta), mode="exact")
            except (RuntimeError, NotImplementedError) as e:  # an op without double backward
                log.info("exact HVP unavailable (%s): finite differences", type(e).__name__)
            else:
                return "exact", self.prefer_exact
        key = self._probe_key()
        if key is not None and key in _PROBED:
            return _PROBED[key]
        found = self._probe_hvp()
        if key is not None:
            if len(_PROBED) >= 32:
                _PROBED.pop(next(iter(_PROBED)))
            _PROBED[key] = found
        return found

    def _probe_key(self) -> tuple[Any, ...] | None:
        """What decides the HVP probe's answer (run, training data, architecture, dtype, ε, seed);
        None when the data cannot be identified without reading it (:func:`data_identity`)."""
        ident = self.train._identity
        if ident is None:
            return None
        spec = self.fm.spec
        return (self.run.fingerprint, ident, repr(self.fm.model), tuple(spec.names), tuple(spec.shapes),
                str(self.fm.dtype), str(self.fm.device), self.config.fd_eps, self.config.seed)

    def _probe_hvp(self) -> tuple[str, str]:
        """Central differences against the exact HVP on up to 256 training rows at θ_T."""
        cfg = self.config
        theta = self.trajectory.theta(self.run.n_steps)
        ids = np.arange(min(self.n_train, 256))
        x, y = self.train.get(ids)
        g = torch.Generator().manual_seed(cfg.seed)
        v = torch.randn(theta.numel(), generator=g, dtype=torch.float64).to(device=theta.device, dtype=theta.dtype)
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
    if convention == "keep":  # −k·d_z/|B| for a sample appearing k times: each occurrence adds its own −d_i/|B|
        scores.index_add_(0, torch.as_tensor(ids, device=scores.device), (-d / B).T.to(scores.dtype))
        return
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    d_u = d[:, torch.as_tensor(first)]  # (Q, U)
    k = torch.as_tensor(counts, dtype=d.dtype, device=d.device)
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
        dd = d.to("cpu", torch.float64)
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
    needs_rule: ClassVar[bool] = False
    """The estimator follows the optimizer's steps (docs/method.md §4.3): the run's optimizer needs
    a rule in :mod:`diffin.trajectory.optim` (SGD, Adam, AdamW)."""
    follows_recorded_order: ClassVar[bool] = False
    """The estimator credits each sample at the steps the recorded batch order put it in, so it
    answers ``predicts="replay"`` only (refused with ``predicts="retrain"``)."""
    supports_self: ClassVar[bool] = True
    supports_batch_loss: ClassVar[bool] = False
    """The estimator scores batch-coupled losses (``diffin.batch_loss``, docs/method.md §4.7) with
    their exact per-member term; the others refuse them by name."""
    loss_units: ClassVar[bool] = True
    """Scores are in the target's loss units (docs/method.md §2); False for ranking-only scores
    (a cosine), whose size the trust measures do not compare with the target's."""
    linear_in_target: ClassVar[bool] = True
    """Scores are linear in the target's gradient ∇f, so the mean target's scores are the row mean
    of the pairwise matrix over the same examples (the tests check it for every estimator)."""
    registry: ClassVar[dict[str, type[Estimator]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            Estimator.registry[cls.name] = cls

    @classmethod
    def check(cls, run: Run, target_kind: str = "mean", predicts: str = "replay", coupled: bool = False) -> None:
        """Raise :class:`UnsupportedMethodError` if the run, the target or the question
        (``predicts``) is not supported; ``coupled``: the loss (or the model's batch statistics)
        couples each batch (:class:`BatchLossUnsupportedError` unless the estimator supports it)."""
        if coupled:
            check_coupled(cls.name, cls.supports_batch_loss, target_kind, predicts)
        if predicts == "retrain" and cls.follows_recorded_order:
            raise UnsupportedMethodError(
                f"method {cls.name!r} follows the recorded batch order, so it predicts a replay of this "
                "run, not a fresh retraining; with predicts='retrain' use 'diffin' (which then runs "
                "'diffin-retrain'), 'diffin-expected', 'tracin' or an influence function"
            )
        if target_kind == "self" and not cls.supports_self:
            raise UnsupportedMethodError(f"method {cls.name!r} has no self-influence mode")
        if cls.needs_batch_ids and not run.has_batch_ids:
            raise UnsupportedMethodError(
                f"method {cls.name!r} needs the batch ids of every step, but this run recorded "
                "none. Pass ids to Recorder.step(ids, ...) when recording, or use "
                "'diffin-expected', 'diffin-closed-form' or 'tracin'."
            )
        if cls.needs_rule:
            try:
                check_rule(run)
            except UnsupportedOptimizerError as e:
                raise UnsupportedMethodError(
                    f"method {cls.name!r} follows the optimizer's steps, which it cannot for this run: {e}"
                ) from None

    def score(self, ctx: ScoringContext) -> EstimatorOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def check_coupled(name: str, supported: bool, target_kind: str = "mean", predicts: str = "replay") -> None:
    """Refuse, by name, what a batch-coupled loss cannot be scored with (docs/method.md §4.7)."""
    if not supported:
        ok = sorted(n for n, c in Estimator.registry.items() if c.supports_batch_loss)
        raise BatchLossUnsupportedError(
            f"method {name!r} cannot score a loss that couples its batch (diffin.batch_loss, or train-mode "
            f"batch statistics): its per-sample terms assume each sample's loss is its own. Use one of {ok}"
        )
    if target_kind == "pairwise":
        raise BatchLossUnsupportedError(
            "a batch-coupled loss has no loss of one target example on its own, so pairwise targets are not "
            "defined for it; pass target=(inputs, targets) (the loss of the whole target set as one batch) or "
            "target='self' (each sample's share within its chunk of the recorded batch size)"
        )
    if predicts != "replay":
        raise BatchLossUnsupportedError(
            "predicts='retrain' draws fresh proxy batches, which for a batch-coupled loss changes every "
            "member's loss; score a batch-coupled run with predicts='replay' (the recorded batches)"
        )


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
