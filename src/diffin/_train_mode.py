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
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

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
        if self.dropout_names:
            if masks is None:
                raise TrainModeError(
                    f"the model has dropout in training mode ({', '.join(self.dropout_names[:3])}): pass "
                    "the step's masks (TrainModeForward.capture_masks with the recorded RNG state)"
                )
            absent = [n for n in self.dropout_names if n not in masks]
            if absent:
                raise TrainModeError(f"masks lack the dropout modules {absent[:5]}; capture them with capture_masks")
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
        """
        if not self.dropout_names:
            return {}
        cuda_dev = cuda_device(x) if cuda_rng_state is not None else None
        cpu_saved = torch.get_rng_state()
        cuda_saved = torch.cuda.get_rng_state(cuda_dev) if cuda_dev is not None else None
        masks: dict[str, Tensor] = {}
        try:
            torch.set_rng_state(rng_state)
            if cuda_dev is not None and cuda_rng_state is not None:
                torch.cuda.set_rng_state(cuda_rng_state, cuda_dev)
            with torch.no_grad(), self._patched(
                {"weights": None, "masks": {}, "new": {}, "capture": masks}
            ):
                call_model(self.model, params_and_buffers, x)
        finally:
            torch.set_rng_state(cpu_saved)
            if cuda_dev is not None and cuda_saved is not None:
                torch.cuda.set_rng_state(cuda_saved, cuda_dev)
        return masks

    # ------------------------------------------------------------------ the patched modules
    @contextlib.contextmanager
    def _patched(self, ctx: dict[str, Any]) -> Iterator[None]:
        """Recorded modes on every train-mode module; the forward of batch-statistic norms and of
        train-mode dropout replaced (restored on exit, as are the modes)."""
        if self._ctx is not None:
            raise TrainModeError("TrainModeForward is not re-entrant: one call at a time")
        saved_modes = {n: m.training for n, m in self._modules.items()}
        replaced: list[tuple[nn.Module, bool, Any]] = []
        self._ctx = ctx
        try:
            for n, m in self._modules.items():
                m.training = self.modes[n]
            for n in self.norm_names:
                replaced.append(_replace_forward(self._modules[n], self._norm_forward(n)))
            for n in self.dropout_names:
                fwd = self._capture_forward(n) if ctx["capture"] is not None else self._mask_forward(n)
                replaced.append(_replace_forward(self._modules[n], fwd))
            yield
        finally:
            for m, had, old in reversed(replaced):
                if had:
                    m.forward = old
                else:
                    del m.forward
            for n, m in self._modules.items():
                m.training = saved_modes[n]
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
            ones = torch.ones_like(inp)
            if isinstance(mod, _ALPHA_TYPES):  # affine: y = x·a + c; c from zeros, under the same draw
                cpu, dev = torch.get_rng_state(), cuda_device(inp)
                gpu = torch.cuda.get_rng_state(dev) if dev is not None else None
                offset = original(mod, torch.zeros_like(inp))
                torch.set_rng_state(cpu)
                if dev is not None and gpu is not None:
                    torch.cuda.set_rng_state(gpu, dev)
                mult = original(mod, ones) - offset
                ctx["capture"][name + OFFSET_SUFFIX] = offset
            else:
                mult = original(mod, ones)  # x·noise with noise ∈ {0, 1/(1 − p)}: ones give the noise
            ctx["capture"][name] = mult
            return inp * mult + ctx["capture"].get(name + OFFSET_SUFFIX, 0)

        return forward


def _weighted_batch_norm(
    mod: nn.Module, name: str, x: Tensor, weights: Tensor | None, new: dict[str, Tensor]
) -> Tensor:
    """Batch normalisation of ``x`` (B, C, *spatial) with weighted batch statistics; the updated
    running statistics go into ``new`` (docs/method.md §4.8)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    spatial = 1
    for s in x.shape[2:]:
        spatial *= int(s)
    if weights is None:
        mean = x.mean(dims)
        xc = x - mean.reshape(shape)
        var = (xc * xc).mean(dims)
        n: Tensor | float = float(x.shape[0] * spatial)
    else:
        w = weights.to(dtype=x.dtype).reshape([x.shape[0]] + [1] * (x.dim() - 1))
        n = w.sum() * spatial
        mean = (w * x).sum(dims) / n
        xc = x - mean.reshape(shape)
        var = (w * xc * xc).sum(dims) / n
    y = xc * torch.rsqrt(var + mod.eps).reshape(shape)  # type: ignore[operator]
    if mod.weight is not None:
        y = y * mod.weight.reshape(shape)  # type: ignore[union-attr]
    if mod.bias is not None:
        y = y + mod.bias.reshape(shape)  # type: ignore[union-attr]
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
