"""The functional core: a model seen as a function of one flat parameter vector θ ∈ R^P.

Everything an estimator needs is here, built on ``torch.func`` and autograd:

* per-sample losses ``l_i(θ)``                          shape (B,)
* the batch gradient ``∇L_B(θ) = mean_i ∇l_i(θ)``       shape (P,)
* per-sample inner products ``⟨v, ∇l_i(θ)⟩``            shape (B,) or (Q, B) for Q vectors
  as one forward-mode JVP of the per-sample losses (no (B, P) matrix is formed)
* Hessian–vector products ``H_B(θ) v``                  shape (P,) or (Q, P)
  by central or forward finite differences of first-order gradients, or exactly by double
  backward, which gives the batch's inner products ⟨v, ∇l_i(θ)⟩ from the same pass
* mixed second directional derivatives ``aᵀ ∇²l_i(θ) b`` shape (B,) or (Q, B)
  (exactly by triple backward, or by differences of JVPs)

Estimators compose these; they never re-derive them. Losses are in the loss function's units;
gradients in loss units per parameter unit; an HVP in loss units per parameter unit squared.
"""

# Long file: FlatModel is the functional core every estimator composes (losses, gradients, JVPs, HVPs
# and mixed second derivatives of one flat θ); its methods share one set of conventions for θ, buffers,
# running statistics and batch-coupled losses, and are read together.

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

from ._errors import ConfigError, LossShapeError
from ._tree import Inputs, batch_len, call_model, tree_map

if TYPE_CHECKING:
    from ._train_mode import TrainModeForward

LossFn = Callable[[Tensor, Tensor], Tensor]
HvpMode = Literal["central", "forward", "exact"]
DotsMode = Literal["auto", "jvp", "fd"]

HVP_MODES: tuple[str, ...] = ("central", "forward", "exact")
DOTS_MODES: tuple[str, ...] = ("auto", "jvp", "fd")
HVP_BLOCK = 64
"""Vectors per batched double-backward pass of the exact HVP (bounds its memory: each holds the
backward pass's intermediate values once per vector)."""


def fd_epsilon(theta: Tensor, mode: HvpMode, override: float | None = None) -> float:
    """Finite-difference step ε for a perturbation ``θ ± ε v̂`` along a unit vector v̂.

    Chosen relative to the parameter norm and the dtype's machine epsilon u: truncation error
    is O(ε²) (central) or O(ε) (forward) and rounding error O(u/ε), balanced at
    ε ≈ u^{1/3} (central) or u^{1/2} (forward), scaled by ``max(1, ‖θ‖)``.
    ``override`` (if given) is used as is.
    """
    if override is not None:
        if not override > 0:
            raise ConfigError(f"fd_eps must be positive, got {override}")
        return float(override)
    u = torch.finfo(theta.dtype).eps
    base = u ** (1.0 / 3.0) if mode == "central" else u ** 0.5
    return base * max(1.0, float(theta.norm()))


class BatchLoss:
    """A batch-coupled training loss (docs/method.md §4.7): ``fn(outputs, targets, weights) -> scalar``.

    ``weights`` (B,) holds one weight per batch member in the model's dtype: ones give the loss the
    training loop minimised; weight 0 removes that member, however ``fn`` defines it (for a
    contrastive loss: from the positives and from every softmax denominator). Made by
    :func:`diffin.batch_loss`; pass it wherever a per-sample loss goes.
    """

    def __init__(self, fn: Callable[[Any, Any, Tensor], Tensor]) -> None:
        if isinstance(fn, BatchLoss):
            fn = fn.fn
        if not callable(fn):
            raise ConfigError("diffin.batch_loss(fn) needs a callable fn(outputs, targets, weights) -> scalar")
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)
        self.__module__ = getattr(fn, "__module__", __name__)

    def __call__(self, outputs: Any, targets: Any, weights: Tensor) -> Tensor:
        return self.fn(outputs, targets, weights)

    def __repr__(self) -> str:
        return f"diffin.batch_loss({self.__qualname__})"


def batch_loss(fn: Callable[[Any, Any, Tensor], Tensor]) -> BatchLoss:
    """Wrap ``fn(outputs, targets, weights) -> scalar``, a batch's training loss with one weight per
    batch member (ones: the loss the loop minimised; 0: the member removed), for every diffin
    function that takes a loss (docs/method.md §4.7)::

        def clip_loss(out, _, w):              # symmetric InfoNCE with member weights
            ...
        diffin.influence(run, model, diffin.batch_loss(clip_loss), train=..., target=(Xv, Yv))

    The target of an ``(inputs, targets)`` pair is ``fn`` over the whole target set as one batch
    with weights of ones. A per-sample loss ``l`` wrapped as ``sum(w * l) / len(w)`` scores exactly
    as ``l`` itself.
    """
    return BatchLoss(fn)


def check_convention(convention: str, coupled: bool) -> None:
    """A batch loss defines removal itself (weight 0, as its ``fn`` says): only ``keep`` applies."""
    if coupled and convention != "keep":
        raise ConfigError(
            f"convention={convention!r} with a batch-coupled loss: the loss defines what weight 0 means, so use "
            "convention='keep' and divide by weights.sum() inside fn if removal should renormalise"
        )


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and offsets of the trainable parameters inside θ."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.numels)


