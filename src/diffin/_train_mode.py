"""A model's training-mode forward as a pure function: BatchNorm with weighted batch statistics,
dropout with fixed masks (docs/method.md §4.8: a step is a function of the state — θ, optimizer
moments and the running statistics of normalisation layers — and of one weight per batch member;
the recorded dropout masks are fixed inputs of the step).

Modules that train differently than they predict (:data:`NORM_TYPES`, :data:`DROPOUT_TYPES`) are
the ones :class:`diffin.Recorder` notes the mode of (``Run.train_modes``). :class:`TrainModeForward`
runs the model in those recorded modes through ``torch.func.functional_call`` with the forward of
each such module instance replaced for the duration of the call, so that

- a BatchNorm that used batch statistics normalises with the **weighted** batch mean and biased
  variance (weight ω_b per batch member; ω_b = 0 removes member b from both, ω = 1 is the batch
  the loop trained on) and returns its updated running statistics as new tensors;
- a dropout module multiplies by the mask the recorded step drew (:meth:`TrainModeForward.capture_masks`).

Nothing is updated in place, so the call works under ``torch.func.grad`` / ``jvp`` / ``vmap`` (over
the weights or the parameters) and under autograd's double backward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.overrides import TorchFunctionMode

from ._errors import TrainModeError
from ._tree import call_model, cuda_device

NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm,)
"""BatchNorm1d/2d/3d (and their lazy / sync subclasses): batch statistics in training mode, running
statistics in eval mode."""
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (_DropoutNd,)
"""Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout: random masks in training mode, the
identity in eval mode."""

OFFSET_SUFFIX = ":offset"
"""``masks[name + OFFSET_SUFFIX]``: the additive part of an alpha-dropout module's recorded
transform (``y = x·masks[name] + masks[name + OFFSET_SUFFIX]``); plain dropout has none."""

_ALPHA_TYPES = (nn.AlphaDropout, nn.FeatureAlphaDropout)

MAX_PLANS = 64
"""Input signatures whose dropout draws :meth:`TrainModeForward.capture_masks` checks and keeps as a
plan; inputs of further new shapes run the forward every time."""


def train_mode_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that train differently than they predict, by qualified name (the
    root module is ``""``), in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, NORM_TYPES + DROPOUT_TYPES)}


def current_modes(model: nn.Module) -> dict[str, bool]:
    """``{qualified name: module.training}`` of :func:`train_mode_modules`."""
    return {n: bool(m.training) for n, m in train_mode_modules(model).items()}


def uses_dropout(modes: Mapping[str, bool], model: nn.Module) -> bool:
    """True when some dropout-family module of ``model`` is in training mode in ``modes``."""
    mods = dict(model.named_modules())
    return any(v and isinstance(mods.get(n), DROPOUT_TYPES) for n, v in modes.items())


class TrainModeForward:
    """The model's forward in its recorded training modes, as a pure function.

    Args:
        model: the module (its architecture; the values come from ``params_and_buffers``).
        modes: ``{qualified module name: training}`` as recorded (``Run.train_modes``) for the
            modules of :func:`train_mode_modules`; every such module of ``model`` must be named.

    Attributes:
        norm_names: the BatchNorm modules that normalise with batch statistics in the recorded modes
            (training mode, or ``track_running_stats=False`` in any mode).
        dropout_names: the dropout modules in training mode.
        buffer_names: the running statistics those norms update: ``<norm>.running_mean``,
            ``<norm>.running_var`` and ``<norm>.num_batches_tracked`` (when the module has them).

    Supported: ``momentum=None`` (cumulative average, factor 1/(num_batches_tracked + 1)) and
    ``track_running_stats=False`` (batch statistics always, no running statistics).
    """

    def __init__(self, model: nn.Module, modes: Mapping[str, bool]) -> None:
        self.model = model
        mods = train_mode_modules(model)
        missing = sorted(set(mods) - set(modes))
        unknown = sorted(set(modes) - set(mods))
        if missing or unknown:
            raise TrainModeError(
                "the recorded training modes do not match the model's BatchNorm/dropout modules "
                f"(not recorded: {missing[:5]}; recorded but not in the model: {unknown[:5]}); pass the "
                "model built like the one that was trained"
            )
        self.modes: dict[str, bool] = {n: bool(modes[n]) for n in mods}
        self._modules = mods
        self.norm_names: tuple[str, ...] = tuple(
            n for n, m in mods.items()
            if isinstance(m, NORM_TYPES) and (self.modes[n] or m.running_mean is None)  # type: ignore[union-attr]
        )
        self.dropout_names: tuple[str, ...] = tuple(
            n for n, m in mods.items() if isinstance(m, DROPOUT_TYPES) and self.modes[n]
        )
        names: list[str] = []
        for n in self.norm_names:
            m = mods[n]
            if m.running_mean is not None:  # type: ignore[union-attr]
                names += [_join(n, "running_mean"), _join(n, "running_var")]
                if m.num_batches_tracked is not None:  # type: ignore[union-attr]
                    names.append(_join(n, "num_batches_tracked"))
        self.buffer_names: tuple[str, ...] = tuple(names)
        self._ctx: dict[str, Any] | None = None
        self._plans: dict[tuple[Any, ...], list[tuple[tuple[str, ...], Any]] | None] = {}
        """Draw plans by input signature (:meth:`capture_masks`): the forward's draws in order, or
        None where a plan did not reproduce the forward's generator state (full forwards there)."""
        self._layouts: dict[tuple[Any, ...], dict[str, tuple[Any, ...]]] = {}

    # ------------------------------------------------------------------ public
    def __call__(
        self,
        params_and_buffers: dict[str, Tensor],
        x: Any,
        weights: Tensor | None = None,
        masks: dict[str, Tensor] | None = None,
    ) -> tuple[Any, dict[str, Tensor]]:
        """``functional_call`` of the model in its recorded modes.

        Args:
            params_and_buffers: parameter and buffer values by name (those left out keep the
                module's own).
            x: the batch's inputs: a tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict
                (``model(**x)``), first dimension B.
            weights: ω, shape (B,): one weight per batch member (``None`` = ones). Each batch-statistic
                norm uses mean = Σ_b ω_b x_b / n and biased variance Σ_b ω_b (x_b − mean)² / n over
                batch and spatial positions, n = Σω · (spatial size); the running variance is
                updated with the unbiased factor n / (n − 1).
            masks: the step's dropout masks (:meth:`capture_masks`), required when
                :attr:`dropout_names` is not empty.

        Returns:
            ``(outputs, new_buffers)``: the model's outputs, and the updated running statistics
            of :attr:`buffer_names` as new tensors: ``(1 − m)·r + m·stat`` (m the module's momentum,
            or 1 / (num_batches_tracked + 1) when it is ``None``) and ``num_batches_tracked + 1``.
        """
        if self.dropout_names and masks is None:
            raise TrainModeError(
                f"the model has dropout in training mode ({', '.join(self.dropout_names[:3])}): pass "
                "the step's masks (TrainModeForward.capture_masks with the recorded RNG state)"
            )
        new: dict[str, Tensor] = {}
        with self._patched({"weights": weights, "masks": masks or {}, "new": new, "capture": None}):
            out = call_model(self.model, params_and_buffers, x)
        return out, new

    def capture_masks(
        self,
        params_and_buffers: dict[str, Tensor],
        x: Any,
        rng_state: Tensor,
        cuda_rng_state: Tensor | None = None,
        layout_only: bool = False,
    ) -> dict[str, Tensor]:
        """The dropout masks of a recorded step.

        Sets torch's RNG to ``rng_state`` (``Run.rng_state(t)``; and the CUDA generator of the
        device of ``x`` to ``cuda_rng_state`` when given), runs the training forward exactly as the
        loop did (same modules in the same order, same shapes and dtype, so the generator is
        consumed identically) and keeps each dropout module's multiplier: ``masks[name]`` has the
        shape of the module's input and holds 0 or 1/(1 − p) (channel dropout: constant over each
        sample's channel). Alpha dropout's transform is affine: its additive part is
        ``masks[name + OFFSET_SUFFIX]``. The caller's RNG state is restored afterwards.

        ``params_and_buffers`` and ``x`` must be the step's (θ_t and its buffers, the batch as the
        loop fed it): the masks do not depend on their values, only on the shapes reaching each
        dropout module.

        The first forward of each input signature (shapes, dtypes, devices, strides of ``x``) also
        notes its draws in order (each one's kind, shape and probability). If drawing those alone
        from the same state gives the same masks and leaves the generator(s) in the same state as
        the whole forward did (so nothing else in the forward consumed randomness), later calls
        with that signature make only the draws, not the forward (on text-bert a step's masks
        29.7 → 6.0 ms, against 27 ms for a training step); otherwise every call runs the forward.
        This assumes what draws a forward makes depends on its input's signature, not on its
        values (a forward that skips a dropout module for some batches of the same shape would
        need every step's forward).
        ``layout_only``: only the masks' shapes, dtypes and devices are wanted (uninitialised tensors,
        no draw) where such a plan exists; the masks otherwise.
        """
        if not self.dropout_names:
            return {}
        cuda_dev = cuda_device(x) if cuda_rng_state is not None else None
        sig = _signature(x)
        plan = self._plans.get(sig)
        if plan is not None and layout_only:
            return {k: torch.empty(shape, dtype=dtype, device=device)
                    for k, (shape, dtype, device) in self._layouts[sig].items()}
        if plan is not None:  # the forward's draws alone, in its order, from the same state
            return _run_plan(plan, rng_state, cuda_rng_state, cuda_dev)[0]
        masks: dict[str, Tensor] = {}
        draws: list[tuple[tuple[str, ...], Any]] = []
        with _generators_at(rng_state, cuda_rng_state, cuda_dev) as states, torch.no_grad(), self._patched(
            {"weights": None, "masks": {}, "new": {}, "capture": masks, "plan": draws}
        ):
            call_model(self.model, params_and_buffers, x)
            after = states()
        if sig not in self._plans and len(self._plans) < MAX_PLANS:  # check once per signature: same masks,
            # the generator left in the same state (inputs of ever new shapes, e.g. padded per batch, stop here)
            again, state = _run_plan(draws, rng_state, cuda_rng_state, cuda_dev)
            same = (_same_state(state, after) and again.keys() == masks.keys()
                    and all(torch.equal(again[k], masks[k]) for k in masks))
            self._plans[sig] = draws if same else None
            self._layouts[sig] = {k: (tuple(v.shape), v.dtype, v.device) for k, v in masks.items()}
        return masks

    # ------------------------------------------------------------------ the patched modules
    @contextlib.contextmanager
    def _patched(self, ctx: dict[str, Any]) -> Iterator[None]:
        """Recorded modes on every train-mode module; the forward of batch-statistic norms and of
        train-mode dropout replaced (restored on exit, as are the modes)."""
        if self._ctx is not None:
            raise TrainModeError("TrainModeForward is not re-entrant: one call at a time")
        saved_modes = {m: m.training for m in self.model.modules()}
        replaced: list[tuple[nn.Module, bool, Any]] = []
        self._ctx = ctx
        ctx["calls"] = 0
        functional = _FunctionalDropout(ctx) if self.dropout_names else contextlib.nullcontext()
        try:
            for m in saved_modes:  # a training forward: every module trains (attention reads self.training) ...
                m.training = True
            for n, m in self._modules.items():  # ... but these as recorded
                m.training = self.modes[n]
            for n in self.norm_names:
                replaced.append(_replace_forward(self._modules[n], self._norm_forward(n)))
            for n in self.dropout_names:
                fwd = self._capture_forward(n) if ctx["capture"] is not None else self._mask_forward(n)
                replaced.append(_replace_forward(self._modules[n], fwd))
            with functional:
                yield
        finally:
            for m, had, old in reversed(replaced):
                if had:
                    m.forward = old
                else:
                    del m.forward
            for m, training in saved_modes.items():
                m.training = training
            self._ctx = None

    def _norm_forward(self, name: str) -> Any:
        mod = self._modules[name]

        def forward(inp: Tensor) -> Tensor:
            ctx = self._ctx
            assert ctx is not None
            mod._check_input_dim(inp)  # type: ignore[operator]
            return _weighted_batch_norm(mod, name, inp, ctx["weights"], ctx["new"])

        return forward

    def _mask_forward(self, name: str) -> Any:
        def forward(inp: Tensor) -> Tensor:
            ctx = self._ctx
            assert ctx is not None
            masks = ctx["masks"]
            if name not in masks:
                raise TrainModeError(
                    f"dropout module {name!r} ran in the replayed step but drew no mask when the step's masks "
                    "were captured: the forward calls its dropout modules differently from one call to the next"
                )
            out = inp * masks[name].to(dtype=inp.dtype)
            off = masks.get(name + OFFSET_SUFFIX)
            return out + off.to(dtype=inp.dtype) if off is not None else out

        return forward

    def _capture_forward(self, name: str) -> Any:
        mod = self._modules[name]
        original = type(mod).forward

        def forward(inp: Tensor) -> Tensor:
            ctx = self._ctx
            assert ctx is not None
            if name in ctx["capture"]:
                raise TrainModeError(
                    f"dropout module {name!r} ran twice in one forward: a module called several times "
                    "per forward draws several masks, which diffin cannot replay; use one module per call"
                )
            ctx["in_module"] = True  # the functional-dropout mode leaves the module's own draw alone
            try:
                return self._capture_draw(mod, name, original, inp, ctx)
            finally:
                ctx["in_module"] = False

        return forward

    @staticmethod
    def _capture_draw(mod: nn.Module, name: str, original: Any, inp: Tensor, ctx: dict[str, Any]) -> Tensor:
        spec, dev = _spec(inp), cuda_device(inp)

        def module_forward(value: float) -> Tensor:  # the module's own draw, in training mode as recorded
            was, mod.training = mod.training, True
            try:
                return original(mod, _filled(spec, value))
            finally:
                mod.training = was

        if isinstance(mod, _ALPHA_TYPES):  # affine: y = x·a + c; c from zeros, under the same draw
            def draw() -> tuple[Tensor, ...]:
                cpu = torch.get_rng_state()
                gpu = torch.cuda.get_rng_state(dev) if dev is not None else None
                offset = module_forward(0.0)
                torch.set_rng_state(cpu)
                if dev is not None and gpu is not None:
                    torch.cuda.set_rng_state(gpu, dev)
                return module_forward(1.0) - offset, offset
            keys: tuple[str, ...] = (name, name + OFFSET_SUFFIX)
        else:
            def draw() -> tuple[Tensor, ...]:
                return (module_forward(1.0),)  # x·noise with noise ∈ {0, 1/(1 − p)}: ones give the noise
            keys = (name,)
        for k, v in zip(keys, draw()):
            ctx["capture"][k] = v
        if ctx.get("plan") is not None:
            ctx["plan"].append((keys, draw))
        return inp * ctx["capture"][name] + ctx["capture"].get(name + OFFSET_SUFFIX, 0)


