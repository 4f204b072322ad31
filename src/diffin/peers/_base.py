"""What every peer adapter shares: the inputs, the result, the registry, timing and memory.

An adapter runs one method of a published package (captum, kronfluence, traker, dattri) on a
run recorded by :class:`diffin.Recorder` and converts its output to diffin's sign and units
(``docs/method.md §2``): ``score(z)`` ≈ f(θ_T without z) − f(θ_T), f the mean loss over the target
set, positive = z helped. Where a peer's numbers are not in loss units (TRAK, Grad-Dot) the
notes say so and only rank metrics are meaningful.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from .._errors import ConfigError, DataMismatchError, UnknownMethodError
from .._measure import Measure
from ..recording.run import Run, load_run

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class PeerResult:
    """One peer's scores in diffin's convention.

    ``scores``: (N,) float64, the predicted change of the target (mean loss over the target set)
    if each training sample were removed; positive = helpful. With ``pairwise=True``: (N, Q),
    column q the predicted change of target example q's own loss. ``seconds``: wall-clock time of
    the peer's own computation (model loading included). ``peak_rss_mb``: the largest resident
    set size of this process (MiB) seen while the peer ran (:class:`diffin._measure.Measure`,
    sampled every 20 ms; ``None`` where the platform gives no memory reading). ``notes``: the
    options used and the rescaling applied to the peer's raw output. ``options``: the options
    passed; ``warnings``: distinct warnings the peer raised.
    """

    name: str
    scores: np.ndarray
    seconds: float
    peak_rss_mb: float | None
    notes: str
    options: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class PeerInputs:
    """A recorded run plus everything a peer needs, with parameter values from the run only.

    Args:
        run: the recorded run.
        model_factory: returns a fresh module of the trained architecture (the run's dtype).
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses (reduction "none");
            training minimised their batch mean.
        train: ``(inputs, targets)`` of all N training samples, indexed by the recorded ids.
        target: ``(inputs, targets)`` of the Q target examples; f = their mean loss.
    """

    def __init__(
        self,
        run: Run,
        model_factory: Callable[[], nn.Module],
        loss_fn: LossFn,
        train: tuple[Tensor, Tensor],
        target: tuple[Tensor, Tensor],
    ) -> None:
        self.run = run
        self.model_factory = model_factory
        self.loss_fn = loss_fn
        self.train = _pair(train, "train")
        self.target = _pair(target, "target")
        self.n_train = int(self.train[0].shape[0])
        self.n_target = int(self.target[0].shape[0])
        run.check_ids(self.n_train)
        probe = model_factory()
        run.check_model(probe)
        self._state_keys = list(probe.state_dict())
        self.dtype = next(probe.parameters()).dtype
        if self.dtype != run.dtype:
            raise ConfigError(
                f"model_factory() built a {self.dtype} model but the run was recorded in "
                f"{run.dtype}; build the model in the run's dtype"
            )
        self.train = (_float_like(self.train[0], self.dtype), self.train[1])
        self.target = (_float_like(self.target[0], self.dtype), self.target[1])
        self.input_ndim = self.train[0].ndim

    # ------------------------------------------------------------------ checkpoints
    @property
    def final_step(self) -> int:
        return self.run.n_steps

    def segment_ends(self) -> list[tuple[int, float]]:
        """diffin's TracIn-CP convention: for each segment c_k < c_{k+1} between checkpoints,
        the closing checkpoint c_{k+1} and the learning-rate sum ``Σ_{t=c_k}^{c_{k+1}−1} η_t``."""
        return [(c1, float(np.sum(self.run.lrs[c0:c1]))) for c0, c1 in self.run.segments]

    def state_dict(self, step: int) -> dict[str, Tensor]:
        """Checkpoint ``step`` as a state dict of the model's keys (parameters and persistent
        buffers)."""
        ck = self.run.load_checkpoint(step)
        sd = {**ck.params, **ck.buffers}
        missing = [k for k in self._state_keys if k not in sd]
        if missing:
            raise DataMismatchError(
                f"checkpoint {step} of {self.run.path} lacks {missing[:5]}; pass a model_factory "
                "that builds the trained architecture"
            )
        return {k: sd[k] for k in self._state_keys}

    def load_into(self, model: nn.Module, step: int) -> nn.Module:
        """Load checkpoint ``step`` into ``model``; eval mode; parameters the run did not train
        get ``requires_grad=False``."""
        model.load_state_dict(self.state_dict(step), strict=True)
        trainable = set(self.run.trainable)
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        return model.eval()

    def model_at(self, step: int) -> nn.Module:
        """A fresh module holding checkpoint ``step``."""
        return self.load_into(self.model_factory(), step)

    # ------------------------------------------------------------------ losses
    def batched(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, bool]:
        """Add a batch dimension to a single sample (peers that vmap over samples hand the
        loss one unbatched sample); returns whether one was added."""
        if x.ndim == self.input_ndim - 1:
            return x.unsqueeze(0), y.unsqueeze(0), True
        return x, y, False

    def mean_loss(self, out: Tensor, y: Tensor) -> Tensor:
        """The batch-mean loss (the training objective)."""
        return self.loss_fn(out, y).mean()


class Peer:
    """Base class of the adapters; subclasses register by defining ``name``."""

    name: ClassVar[str] = ""
    package: ClassVar[str] = ""
    modules: ClassVar[tuple[str, ...]] = ()  # submodules imported before the timing starts
    summary: ClassVar[str] = ""
    units: ClassVar[str] = "loss"  # "loss" or "rank-only"
    registry: ClassVar[dict[str, type[Peer]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            Peer.registry[cls.name] = cls

    @classmethod
    def import_error(cls) -> str | None:
        """``None`` when the peer's package (and the submodules it uses) import, else the
        error text."""
        try:
            for mod in (cls.package, *cls.modules):
                importlib.import_module(mod)
        except Exception as e:  # any import-time failure makes the peer unavailable
            return f"{type(e).__name__}: {e}"
        return None

    def run(self, inp: PeerInputs, workdir: str, pairwise: bool = False,
            **options: Any) -> tuple[np.ndarray, str]:
        """Scores (N,) in diffin's sign and units, or (N, Q) per target example when
        ``pairwise``, and notes."""
        raise NotImplementedError  # pragma: no cover - abstract


def get_peer(name: str) -> type[Peer]:
    try:
        return Peer.registry[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown peer {name!r}; available: {', '.join(sorted(Peer.registry))}"
        ) from None


def take_options(options: dict[str, Any], defaults: dict[str, Any], peer: str) -> dict[str, Any]:
    """Merge ``options`` into ``defaults``; unknown keys raise :class:`ConfigError`."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"{peer}: unknown options {unknown}; known: {sorted(defaults)}")
    return {**defaults, **options}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default floating dtype (some peers allocate their score
    matrices with the default dtype)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def quiet(enabled: bool) -> Iterator[list[str]]:
    """Silence a peer's progress bars (stderr) and collect its warnings as text."""
    caught: list[str] = []
    if not enabled:
        yield caught
        return
    with warnings.catch_warnings(record=True) as rec, contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("always")
        try:
            yield caught
        finally:
            for w in rec:
                text = f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}"
                if text not in caught:
                    caught.append(text)