class FlatModel:
    """A module and a loss as pure functions of a flat parameter vector.

    Args:
        model: gives the architecture only; parameter values always come from the θ passed in
            (and buffers / frozen parameters from :meth:`set_constants`). It is used in eval
            mode: dropout and batch-norm statistics are treated as fixed.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses (reduction "none"), or a
            :class:`BatchLoss` (``fn(outputs, targets, weights) -> scalar``, batch-coupled).
        trainable: names of the parameters that make up θ, in order. Default: all parameters
            with ``requires_grad``.

    Every batch is seen through one function, the batch's training loss with one weight per
    member, L_B(θ; ω) (:meth:`batch_loss`; ω = 1 is the loss the loop minimised). For a
    per-sample loss it is Σ_i ω_i·l_i(θ)/|B|. Each member's **share** ℓ_i = |B|·∂L_B/∂ω_i at ω = 1
    (:meth:`losses`) is then l_i itself for a per-sample loss, and for a batch-coupled loss the
    quantity whose gradient is the member's contribution to the batch gradient: removing z under
    ``keep`` changes the batch gradient by Δg_z = −∇ℓ_z/|B| to first order (docs/method.md §4.7).
    Inputs may be a tensor, a tuple/list or a dict of tensors (:func:`diffin._tree.call_model`).
    """

    keeps_graphs = True
    """Whether a replay may keep this model's gradient graphs (:meth:`grad_graph`) for the sweep."""
    _eps_cache: tuple[Any, Any, float] | None = None  # (key, weak θ, ε) of :meth:`_fd_step`

    def __init__(self, model: nn.Module, loss_fn: LossFn | BatchLoss, trainable: Sequence[str] | None = None):
        self.model = model
        self.loss_fn = loss_fn
        self.coupled = isinstance(loss_fn, BatchLoss)
        named = dict(model.named_parameters())
        if trainable is None:
            trainable = [n for n, p in named.items() if p.requires_grad]
        self.spec = ParamSpec(tuple(trainable), tuple(tuple(named[n].shape) for n in trainable))
        first = named[trainable[0]] if trainable else next(iter(named.values()))
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self._numels = list(self.spec.numels)
        # constants: frozen parameters and buffers, replaced per checkpoint
        self._constants: dict[str, Tensor] = {
            n: p.detach() for n, p in named.items() if n not in set(trainable)
        }
        self._constants.update({n: b for n, b in model.named_buffers()})
        # training-mode layers (docs/method.md §4.8): set by enable_train_mode, active inside step()
        self.train_forward: TrainModeForward | None = None
        self.stat_names: tuple[str, ...] = ()
        self._sample_vmap_fails = False  # the forward cannot be vmapped over samples: per_sample_grads by jacrev
        self._step: _Step | None = None

    # ------------------------------------------------------------------ training-mode layers
    def enable_train_mode(self, tmf: TrainModeForward) -> None:
        """Replay training steps in the recorded modes (docs/method.md §4.8): inside :meth:`step`
        the model runs as :class:`diffin._train_mode.TrainModeForward` (weighted batch statistics,
        fixed dropout masks); outside it, in eval mode (targets). Train-mode batch statistics couple
        each training batch (:attr:`coupled_steps`); targets in eval mode stay per sample."""
        self.train_forward = tmf
        self.stat_names = tuple(n for n in tmf.buffer_names if not n.endswith("num_batches_tracked"))

    @property
    def coupled_steps(self) -> bool:
        """Whether a training step's members are coupled: a batch loss, or BatchNorm that trained
        on batch statistics (members' shares then come from ∂L_B/∂ω, docs/method.md §4.7-§4.8)."""
        return self.coupled or bool(self.train_forward is not None and self.train_forward.norm_names)

    @property
    def num_stats(self) -> int:
        """R, the length of the flat running statistics (0 without train-mode BatchNorm)."""
        return sum(self._constants[n].numel() for n in self.stat_names)

    def flat_stats(self, buffers: Mapping[str, Tensor]) -> Tensor:
        """The running statistics of :attr:`stat_names` as one vector (R,) in θ's dtype."""
        if not self.stat_names:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        return torch.cat([buffers[n].reshape(-1) for n in self.stat_names]).to(device=self.device, dtype=self.dtype)

    def unflat_stats(self, r: Tensor) -> dict[str, Tensor]:
        """(R,) → {running-stat name: tensor of the buffer's shape and dtype}."""
        sizes = [self._constants[n].numel() for n in self.stat_names]
        return {n: part.view(self._constants[n].shape).to(self._constants[n].dtype)
                for n, part in zip(self.stat_names, torch.split(r, sizes))}

    @contextlib.contextmanager
    def step(self, masks: Mapping[str, Tensor] | None, buffers: Mapping[str, Tensor] | None) -> Iterator[None]:
        """Within: forwards run as training step t did (``masks``: its dropout masks; ``buffers``:
        the running statistics before it, e.g. num_batches_tracked for momentum=None). A no-op
        without :meth:`enable_train_mode`."""
        if self.train_forward is None:
            yield
            return
        saved, self._step = self._step, _Step(dict(masks or {}), dict(buffers or {}))
        try:
            yield
        finally:
            self._step = saved

    @property
    def members_coupled(self) -> bool:
        """Whether the batch being evaluated now couples its members, so that their shares come from
        ∂L_B/∂ω (a batch loss always; train-mode batch statistics inside :meth:`step`)."""
        return self.coupled or (self.stepping and self.coupled_steps)

    @property
    def stepping(self) -> bool:
        """True inside :meth:`step` of a model with training-mode layers."""
        return self._step is not None

    # ------------------------------------------------------------------ layout
    @property
    def num_params(self) -> int:
        """P, the length of θ."""
        return self.spec.size

    def set_constants(self, constants: Mapping[str, Tensor]) -> None:
        """Replace buffers / frozen parameters (e.g. from a checkpoint)."""
        for k, v in constants.items():
            self._constants[k] = v.to(self.device)

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """θ (P,) → {name: tensor of the parameter's shape} (views, no copy)."""
        parts = torch.split(theta, self._numels)
        out = {n: t.view(s) for n, t, s in zip(self.spec.names, parts, self.spec.shapes)}
        out.update(self._constants)
        return out

    def flatten(self, named: Mapping[str, Tensor]) -> Tensor:
        """{name: tensor} → θ (P,) in this model's dtype and device."""
        return torch.cat([named[n].reshape(-1) for n in self.spec.names]).to(
            device=self.device, dtype=self.dtype
        )

    def theta_from_model(self) -> Tensor:
        """The model object's current parameters as θ (used only by tests and the trainer)."""
        named = dict(self.model.named_parameters())
        return self.flatten({n: named[n].detach() for n in self.spec.names})

    # ------------------------------------------------------------------ losses
    def forward(self, theta: Tensor, x: Inputs, weights: Tensor | None = None, stats: Tensor | None = None) -> Any:
        """The model's outputs at θ on a batch: in eval mode, or inside :meth:`step` as the
        training step ran (``weights`` (B,): the members' weights in the batch statistics).
        ``stats`` (R,): running statistics to use instead of the installed ones (eval mode reads
        them; :meth:`step_loss` returns their update)."""
        return self._forward(theta, x, weights, stats)[0]

    def _forward(self, theta: Tensor, x: Inputs, weights: Tensor | None, stats: Tensor | None
                 ) -> tuple[Any, dict[str, Tensor]]:
        params = self.unflatten(theta)
        if self._step is not None:
            params.update(self._step.buffers)
        if stats is not None:
            params.update(self.unflat_stats(stats))
        if self.train_forward is None:
            return call_model(self.model, params, x), {}
        if self._step is None:  # eval mode whatever mode the module object is in
            tmf = self.train_forward
            every = tuple(n for n, _ in self.model.named_modules())  # attention layers read their own .training
            with _differentiable_eval_norms(self.model, tmf.norm_names if stats is not None else (), every):
                return call_model(self.model, params, x), {}
        return self.train_forward(params, x, weights, self._step.masks)

    def step_loss(self, theta: Tensor, stats: Tensor | None, x: Inputs, y: Any, weights: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Inside :meth:`step`: L_B(θ; ω) and the running statistics after the step, (R,) and as
        buffers (num_batches_tracked included) — pure, for autograd and ``torch.func``."""
        B = batch_len(x)
        if weights is None:
            weights = torch.ones(B, dtype=self.dtype, device=self.device)
        out, new = self._forward(theta, x, weights, stats)
        r = self.flat_stats(new) if self.stat_names and new else torch.zeros(0, dtype=self.dtype, device=self.device)
        return self._loss_of(out, y, weights, B), r, new

    def batch_loss(self, theta: Tensor, x: Inputs, y: Any, weights: Tensor | None = None,
                   stats: Tensor | None = None) -> Tensor:
        """L_B(θ; ω), a scalar in loss units: Σ_i ω_i·l_i/|B| for a per-sample loss, ``fn(outputs,
        y, ω)`` for a :class:`BatchLoss`; ``weights`` ω (B,), default ones."""
        B = batch_len(x)
        if weights is None:
            weights = torch.ones(B, dtype=self.dtype, device=self.device)
        return self._loss_of(self.forward(theta, x, weights, stats), y, weights, B)

    def _loss_of(self, out: Any, y: Any, weights: Tensor, B: int) -> Tensor:
        if self.coupled:
            L = self.loss_fn(out, y, weights)
            if not isinstance(L, Tensor) or L.numel() != 1:
                raise LossShapeError(
                    f"the batch loss {self.loss_fn!r} returned {_shape_of(L)} for a batch of {B}; it must "
                    "return one scalar, the batch's training loss (e.g. the mean over the batch)"
                )
            return L.reshape(())
        return (self._per_sample(out, y, B) * weights).sum() / B

    def _per_sample(self, out: Any, y: Any, B: int) -> Tensor:
        losses = self.loss_fn(out, y)
        if not isinstance(losses, Tensor) or losses.ndim != 1 or losses.shape[0] != B:
            raise LossShapeError(
                f"loss_fn returned shape {_shape_of(losses)} for a batch of {B} "
                "samples; it must return one loss per sample (use reduction='none', and average "
                "any extra dimensions yourself, e.g. ((out - y) ** 2).mean(dim=1)); for a loss that "
                "couples the batch (contrastive), wrap fn(outputs, targets, weights) -> scalar with "
                "diffin.batch_loss"
            )
        return losses

    def losses(self, theta: Tensor, x: Inputs, y: Any) -> Tensor:
        """The members' shares ℓ_i = |B|·∂L_B/∂ω_i at ω = 1, shape (B,): per-sample losses l_i(θ)
        for a per-sample loss; for a batch loss one gradient in ω (composes with ``torch.func``)."""
        B = batch_len(x)
        if not self.members_coupled:
            return self._per_sample(self.forward(theta, x), y, B)
        ones = torch.ones(B, dtype=self.dtype, device=self.device)
        return B * torch.func.grad(lambda w: self.batch_loss(theta, x, y, w))(ones)

    def activation_bytes(self, x: Inputs, y: Any) -> int:
        """Bytes of the activations a backward pass through the per-sample losses of the rows
        (x, y) saves (distinct storages, θ and the model's constants excluded): with a few rows,
        the per-row activation memory that sizes chunks of per-sample products."""
        theta = self.theta_from_model()
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            _, total = graph_bytes(lambda: self.losses(th, x, y), skip=[th, *self._constants.values()])
        return total

    def loss_grad(self, theta: Tensor, x: Inputs, y: Any) -> tuple[Tensor, Tensor]:
        """Batch gradient ∇L_B(θ) (P,) of the batch's training loss, and the shares (B,) (for a
        batch loss from the same backward pass, through ω)."""
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            if not self.members_coupled:
                losses = self.losses(th, x, y)
                (g,) = torch.autograd.grad(losses.mean(), th)
                return g, losses.detach()
            B = batch_len(x)
            w = torch.ones(B, dtype=self.dtype, device=self.device, requires_grad=True)
            g, dw = torch.autograd.grad(self.batch_loss(th, x, y, w), (th, w), allow_unused=True)
            g = torch.zeros_like(theta) if g is None else g
            dw = torch.zeros_like(w) if dw is None else dw
        return g, B * dw.detach()

    def loss_grad_many(self, thetas: Tensor, x: Inputs, y: Any) -> tuple[Tensor, Tensor]:
        """Batch gradients at Q parameter vectors (Q, P) → grads (Q, P), losses (Q, B).

        A loop of autograd calls: on CPU this beats ``vmap`` over parameter copies, which turns
        every matmul into a batched one. Q counts parameter vectors, never samples.
        """
        gs, ls = zip(*(self.loss_grad(th, x, y) for th in thetas))
        return torch.stack(gs), torch.stack(ls)

    # ------------------------------------------------------------------ first order
    def dots(self, theta: Tensor, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Per-sample ⟨v, ∇l_i(θ)⟩ by forward-mode JVP: v (P,) → (B,), v (Q, P) → (Q, B)."""

        def one(vec: Tensor) -> Tensor:
            return jvp(lambda th: self.losses(th, x, y), (theta,), (vec,))[1]

        return one(v) if v.ndim == 1 else vmap(one)(v)

    def dots_many(self, thetas: Tensor, x: Tensor, y: Tensor, V: Tensor) -> Tensor:
        """⟨v_k, ∇l_i(θ_k)⟩ for K pairs (θ_k, v_k): thetas, V (K, P) → (K, B).

        One vmapped forward-mode pass over the K (θ_k, v_k) pairs. On the 2-core CPU it costs
        about the same as K separate JVPs (K = 2, 4,500 MNIST samples, MLP 784-128-10: 40 ms
        against 2 × 20 ms); it saves the Python loop and lets batched matmuls help elsewhere.
        """

        def one(th: Tensor, vec: Tensor) -> Tensor:
            return jvp(lambda t: self.losses(t, x, y), (th,), (vec,))[1]

        return vmap(one)(thetas, V)

    def per_sample_grads(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample gradients (B, P): ∇l_i, or for a batch loss the gradients of the shares
        ∇ℓ_i within the batch given. Memory B·P: callers pass small chunks."""
        if self.members_coupled:
            return torch.func.jacrev(lambda th: self.losses(th, x, y))(theta)

        def single(th: Tensor, xi: Inputs, yi: Any) -> Tensor:
            return self.losses(th, tree_map(_unsqueeze, xi), tree_map(_unsqueeze, yi))[0]

        if not self._sample_vmap_fails:
            try:
                return vmap(torch.func.grad(single), in_dims=(None, 0, 0))(theta, x, y)
            except RuntimeError as e:  # Python control flow on the inputs (e.g. `if mask.all():`)
                if "vmap" not in str(e) and "data-dependent" not in str(e):
                    raise
                self._sample_vmap_fails = True
        # the model runs once on the batch; the Jacobian's rows come from vmapped backward passes
        return torch.func.jacrev(lambda th: self.losses(th, x, y))(theta)

    # ------------------------------------------------------------------ second order
    def hvp(
        self,
        theta: Tensor,
        x: Tensor,
        y: Tensor,
        v: Tensor,
        mode: HvpMode = "central",
        eps: float | None = None,
    ) -> Tensor:
        """H_B(θ) v for the mean loss on (x, y): v (P,) → (P,), v (Q, P) → (Q, P)."""
        return self.hvp_and_dots(theta, x, y, v, mode=mode, eps=eps, dots="jvp", want_dots=False)[0]

    def hvp_and_dots(
        self,
        theta: Tensor,
        x: Tensor,
        y: Tensor,
        v: Tensor,
        mode: HvpMode = "central",
        eps: float | None = None,
        dots: DotsMode = "auto",
        want_dots: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """H_B(θ) v and the per-sample ⟨v, ∇l_i(θ)⟩ together.

        With finite differences the per-sample losses at θ ± ε v̂ come free with the gradients
        there, so ``dots="fd"`` (the default for ``mode="central"``) gets the inner products as
        ``(l_i(θ+εv̂) − l_i(θ−εv̂)) / 2ε · ‖v‖`` at no extra pass. ``dots="jvp"`` computes them
        exactly with one forward-mode pass. With ``mode="exact"`` the inner products are exact
        whatever ``dots`` says: they come from the HVP's own backward pass
        (:meth:`_exact_hvp_and_dots`).

        Shapes: v (P,) → (P,), (B,); v (Q, P) → (Q, P), (Q, B).
        """
        if mode not in HVP_MODES:
            raise ConfigError(f"unknown hvp mode {mode!r}; choose one of {HVP_MODES}")
        if dots not in DOTS_MODES:
            raise ConfigError(f"unknown dots mode {dots!r}; choose one of {DOTS_MODES}")
        single = v.ndim == 1
        V = v.unsqueeze(0) if single else v
        if dots == "auto":
            dots = "fd" if mode == "central" else "jvp"
        if mode == "exact":
            hv, d = self._exact_hvp_and_dots(theta, x, y, V, want_dots)
        else:
            norms = V.norm(dim=1, keepdim=True)  # (Q, 1)
            safe = torch.where(norms > 0, norms, torch.ones_like(norms))
            e = self._fd_step(theta, mode, eps)
            step = V * (e / safe)  # ε·v̂, one pass over (Q, P)
            g_plus, l_plus = self.loss_grad_many(theta + step, x, y)
            if mode == "central":
                g_minus, l_minus = self.loss_grad_many(theta - step, x, y)
                hv = (g_plus - g_minus) * (norms / (2 * e))
                d_fd = (l_plus - l_minus) * (norms / (2 * e))
            else:
                g0, l0 = self.loss_grad(theta, x, y)
                hv = (g_plus - g0) * (norms / e)
                d_fd = (l_plus - l0) * (norms / e)
            zero = (norms == 0).squeeze(1)
            if zero.any():
                hv[zero] = 0
                d_fd[zero] = 0
            if not want_dots:
                d = None
            elif dots == "fd":
                d = d_fd
            else:
                d = self.dots(theta, x, y, V)
        if single:
            return hv[0], (None if d is None else d[0])
        return hv, d

    def _fd_step(self, theta: Tensor, mode: HvpMode, eps: float | None) -> float:
        """:func:`fd_epsilon` of θ, computed once per θ (a sweep asks at every step of a segment
        with the same frozen θ; ‖θ‖ is a pass over P)."""
        if eps is not None:
            return fd_epsilon(theta, mode, eps)
        key = (id(theta), theta._version, mode)
        hit = self._eps_cache
        if hit is not None and hit[0] == key and hit[1]() is theta:
            return hit[2]
        e = fd_epsilon(theta, mode)
        self._eps_cache = (key, weakref.ref(theta), e)
        return e

    def _exact_hvp_and_dots(
        self, theta: Tensor, x: Tensor, y: Tensor, V: Tensor, want_dots: bool
    ) -> tuple[Tensor, Tensor | None]:
        """H_B(θ) v and the per-sample ⟨v, ∇l_i(θ)⟩ by double backward: V (Q, P) → (Q, P), (Q, B).

        One forward pass and one backward pass that keeps its graph, with the members' weights ω
        as an input (ω = 1): g(θ, ω) = ∇_θ L_B(θ; ω) = ∇L_B(θ). Then one more backward pass per
        vector v differentiates ⟨g, v⟩ with respect to both inputs: ∂/∂θ = H_B(θ) v, and
        |B|·∂/∂ω_i = ⟨v, ∇ℓ_i(θ)⟩ (= ⟨v, ∇l_i(θ)⟩ for a per-sample loss) — the inner products come
        out of the same pass as the HVP, at the cost of a (B,) vector. For a batch-coupled loss this
        is the step's VJP in (θ, ω) of docs/method.md §4.7.

        Measured on a batch of 128 of the speed setup with ReLU (MLP 784-128-10, float32, one
        thread, CPU time per vector): 1.9 ms, against 3.7 ms for the double-backward HVP
        followed by a separate forward-mode pass for the inner products, 3.7 ms for one
        forward-over-reverse pass (``torch.func.jvp`` of ``torch.func.grad`` with the losses as
        auxiliary output, whose tangents are H_B v and the inner products), 2.2 ms for central
        differences with their free inner products, and 0.9 ms for one batch gradient. (Plain
        autograd rather than ``torch.func``: no one-time transform set-up either.)
        """
        return self.graph_hvp_and_dots(self.grad_graph(theta, x, y, want_dots), V)

    def grad_graph(self, theta: Tensor, x: Inputs, y: Any, want_dots: bool = True) -> GradGraph:
        """The batch gradient g = ∇_θ L_B(θ; ω) at ω = 1 with its graph kept (one forward and one
        backward pass with ``create_graph``): the first half of :meth:`_exact_hvp_and_dots`. A
        replay that steps with ``g`` (:attr:`GradGraph.g`) leaves the sweep only the second half,
        :meth:`graph_hvp_and_dots`, for the same step (docs/method.md §4.1: 2 passes per step, not 3)."""
        B = batch_len(x)
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            u = torch.ones(B, dtype=self.dtype, device=self.device, requires_grad=want_dots)
            (g,) = torch.autograd.grad(self.batch_loss(th, x, y, u), th, create_graph=True)
        return GradGraph(th, u, g, B, want_dots)

    def graph_hvp_and_dots(self, gg: GradGraph, V: Tensor) -> tuple[Tensor, Tensor | None]:
        """H_B(θ) v and |B|·∂⟨g, v⟩/∂ω_i = ⟨v, ∇ℓ_i(θ)⟩ for each row v of V (Q, P) by one backward
        pass of the kept graph ``gg`` (:meth:`grad_graph`) per row: (Q, P), (Q, B). The last row
        frees the graph."""
        theta, u, g = gg.theta, gg.u, gg.g
        inputs = (theta, u) if gg.want_dots else (theta,)
        if len(V) > 1 and g.requires_grad:
            with torch.enable_grad():
                batched = self._batched_double_backward(g, inputs, V, u, gg.B, gg.want_dots)
            if batched is not None:
                return batched
        hv, dots = [], []
        with torch.enable_grad():
            for i, v in enumerate(V):
                if g.requires_grad:
                    parts = torch.autograd.grad(g, inputs, grad_outputs=v, retain_graph=i < len(V) - 1,
                                                allow_unused=True)
                else:  # the loss is linear in θ and the weights are constants: H_B = 0
                    parts = (None,) * len(inputs)
                hv.append(torch.zeros_like(theta) if parts[0] is None else parts[0])
                if gg.want_dots:
                    dots.append(torch.zeros_like(u) if parts[1] is None else gg.B * parts[1])
        return torch.stack(hv).detach(), (torch.stack(dots).detach() if gg.want_dots else None)

    @staticmethod
    def _batched_double_backward(
        g: Tensor, inputs: tuple[Tensor, ...], V: Tensor, u: Tensor, B: int, want_dots: bool
    ) -> tuple[Tensor, Tensor | None] | None:
        """The second backward pass of :meth:`graph_hvp_and_dots` for several vectors at once
        (``is_grads_batched``: vmapped over rows of V, in blocks of :data:`HVP_BLOCK`; the last block
        frees the graph), bit-identical to the loop; None (the graph intact) when an op has no
        batching rule. Measured (one thread, batch 32, 256 vectors, CPU time per vector): MLP
        784-32-10 float64 0.78 ms against 1.35 ms looped; 784-512-10 float32 8.4–9.8 ms against
        15–19 ms."""
        hv, dots = [], []
        for s in range(0, len(V), HVP_BLOCK):
            block = V[s: s + HVP_BLOCK]
            try:
                parts = torch.autograd.grad(g, inputs, grad_outputs=block, retain_graph=s + HVP_BLOCK < len(V),
                                            allow_unused=True, is_grads_batched=True)
            except RuntimeError:
                if s == 0:  # nothing consumed yet: the caller loops one vector at a time
                    return None
                raise
            hv.append(torch.zeros_like(block) if parts[0] is None else parts[0])
            if want_dots:
                dots.append(torch.zeros(len(block), B, dtype=u.dtype, device=u.device) if parts[1] is None
                            else B * parts[1])
        return torch.cat(hv).detach(), (torch.cat(dots).detach() if want_dots else None)

    def step_vjp(
        self, theta: Tensor, stats: Tensor, x: Inputs, y: Any, W: Tensor, R_bar: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The VJP of a training step with running statistics (docs/method.md §4.8), exactly, by
        double backward: with g(θ, ω) = ∇_θ L_B(θ; ω) and the step's new statistics
        r' = ρ(θ, ω, r), for each row q of W (Q, P) (the coefficient of g) and R_bar (Q, R) (the
        adjoint of r'):

            φ_q(θ, ω, r) = ⟨W_q, g(θ, ω)⟩ + ⟨R_bar_q, ρ(θ, ω, r)⟩
            returns ∂φ/∂θ (Q, P), |B|·∂φ/∂ω (Q, B) and ∂φ/∂r (Q, R), at ω = 1 and r = ``stats``.

        Call inside :meth:`step`."""
        return self.step_graph_vjp(self.step_graph(theta, stats, x, y), W, R_bar)

    def step_graph(self, theta: Tensor, stats: Tensor, x: Inputs, y: Any) -> StepGraph:
        """The step's loss gradient g and new running statistics r' with their graph kept (the first
        half of :meth:`step_vjp`; call inside :meth:`step`). ``g`` and ``r_new`` detached are what
        a replayed step uses."""
        B = batch_len(x)
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            u = torch.ones(B, dtype=self.dtype, device=self.device, requires_grad=True)
            r = stats.detach().requires_grad_(True)
            L, r_new, _ = self.step_loss(th, r, x, y, u)
            (g,) = torch.autograd.grad(L, th, create_graph=True)
        return StepGraph(th, u, r, g, r_new, B)

    def step_graph_vjp(self, sg: StepGraph, W: Tensor, R_bar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The second half of :meth:`step_vjp` on a kept graph (:meth:`step_graph`): one backward
        pass per row of W (Q, P) and R_bar (Q, R) → (Q, P), (Q, B), (Q, R). The last row frees it."""
        th, u, r = sg.theta, sg.u, sg.stats
        with torch.enable_grad():
            outs = [(o, i) for i, o in enumerate((sg.g, sg.r_new)) if o.requires_grad]
            rows: list[tuple[Tensor, Tensor, Tensor]] = []
            for q in range(W.shape[0]):
                vecs = (W[q], R_bar[q])
                if not outs:
                    rows.append((torch.zeros_like(th), torch.zeros_like(u), torch.zeros_like(r)))
                    continue
                parts = torch.autograd.grad([o for o, _ in outs], (th, u, r), grad_outputs=[vecs[i] for _, i in outs],
                                            retain_graph=q < W.shape[0] - 1, allow_unused=True)
                rows.append(tuple(torch.zeros_like(ref) if p is None else p  # type: ignore[misc]
                                  for p, ref in zip(parts, (th, u, r))))
        hw, du, dr = (torch.stack([row[i] for row in rows]).detach() for i in range(3))
        return hw, sg.B * du, dr

    def mixed_second(
        self,
        theta: Tensor,
        x: Tensor,
        y: Tensor,
        a: Tensor,
        b: Tensor,
        mode: HvpMode = "exact",
        eps: float | None = None,
        plus_dots: Tensor | None = None,
    ) -> Tensor:
        """Per-sample aᵀ ∇²l_i(θ) b, i.e. ∂²/∂s∂r l_i(θ + s·a + r·b) at 0.

        ``mode="exact"``: by triple backward (see :meth:`_exact_mixed`). Otherwise the JVP along
        b is differenced along a (central or forward). ``plus_dots`` w, of a's shape, adds the
        first-order ⟨w, ∇l_i(θ)⟩ to each row (exact mode: from the same pass, at no extra cost;
        the closed form needs ⟨H_B ∇f, G_z⟩ + ∇fᵀ H_z G_B). Shapes: a (P,) or (Q, P), b (P,)
        → (B,) or (Q, B).
        """
        single = a.ndim == 1
        A = a.unsqueeze(0) if single else a
        W = None if plus_dots is None else (plus_dots.unsqueeze(0) if single else plus_dots)
        if W is not None and W.shape != A.shape:
            raise ConfigError(f"plus_dots has shape {tuple(plus_dots.shape)}; it must match a's "
                              f"{tuple(a.shape)}")

        def along_b(th: Tensor) -> Tensor:
            return jvp(lambda t2: self.losses(t2, x, y), (th,), (b,))[1]

        if mode == "exact":
            out = self._exact_mixed(theta, x, y, A, b, W)
        else:
            norms = A.norm(dim=1, keepdim=True)
            safe = torch.where(norms > 0, norms, torch.ones_like(norms))
            e = fd_epsilon(theta, mode, eps)
            plus = torch.stack([along_b(theta + e * u) for u in A / safe])
            if mode == "central":
                minus = torch.stack([along_b(theta - e * u) for u in A / safe])
                out = (plus - minus) * (norms / (2 * e))
            else:
                out = (plus - along_b(theta)) * (norms / e)
            if W is not None:
                out = out + self.dots(theta, x, y, W)
        return out[0] if single else out

    def _exact_mixed(
        self, theta: Tensor, x: Tensor, y: Tensor, A: Tensor, b: Tensor, W: Tensor | None
    ) -> Tensor:
        """Per-sample aᵀ ∇²l_i(θ) b (+ ⟨w, ∇l_i(θ)⟩) for the rows a of A (Q, P) → (Q, B).

        With the members' weights ω as an input, g(θ, ω) = ∇_θ L_B(θ; ω) (one backward pass with
        graph), h(θ, ω) = ∂/∂θ ⟨g, b⟩ (a second one), and per row a, |B| times the derivative of
        ⟨h, a⟩ + ⟨g, w⟩ with respect to ω_i is aᵀ ∇²l_i b + ⟨w, ∇l_i⟩ (shares ℓ_i for a batch
        loss): the first
        three passes are shared by all Q rows. Measured on 4,096 MNIST samples through the MLP
        784-128-10 (ReLU, float32, one thread, CPU time): 60 ms, against 83 ms for nested
        forward-mode JVPs (``torch.func.jvp`` of a JVP) and 35 ms for one forward-mode pass of
        inner products — so the closed form's ⟨H_B ∇f, G_z⟩ + ∇fᵀ H_z G_B costs 60 ms with
        ``plus_dots`` against 95 ms as two calls.
        """
        B = batch_len(x)
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            u = torch.ones(B, dtype=self.dtype, device=self.device, requires_grad=True)
            (g,) = torch.autograd.grad(self.batch_loss(th, x, y, u), th, create_graph=True)
            (h,) = torch.autograd.grad(g, th, grad_outputs=b, create_graph=True, allow_unused=True)
            outs = [h] if W is None else [h, g]
            keep = [o is not None and o.requires_grad for o in outs]
            rows = []
            for q in range(len(A)):
                grads = [A[q]] if W is None else [A[q], W[q]]
                pairs = [(o, v) for o, v, k in zip(outs, grads, keep) if k]
                if not pairs:  # l_i is linear in θ and w is absent: every product is zero
                    rows.append(torch.zeros_like(u))
                    continue
                (du,) = torch.autograd.grad([o for o, _ in pairs], u, grad_outputs=[v for _, v in pairs],
                                            retain_graph=q < len(A) - 1, allow_unused=True)
                rows.append(torch.zeros_like(u) if du is None else B * du)
        return torch.stack(rows).detach()


@contextlib.contextmanager
def _differentiable_eval_norms(model: nn.Module, names: Sequence[str], eval_names: Sequence[str] = ()
                               ) -> Iterator[None]:
    """The modules ``eval_names`` in eval mode (restored after), and the BatchNorm layers ``names``
    as (x − r_mean)/√(r_var + eps)·γ + β written out, so that the output is differentiable in the
    running statistics (torch's fused kernel is not); for ∂f/∂r of an eval-mode target
    (docs/method.md §4.8)."""
    mods = dict(model.named_modules())
    saved: list[tuple[nn.Module, Any]] = []
    modes = {n: mods[n].training for n in eval_names}
    for n in eval_names:
        mods[n].training = False

    def make(mod: nn.Module) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
            rm, rv = mod.running_mean, mod.running_var
            y = (x - rm.reshape(shape)) * torch.rsqrt(rv.reshape(shape) + mod.eps)  # type: ignore[union-attr,operator]
            if mod.weight is not None:
                y = y * mod.weight.reshape(shape)  # type: ignore[union-attr]
            if mod.bias is not None:
                y = y + mod.bias.reshape(shape)  # type: ignore[union-attr]
            return y

        return forward

    try:
        for n in names:
            mod = mods[n]
            if getattr(mod, "running_mean", None) is None:
                continue
            saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = make(mod)  # type: ignore[method-assign]
        yield
    finally:
        for mod, old in saved:
            if old is None:
                del mod.forward
            else:
                mod.forward = old  # type: ignore[method-assign]
        for n, training in modes.items():
            mods[n].training = training


@dataclass
class GradGraph:
    """A batch gradient with its autograd graph kept (:meth:`FlatModel.grad_graph`): θ and the
    members' weights ω (leaves), g = ∇_θ L_B(θ; ω) with ``create_graph``, the batch size."""

    theta: Tensor
    u: Tensor
    g: Tensor
    B: int
    want_dots: bool = True


@dataclass
class StepGraph:
    """A train-mode step's gradient and running-statistics update with their graph kept
    (:meth:`FlatModel.step_graph`): leaves θ, ω, r and outputs g, r'."""

    theta: Tensor
    u: Tensor
    stats: Tensor
    g: Tensor
    r_new: Tensor
    B: int


def graph_bytes(build: Callable[[], Any], skip: Sequence[Tensor] = ()) -> tuple[Any, int]:
    """``build()`` and the bytes of the distinct tensors its autograd graph saves (an upper bound
    of what keeping that graph costs), not counting those sharing a storage with ``skip``."""
    seen: dict[tuple[int, int], int] = {}
    skipped = {t.untyped_storage().data_ptr() for t in skip}

    def pack(t: Tensor) -> Tensor:
        try:
            if t.untyped_storage().data_ptr() in skipped:
                return t
        except (RuntimeError, NotImplementedError):
            pass
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = build()
    return out, sum(seen.values())


@dataclass
class _Step:
    """The training step the model replays (:meth:`FlatModel.step`)."""

    masks: dict[str, Tensor]
    buffers: dict[str, Tensor]


def _unsqueeze(a: Tensor) -> Tensor:
    return a.unsqueeze(0)


def _shape_of(v: Any) -> str:
    return str(tuple(v.shape)) if isinstance(v, Tensor) else f"a {type(v).__name__}"