FUNCTIONAL_PREFIX = "<functional>."
"""``masks[FUNCTIONAL_PREFIX + k]``: the mask of the k-th dropout drawn inside the forward by a function
rather than a dropout module (``torch.nn.functional.dropout`` called directly, or the attention dropout of
``torch.nn.functional.scaled_dot_product_attention``, as Hugging Face attention layers apply it)."""


class _FunctionalDropout(TorchFunctionMode):
    """Dropout drawn by functions inside the forward, fixed like a module's (docs/method.md §4.8).

    While a train-mode forward runs, every ``F.dropout(x, p, training=True)`` and every
    ``F.scaled_dot_product_attention(..., dropout_p=p)`` with p > 0 is, in turn:

    * captured (``ctx["capture"]`` is a dict): its multiplier is drawn as the function draws it — the
      same generator, shape and dtype; on the CPU, attention dropout is ``torch.dropout`` of the
      softmax weights (B, H, L, S), the draw this makes — and the call returns the value it would have;
    * replayed: the multiplier of the same call of the captured forward is used, and attention is
      computed as softmax(q kᵀ·scale + mask) ⊙ multiplier · v (differentiable by every transform).
    """

    def __init__(self, ctx: dict[str, Any]) -> None:
        super().__init__()
        self.ctx = ctx

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.ctx.get("in_module"):
            return func(*args, **kwargs)
        if func is F.dropout:
            x, p, training = _bind(args, kwargs, ("input", "p", "training", "inplace"), (None, 0.5, True, False))[:3]
            if training and p > 0:
                spec = _spec(x)
                mult = self._mult(lambda: func(_filled(spec, 1.0), p, True), tuple(x.shape))
                return x * mult.to(dtype=x.dtype)
        elif func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            defaults = (None, None, None, None, 0.0, False, None, False)
            q, k, v, mask, p, causal, scale, gqa = _bind(args, kwargs, names, defaults)
            if p > 0:
                shape = (*torch.broadcast_shapes(q.shape[:-2], k.shape[:-3] + (q.shape[-3],)), q.shape[-2], k.shape[-2])
                dt, dev = q.dtype, q.device
                mult = self._mult(lambda: F.dropout(torch.ones(shape, dtype=dt, device=dev), p, True), shape)
                return sdpa_math(q, k, v, mask, mult, causal, scale, gqa)
        return func(*args, **kwargs)

    def _mult(self, draw: Any, shape: tuple[int, ...]) -> Tensor:
        ctx = self.ctx
        key = f"{FUNCTIONAL_PREFIX}{ctx['calls']}"
        ctx["calls"] += 1
        if ctx["capture"] is not None:
            ctx["capture"][key] = mult = draw()
            if ctx.get("plan") is not None:
                ctx["plan"].append(((key,), lambda: (draw(),)))
            return mult
        mult = ctx["masks"].get(key)
        if mult is None or tuple(mult.shape) != shape:
            raise TrainModeError(
                f"the replayed forward drew dropout call {key} of shape {shape}, but the captured step "
                f"{'has none' if mult is None else f'has shape {tuple(mult.shape)}'}: the forward does not draw "
                "its dropout the same way on every call"
            )
        return mult