def run_peer(
    name: str,
    *,
    run: Run | str | os.PathLike[str],
    model_factory: Callable[[], nn.Module],
    loss_fn: LossFn,
    train: tuple[Tensor, Tensor],
    target: tuple[Tensor, Tensor],
    verbose: bool = False,
    pairwise: bool = False,
    **options: Any,
) -> PeerResult:
    """Run one peer method on a recorded run; scores in diffin's sign and units.

    Args:
        name: an adapter name (:func:`available_peers`).
        run: the recorded run (:func:`diffin.load_run`) or its folder.
        model_factory: returns a fresh module of the trained architecture in the run's dtype;
            its initial values are never used (every parameter comes from a checkpoint).
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses; training minimised
            their batch mean.
        train: ``(inputs, targets)`` of the N training samples, indexed by the recorded ids.
        target: ``(inputs, targets)``; the target f is their mean loss.
        verbose: let the peer print its progress bars and warnings (by default they are
            silenced and the warnings kept in ``PeerResult.warnings``).
        pairwise: return (N, Q) scores, column q for target example q's own loss, instead of
            the (N,) scores for their mean.
        options: the adapter's options (see ``docs/peers.md``); unknown ones raise.

    Returns:
        :class:`PeerResult` with ``scores`` (N,) ≈ f(θ_T without z) − f(θ_T) (positive =
        helpful; (N, Q) with ``pairwise``), the seconds and peak RSS of the peer's run, and
        notes on the conversion.
    """
    cls = get_peer(name)
    err = cls.import_error()
    if err is not None:
        raise ConfigError(f"peer {name!r} needs the package {cls.package!r}, which fails to import ({err})")
    run_obj = run if isinstance(run, Run) else load_run(run)
    inp = PeerInputs(run_obj, model_factory, loss_fn, train, target)
    with (
        tempfile.TemporaryDirectory(prefix=f"diffin-{name}-") as workdir,
        quiet(not verbose) as caught,
        Measure(every=0.02) as m,
    ):
        scores, notes = cls().run(inp, workdir, pairwise=pairwise, **options)
    scores = np.asarray(scores, dtype=np.float64)
    want = (inp.n_train, inp.n_target) if pairwise else (inp.n_train,)
    if scores.shape != want:
        raise DataMismatchError(f"{name} returned {scores.shape} scores, expected {want}")
    return PeerResult(name, scores, m.seconds, m.peak_mb_or_none, notes, dict(options), caught)


def _pair(data: Any, what: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise DataMismatchError(f"{what} must be an (inputs, targets) pair of tensors")
    x, y = (torch.as_tensor(t) for t in data)
    if x.shape[0] != y.shape[0]:
        raise DataMismatchError(f"{what}: {x.shape[0]} inputs but {y.shape[0]} targets")
    return x, y


def _float_like(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype) if x.is_floating_point() else x