def _spec(t: Tensor) -> tuple[Any, ...]:
    """What ``torch.ones_like(t)`` needs (shape, strides where dense, dtype, device), without t."""
    dense = t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
    return tuple(t.shape), (tuple(t.stride()) if dense else None), t.dtype, t.device


def _filled(spec: tuple[Any, ...], value: float) -> Tensor:
    shape, stride, dtype, device = spec
    if stride is None:
        return torch.full(shape, value, dtype=dtype, device=device)
    return torch.empty_strided(shape, stride, dtype=dtype, device=device).fill_(value)


def _signature(x: Any) -> tuple[Any, ...]:
    """Shapes, strides, dtypes and devices of the tensors in a batch (nested tuples, lists, dicts)."""
    if isinstance(x, Tensor):
        return ("t", tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device))
    if isinstance(x, Mapping):
        return ("d", *((str(k), _signature(v)) for k, v in x.items()))
    if isinstance(x, (tuple, list)):
        return ("s", *(_signature(v) for v in x))
    return ("o", type(x).__name__, x if isinstance(x, (int, float, bool, str, type(None))) else id(x))


def _run_plan(plan: list[tuple[tuple[str, ...], Any]], rng_state: Tensor, cuda_rng_state: Tensor | None,
              cuda_dev: Any) -> tuple[dict[str, Tensor], tuple[Tensor, Tensor | None]]:
    """A forward's draws without the forward: from the recorded state, each draw in order; the
    masks and the generator state(s) after them. The caller's state is restored."""
    masks: dict[str, Tensor] = {}
    with _generators_at(rng_state, cuda_rng_state, cuda_dev) as states, torch.no_grad():
        for keys, draw in plan:
            for k, v in zip(keys, draw()):
                masks[k] = v
        state = states()
    return masks, state


@contextlib.contextmanager
def _generators_at(rng_state: Tensor, cuda_rng_state: Tensor | None, cuda_dev: Any
                   ) -> Iterator[Callable[[], tuple[Tensor, Tensor | None]]]:
    """Torch's CPU generator at ``rng_state`` (and ``cuda_dev``'s at ``cuda_rng_state`` when both are
    given) for the block, the caller's states restored after it; yields a function that reads the
    generators' states (CPU, CUDA or None)."""
    cpu_saved = torch.get_rng_state()
    cuda_saved = torch.cuda.get_rng_state(cuda_dev) if cuda_dev is not None else None
    try:
        torch.set_rng_state(rng_state)
        if cuda_dev is not None and cuda_rng_state is not None:
            torch.cuda.set_rng_state(cuda_rng_state, cuda_dev)
        yield lambda: (torch.get_rng_state(), torch.cuda.get_rng_state(cuda_dev) if cuda_dev is not None else None)
    finally:
        torch.set_rng_state(cpu_saved)
        if cuda_dev is not None and cuda_saved is not None:
            torch.cuda.set_rng_state(cuda_saved, cuda_dev)


def _same_state(a: tuple[Tensor, Tensor | None], b: tuple[Tensor, Tensor | None]) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b))


def sdpa_math(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, mult: Tensor | None,
              is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """``scaled_dot_product_attention`` written out as its math backend computes it (q, k scaled by
    √scale each, softmax over keys), with the dropout multiplier ``mult`` (..., L, S) on the weights;
    plain differentiable ops (forward-mode, double backward, vmap)."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    attn = (q * math.sqrt(s)) @ (k * math.sqrt(s)).transpose(-2, -1)
    L, S = q.shape[-2], k.shape[-2]
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        attn = attn.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
    attn = torch.softmax(attn, dim=-1)
    if mult is not None:
        attn = attn * mult.to(dtype=attn.dtype)
    return attn @ v


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...], defaults: tuple[Any, ...]
          ) -> list[Any]:
    """Positional and keyword arguments of a call, in ``names`` order (``defaults`` for the absent)."""
    out = list(defaults)
    for i, a in enumerate(args[: len(names)]):
        out[i] = a
    for i, n in enumerate(names):
        if n in kwargs:
            out[i] = kwargs[n]
    return out


def assemble_masks(union: Mapping[str, Tensor], parts: list[tuple[int, Mapping[str, Tensor]]]) -> dict[str, Tensor]:
    """The masks of one forward over a step's whole batch built from those its micro-batches drew
    (gradient accumulation): ``union`` gives every mask's shape over the whole batch (any values),
    ``parts`` each micro-batch's first row in it and its masks. A micro-batch's mask fills its rows and,
    along the other dimensions, the leading positions (a micro-batch padded to a shorter length than
    the whole batch: right padding; the padded positions carry no signal to the real ones)."""
    out: dict[str, Tensor] = {}
    for key, ref in union.items():
        m = torch.zeros_like(ref)
        for off, pm in parts:
            part = pm.get(key)
            if part is None or part.ndim != ref.ndim or any(a > b for a, b in zip(part.shape[1:], ref.shape[1:])):
                raise TrainModeError(
                    f"the micro-batches of a step drew dropout {key!r} "
                    f"{'not at all' if part is None else f'with shape {tuple(part.shape)}'} against "
                    f"{tuple(ref.shape)} for the whole batch: their forwards cannot be replayed as one"
                )
            idx = (slice(off, off + part.shape[0]), *(slice(0, n) for n in part.shape[1:]))
            m[idx] = part.to(m.dtype)
        out[key] = m
    if any(set(pm) - set(union) for _, pm in parts):
        raise TrainModeError("a micro-batch drew more dropout masks than a forward over the whole batch")
    return out


def _weighted_batch_norm(
    mod: nn.Module, name: str, x: Tensor, weights: Tensor | None, new: dict[str, Tensor]
) -> Tensor:
    """Batch normalisation of ``x`` (B, C, *spatial) with weighted batch statistics; the updated
    running statistics go into ``new`` (docs/method.md §4.8)."""
    dims = [0, *range(2, x.dim())]
    spatial_dims = list(range(2, x.dim()))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    spatial = 1
    for s in x.shape[2:]:
        spatial *= int(s)
    if weights is None:
        mean = x.mean(dims)
        xc = x - mean.reshape(shape)
        var = (xc * xc).mean(dims)
        n: Tensor | float = float(x.shape[0] * spatial)
    else:  # each member's sum over the spatial positions, then the weighted sum over members (fewer passes)
        w = weights.to(dtype=x.dtype)
        n = w.sum() * spatial
        mean = (w @ (x.sum(spatial_dims) if spatial_dims else x)) / n
        xc = x - mean.reshape(shape)
        sq = xc * xc
        var = (w @ (sq.sum(spatial_dims) if spatial_dims else sq)) / n
    scale = torch.rsqrt(var + mod.eps)  # type: ignore[operator]
    if mod.weight is not None:
        scale = scale * mod.weight  # type: ignore[operator]
    if mod.bias is not None:
        y = torch.addcmul(mod.bias.reshape(shape), xc, scale.reshape(shape))  # type: ignore[union-attr]
    else:
        y = xc * scale.reshape(shape)
    rm, rv, nbt = mod.running_mean, mod.running_var, mod.num_batches_tracked
    if rm is not None and rv is not None:
        if mod.momentum is None:
            if nbt is None:
                raise TrainModeError(f"BatchNorm {name!r} has momentum=None but no num_batches_tracked")
            m: Tensor | float = 1.0 / (nbt.to(x.dtype) + 1)  # type: ignore[union-attr]
        else:
            m = float(mod.momentum)  # type: ignore[arg-type]
        unbiased = var * (n / (n - 1))
        new[_join(name, "running_mean")] = (1 - m) * rm + m * mean.to(rm.dtype)  # type: ignore[operator]
        new[_join(name, "running_var")] = (1 - m) * rv + m * unbiased.to(rv.dtype)  # type: ignore[operator]
        if nbt is not None:
            new[_join(name, "num_batches_tracked")] = nbt + 1  # type: ignore[operator]
    return y


def _replace_forward(mod: nn.Module, fwd: Any) -> tuple[nn.Module, bool, Any]:
    had = "forward" in mod.__dict__
    old = mod.__dict__.get("forward")
    mod.forward = fwd
    return mod, had, old


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, its mode before restored after it."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)
