"""A recorded run's training dynamics: checkpoints with their optimizer state, the batch of a
step, one training step, and replay of a segment (docs/method.md §1, §4.3).

Estimators, ground truth and the tasks all go through :class:`Trajectory`; nothing else knows
how an optimizer steps. The optimizer is one rule of :mod:`diffin.trajectory.optim` (chosen by
the recorded ``torch.optim`` class name), with every hyper-parameter of every parameter group
laid out per coordinate of the flat θ (``fm.spec.names`` gives the order): a float when all
groups agree, else a (P,) vector. Gradient-norm clipping (``Recorder(..., clip_grad_norm=c)``)
is applied to the raw batch gradient before the rule's step, as ``torch.nn.utils.clip_grad_norm_``
does it over all trainable parameters.
"""

# Long file: Trajectory is the one place that knows how a recorded run steps (checkpoint states, the
# batch of a step, one step, its transpose and adjoint, replay of a segment, drift); they share the
# run's rule, train-mode forward and checkpoint cache.

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, vmap

from .._data import DataSource
from .._errors import (
    ConfigError,
    MissingOptimizerStateError,
    TrainModeError,
    TrainModeWarning,
    UnsupportedOptimizerError,
)
from .._functional import FlatModel, GradGraph, StepGraph, graph_bytes
from .._train_mode import assemble_masks
from .._tree import batch_len, cuda_device, input_shape, nbytes, to_device, tree_map
from ..recording.run import Run
from .clipping import clip, clip_transpose
from .optim import OptimizerRule, get_rule
from .optim.base import Scalar
from .optim.sgd import SGDRule

# torch.optim group keys -> rule hyper keys (the rest are passed on unchanged)
_BOOL_KEYS = ("nesterov", "maximize", "amsgrad", "decoupled", "foreach", "fused", "capturable",
              "differentiable")
_IGNORED = ("params", "lr", "initial_lr", "foreach", "fused", "capturable", "differentiable")


BATCH_CACHE_BYTES = 64 * 2**20
"""Memory for the batches :meth:`Trajectory.batch` keeps (most recent first out last)."""
PREFETCH_BYTES = 8 * 2**20
"""Rows of memory-mapped training data :meth:`Trajectory.batch` reads at once (the batches of the
next steps up to the next checkpoint): one read in file order instead of one page fault per row."""


def _check_forward_shape(t: int, x: Any, rows: int, length: int) -> None:
    """Refuse a batch whose shape is not the recorded forward's: its dropout masks would differ."""
    if rows == 0:
        return  # recorded before shapes were
    got = input_shape(x)
    if got[0] == rows and got[1] != length:  # (other rows: a proxy batch, diffin-expected)
        raise TrainModeError(
            f"step {t}: the training forward ran on {rows} rows of length {length}, but the batch as diffin "
            f"collates it has {got[0]} rows of length {got[1]}, so its dropout masks cannot be drawn again. "
            "Give train= the data as the loop fed it: the same items, padded as its collator padded them "
            "(to the longest sequence of each micro-batch, on the right)"
        )


class ReplayDriftWarning(UserWarning):
    """Replaying training from a checkpoint did not land on the next checkpoint."""


@dataclass
class TrainState:
    """The training state before a step: θ (P,) or (K, P), the optimizer's state (name → tensor
    shaped like θ; a name is absent while the optimizer has not created it, e.g. SGD's momentum
    buffer before its first step, Adam's moments = zeros), k, the number of optimizer steps
    taken before (Adam's bias correction uses k + 1), and the running statistics of layers that
    trained on batch statistics."""

    theta: Tensor
    opt: dict[str, Tensor]
    k: int
    stats: Tensor | None = None
    """The running statistics of train-mode BatchNorm layers, flat: (R,) or (K, R) (docs/method.md
    §4.8); None for models without them."""
    buffers: dict[str, Tensor] | None = None
    """The other buffers those layers update (``num_batches_tracked``), shared by the K runs."""
    opt_after: dict[str, Tensor] | None = None
    """The optimizer's state after this step, set by a replay that yields the step's gradient g
    beside the state (``with_grads``): the output of the step with that g, which the rule's adjoint
    then reuses (Adam's m', v') instead of computing it again. A caller that passes another g to
    :meth:`adjoint` must clear it."""
    graph: GradGraph | StepGraph | None = None
    """Step t's gradient with its autograd graph, kept by a replay with :attr:`Trajectory.keep_graphs`
    (the transpose then needs one backward pass, not a new gradient: docs/method.md §4.1)."""


def optimizer_groups(run: Run) -> list[dict[str, Any]]:
    """The run's parameter groups ``[{"params": [names], "hyper": {...}}]`` (one implicit group
    holding every trainable parameter for runs recorded without groups)."""
    spec = run.optimizer
    groups = getattr(spec, "groups", None)
    if groups:
        return [{"params": list(g["params"]), "hyper": dict(g.get("hyper", {}))} for g in groups]
    if not spec.uniform_groups:
        raise UnsupportedOptimizerError(
            f"the run at {run.path} was recorded with parameter groups that differ, by a diffin that "
            "did not save them; record it again with this diffin (it saves every group's settings), "
            "or score with 'tracin' or 'if-cg'"
        )
    hyper: dict[str, Any] = dict(spec.extra)
    hyper.update(weight_decay=spec.weight_decay, maximize=spec.maximize)
    if spec.kind == "SGD":
        hyper.update(momentum=spec.momentum, dampening=spec.dampening, nesterov=spec.nesterov)
    return [{"params": list(run.trainable), "hyper": hyper}]


def rule_hyper(kind: str, hyper: dict[str, Any]) -> dict[str, Any]:
    """A group's torch hyper-parameters as the rule's keys (``betas`` → ``beta1``/``beta2``;
    ``decoupled`` for AdamW or ``decoupled_weight_decay=True``)."""
    out = {k: v for k, v in hyper.items() if k not in _IGNORED and k not in ("betas", "decoupled_weight_decay")}
    if "betas" in hyper:
        out["beta1"], out["beta2"] = (float(b) for b in hyper["betas"])
    if kind in ("Adam", "AdamW"):
        out["decoupled"] = kind == "AdamW" or bool(hyper.get("decoupled_weight_decay", False))
    return out


def check_rule(run: Run) -> type[OptimizerRule]:
    """The rule of the run's optimizer, after checking every group's settings; raises
    :class:`UnsupportedOptimizerError` (naming what to do) when there is none."""
    kind = run.optimizer.kind
    cls = get_rule(kind)
    hypers = [rule_hyper(kind, g["hyper"]) for g in optimizer_groups(run)]
    for h in hypers:
        cls.check(h)
    for key in sorted({k for h in hypers for k in h}):
        vals = [h.get(key) for h in hypers]
        if any(v != vals[0] for v in vals) and (
            key in _BOOL_KEYS or any(isinstance(v, (bool, str)) or v is None for v in vals)
        ):
            raise UnsupportedOptimizerError(
                f"{kind} parameter groups differ in {key!r} ({vals}); diffin models per-group numbers "
                "(lr, weight decay, betas, eps, momentum, dampening), not per-group switches. Train with "
                "one value of it, or score with 'tracin'"
            )
    return cls


class Trajectory:
    """The recorded dynamics of ``run`` for the functional model ``fm`` and training data
    ``train`` (``None`` when only checkpoints are needed).

    ``memory_mb`` bounds the states :meth:`replay_reversed` keeps per segment.
    """

    def __init__(self, run: Run, fm: FlatModel, train: DataSource | None = None, memory_mb: float = 1024.0):
        self.run = run
        self.fm = fm
        self.train = train
        self.memory_mb = memory_mb
        self.clip_norm: float | None = getattr(run, "clip_grad_norm", None)
        self.drift = 0.0  # largest relative replay drift seen (see replay_reversed)
        self.keep_graphs = False
        """Replays keep each step's gradient graph in its state (exact HVPs from it in
        :meth:`transpose`) for as many of each segment's last steps as fit in ``memory_mb`` beside
        the segment's states (the other steps' transposes build their graph again)."""
        self._lr_rows: dict[bytes, Tensor] = {}
        self._rule: OptimizerRule | None = None
        self._group_index: Tensor | None = None  # (P,) group of each coordinate
        self._gfun: Callable[..., Tensor] | None = None
        # the batches of the most recent steps (a replay reads a segment forward, the sweep then
        # backward: the second read of each batch comes from here, not from the data again)
        self._batches: OrderedDict[int, tuple[np.ndarray, Tensor, Tensor]] = OrderedDict()
        self._batch_bytes: dict[int, int] = {}
        self._cached = 0
        self._gfun_per_run: Callable[..., Tensor] | None = None
        self._sfun: dict[bool, Callable[..., Any]] = {}
        self._masks: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._setup_train_mode()

    # ------------------------------------------------------------------ training-mode layers
    def _setup_train_mode(self) -> None:
        """Replay in the recorded modes (docs/method.md §4.8): BatchNorm on weighted batch statistics
        with running statistics in the state, dropout with the recorded step's masks. A run recorded
        without modes (an older diffin) of a model with such layers is scored in eval mode, with a
        :class:`TrainModeWarning` saying what the scores then mean."""
        from .._train_mode import TrainModeForward, train_mode_modules

        fm = self.fm
        mods = train_mode_modules(fm.model)
        if not mods:
            return
        modes = getattr(self.run, "train_modes", None)
        if modes is None:
            warnings.warn(
                f"the run at {self.run.path} was recorded without the modes of the model's BatchNorm/dropout "
                f"layers ({', '.join(list(mods)[:3])}) and is replayed in eval mode: running statistics fixed "
                "at each checkpoint's, no dropout. If those layers trained in training mode, the scores describe "
                "that eval-mode run, not the one trained (expect replay drift). Record again with this diffin "
                "(it notes the modes, the running statistics and the dropout RNG state) to replay it exactly",
                TrainModeWarning, stacklevel=3,
            )
            return
        if fm.train_forward is not None or not any(modes.values()):
            return
        tmf = TrainModeForward(fm.model, modes)
        if tmf.dropout_names and not getattr(self.run, "has_rng", False):
            raise TrainModeError(
                f"the model trained with dropout ({', '.join(tmf.dropout_names[:3])}) but the run at {self.run.path} "
                "holds no RNG states to draw its masks again; record it with this diffin's Recorder (it logs the RNG "
                "state at each step's training forward), or put the dropout modules in eval mode while training"
            )
        fm.enable_train_mode(tmf)

    @property
    def train_mode(self) -> bool:
        """Whether steps replay in training mode (the model has train-mode BatchNorm or dropout)."""
        return self.fm.train_forward is not None

    def masks(self, t: int, theta: Tensor, x: Any) -> dict[str, Tensor]:
        """Step t's dropout masks (drawn again from the recorded RNG state; they depend on shapes
        only, so once per step, cached like batches). θ (P,) or (K, P), x the step's batch (one run's)."""
        tmf = self.fm.train_forward
        if tmf is None or not tmf.dropout_names:
            return {}
        hit = self._masks.get(t)
        if hit is not None:
            self._masks.move_to_end(t)
            return hit
        th = theta if theta.ndim == 1 else theta[0]
        params = self.fm.unflatten(th)
        forwards = self.run.forwards(t) if hasattr(self.run, "forwards") else [
            (self.run.rng_state(t), self.run.cuda_rng_state(t) if hasattr(self.run, "cuda_rng_state") else None, 0, 0)]
        if len(forwards) == 1:
            cpu, cuda, rows, length = forwards[0]
            _check_forward_shape(t, x, rows, length)
            m = self._capture(tmf, params, x, cpu, cuda)
        else:  # gradient accumulation: each micro-batch's masks, from its own forward, in the whole batch
            ids = self.run.batch(t)
            union = self._capture(tmf, params, x, forwards[0][0], forwards[0][1], layout_only=True)  # shapes
            parts, off = [], 0
            for cpu, cuda, rows, length in forwards:
                assert self.train is not None
                xj, _ = self.train.get(ids[off:off + rows])
                _check_forward_shape(t, xj, rows, length)
                parts.append((off, self._capture(tmf, params, xj, cpu, cuda)))
                off += rows
            m = assemble_masks(union, parts)
        m = {k: v.to(self.fm.device) for k, v in m.items()}
        self._masks[t] = m
        while len(self._masks) > 64:
            self._masks.popitem(last=False)
        return m

    def _capture(self, tmf: Any, params: dict[str, Tensor], x: Any, cpu: Tensor, cuda: Tensor | None,
                 layout_only: bool = False) -> dict[str, Tensor]:
        """The masks of one recorded forward, from the generator the loop drew them from: the CPU's for
        a run trained on the CPU, the device's for one trained on CUDA, wherever the scoring runs.
        ``layout_only``: only their shapes are needed (``TrainModeForward.capture_masks``)."""
        here = cuda_device(x) is not None
        if cuda is None and here:
            return tmf.capture_masks(to_device(params, "cpu"), to_device(x, "cpu"), cpu.cpu(), layout_only=layout_only)
        if cuda is not None and not here:
            if not torch.cuda.is_available():
                raise TrainModeError(
                    f"the run at {self.run.path} trained with dropout on a CUDA device: its masks can only be drawn "
                    "again from that device's generator; score it on a CUDA device (device='cuda')"
                )
            return tmf.capture_masks(to_device(params, "cuda"), to_device(x, "cuda"), cpu.cpu(), cuda,
                                     layout_only=layout_only)
        return tmf.capture_masks(params, x, cpu.cpu(), cuda, layout_only=layout_only)

    def at_step(self, t: int, state: TrainState, x: Any, per_run: bool = False) -> Any:
        """Context in which the functional model runs as step t trained (masks, running-stat
        counts); a no-op for models without training-mode layers. ``per_run``: x is (K, B, ...)."""
        if not self.train_mode:
            return contextlib.nullcontext()
        x1 = tree_map(lambda a: a[0], x) if per_run else x
        return self.fm.step(self.masks(t, state.theta, x1), state.buffers)

    # ------------------------------------------------------------------ the optimizer
    @property
    def rule(self) -> OptimizerRule:
        """The optimizer rule with per-coordinate hyper-parameters (built on first use; raises
        :class:`UnsupportedOptimizerError` for optimizers without one)."""
        if self._rule is None:
            self._rule = self._build_rule()
        return self._rule

    def _build_rule(self) -> OptimizerRule:
        kind = self.run.optimizer.kind
        cls = check_rule(self.run)
        groups = optimizer_groups(self.run)
        names = self.fm.spec.names
        where: dict[str, int] = {}
        for gi, g in enumerate(groups):
            for n in g["params"]:
                where[n] = gi
        missing = [n for n in names if n not in where]
        if missing:
            raise UnsupportedOptimizerError(
                f"trainable parameters {missing[:5]} are in none of the optimizer's recorded parameter "
                "groups; give the optimizer every parameter the model trains"
            )
        gidx = torch.cat([torch.full((n,), where[name], dtype=torch.long)
                          for name, n in zip(names, self.fm.spec.numels)]).to(self.fm.device)
        self._group_index = gidx
        hypers = [rule_hyper(kind, g["hyper"]) for g in groups]
        merged: dict[str, Any] = {}
        for key in sorted({k for h in hypers for k in h}):
            vals = [h.get(key) for h in hypers]
            if all(v == vals[0] for v in vals):
                merged[key] = vals[0]
            else:  # numbers (check_rule refused differing switches)
                per = torch.as_tensor([float(v) for v in vals], dtype=self.fm.dtype, device=self.fm.device)
                merged[key] = per[gidx]
        return cls(merged)

    @property
    def needs_gradient(self) -> bool:
        """Whether :meth:`adjoint` needs the step's raw batch gradient g: it does under clipping
        and for every rule but SGD, whose adjoint is linear in the step with coefficients that do
        not depend on g (the SGD sweep then costs no extra gradient per step)."""
        return self.clip_norm is not None or not isinstance(self.rule, SGDRule)

    def lr(self, t: int) -> Scalar:
        """η_t: a float when every parameter group has the same learning rate at step t, else
        a (P,) vector over θ's coordinates."""
        glr = getattr(self.run, "group_lrs", None)
        if glr is None or glr.ndim != 2 or glr.shape[1] == 1:
            return float(self.run.lrs[t])
        row = glr[t]
        if np.all(row == row[0]):
            return float(row[0])
        key = np.ascontiguousarray(row).tobytes()
        vec = self._lr_rows.get(key)
        if vec is None:  # once per distinct row of group rates (a schedule has few, a cosine one T)
            _ = self.rule  # builds the group index
            assert self._group_index is not None
            vec = torch.as_tensor(row, dtype=self.fm.dtype, device=self.fm.device)[self._group_index]
            if len(self._lr_rows) >= 64:
                self._lr_rows.pop(next(iter(self._lr_rows)))
            self._lr_rows[key] = vec
        return vec

    # ------------------------------------------------------------------ checkpoints and batches
    def theta(self, step: int) -> Tensor:
        """θ (P,) at a checkpoint step; its buffers and frozen parameters are installed in the
        functional model (works for any optimizer)."""
        ck = self.run.load_checkpoint(step)
        self._install(ck)
        return self.fm.flatten(ck.params)

    def _install(self, ck: Any) -> None:
        names = set(self.fm.spec.names)
        frozen = {n: t for n, t in ck.params.items() if n not in names}
        self.fm.set_constants({**frozen, **ck.buffers})

    def state(self, step: int) -> TrainState:
        """The training state at a checkpoint: θ, the optimizer's state flattened like θ, and
        its step count. Raises :class:`MissingOptimizerStateError` when the optimizer had taken
        steps but the checkpoint holds none of its state (recorded by an older diffin)."""
        rule = self.rule
        ck = self.run.load_checkpoint(step)
        self._install(ck)
        theta = self.fm.flatten(ck.params)
        raw = getattr(ck, "optimizer_state", None)
        if raw is None:  # a Checkpoint without the optimizer_state field: SGD momentum only
            raw = {"momentum_buffer": ck.momentum} if ck.momentum is not None else {}
        k_rec = getattr(ck, "optimizer_step", None)
        k = int(k_rec) if k_rec is not None else step
        opt: dict[str, Tensor] = {}
        for key in rule.state_keys:
            named = raw.get(key)
            if not named:
                continue
            lacking = [n for n in self.fm.spec.names if n not in named]
            if lacking:
                raise MissingOptimizerStateError(
                    f"checkpoint {step} of {self.run.path} holds {key!r} for some parameters but not "
                    f"for {lacking[:5]}; record the run again (every trained parameter needs its state)"
                )
            opt[key] = self.fm.flatten(named)
        needed = self._needed_state_keys(rule)
        absent = [key for key in needed if key not in opt]
        if absent and (k_rec is None and step > 0 or k_rec is not None and k > 0):
            raise MissingOptimizerStateError(
                f"checkpoint {step} of {self.run.path} holds no {self.run.optimizer.kind} state "
                f"({', '.join(absent)}) although the optimizer had taken steps: the run was recorded "
                "by a diffin that did not save optimizer state. Record it again with this diffin, or "
                "score with 'tracin' or 'if-cg', which do not follow the optimizer"
            )
        stats, buffers = self._stats_of(ck)
        return TrainState(theta, opt, k, stats, buffers)

    def _stats_of(self, ck: Any) -> tuple[Tensor | None, dict[str, Tensor] | None]:
        """A checkpoint's running statistics (flat) and the other buffers train-mode layers update."""
        tmf = self.fm.train_forward
        if tmf is None or not tmf.buffer_names:
            return None, None
        missing = [n for n in tmf.buffer_names if n not in ck.buffers]
        if missing:
            raise TrainModeError(
                f"a checkpoint of {self.run.path} lacks the buffers {missing[:3]} of the model's train-mode "
                "BatchNorm layers; record the run again with this diffin (checkpoints hold every buffer)"
            )
        stats = self.fm.flat_stats(ck.buffers) if self.fm.stat_names else None
        other = {n: ck.buffers[n].to(self.fm.device) for n in tmf.buffer_names if n not in self.fm.stat_names}
        return stats, other

    @staticmethod
    def _needed_state_keys(rule: OptimizerRule) -> tuple[str, ...]:
        if isinstance(rule, SGDRule):
            return rule.state_keys if rule.uses_momentum() else ()
        return rule.state_keys

    def frozen_state(self, at: TrainState, t: int, c0: int) -> TrainState:
        """The state used at step t of the segment starting at checkpoint c0 by the frozen
        variants: θ, optimizer state and step count of the checkpoint. Past the segment's first
        step every state the rule keeps exists (zeros where the checkpoint had none yet), so a
        rule's first-step form (SGD's fresh momentum buffer) applies only where it did."""
        if t == c0:
            return at
        opt = dict(at.opt)
        for key in self._needed_state_keys(self.rule):
            if key not in opt:
                opt[key] = torch.zeros_like(at.theta)
        return TrainState(at.theta, opt, at.k, at.stats, at.buffers)

    def batch(self, t: int) -> tuple[np.ndarray, Tensor, Tensor]:
        """Ids, inputs and targets of the recorded batch of step t (under accumulation, the
        union of its micro-batches)."""
        if self.train is None:
            raise ConfigError("this trajectory was built without training data; pass train=")
        hit = self._batches.get(t)
        if hit is not None:
            self._batches.move_to_end(t)
            return hit
        ids = self.run.batch(t)
        if not self.train.mapped:
            self._keep(t, ids, *self.train.get(ids))
            return self._batches[t]
        # memory-mapped rows: this step's batch and the next ones up to the next checkpoint (a
        # replay reads a segment forward), in one read of their rows in file order
        steps, id_lists = [t], [ids]
        stop = next((c for c in self.run.checkpoint_steps if c > t), self.run.n_steps)
        budget = PREFETCH_BYTES // max(1, self._row_bytes()) - len(ids)
        for s in range(t + 1, min(stop, self.run.n_steps)):
            if s in self._batches:
                break
            nxt = self.run.batch(s)
            budget -= len(nxt)
            if budget < 0:
                break
            steps.append(s)
            id_lists.append(nxt)
        for s, ids_s, (x, y) in zip(reversed(steps), reversed(id_lists),
                                    reversed(self.train.get_many(id_lists)), strict=True):
            self._keep(s, ids_s, x, y)  # step t last: the most recent
        return self._batches[t]

    def _row_bytes(self) -> int:
        """Bytes of one training row as batches hold it (from step batches already read, else 1 KiB)."""
        if self._batch_bytes:
            t = next(iter(self._batch_bytes))
            return max(1, self._batch_bytes[t] // max(1, len(self._batches[t][0])))
        return 1024

    def _keep(self, t: int, ids: np.ndarray, x: Any, y: Any) -> None:
        self._batches[t] = (ids, x, y)
        self._batches.move_to_end(t)
        self._batch_bytes[t] = nbytes(x) + nbytes(y)
        self._cached += self._batch_bytes[t]
        while len(self._batches) > 1 and self._cached > BATCH_CACHE_BYTES:
            old, _ = self._batches.popitem(last=False)
            self._cached -= self._batch_bytes.pop(old)

    # ------------------------------------------------------------------ one step
    def gradient(
        self, theta: Tensor, x: Tensor, y: Tensor, weights: Tensor | None = None, *, per_run: bool = False
    ) -> Tensor:
        """The raw batch gradient at θ: of the mean loss for θ (P,); for θ (K, P) with
        ``weights`` (K, B), of Σ_i w_ki·l_i for each row k (one vmapped pass).

        ``per_run=True``: every run has its own batch: x (K, B, ...), y (K, B, ...), weights
        (K, B) and θ (K, P) are all mapped over their first dimension (runs trained on different
        batch orders side by side, :func:`diffin.groundtruth.retrain_truth`)."""
        if per_run:
            if weights is None:
                raise ValueError("per_run=True needs weights (K, B)")
            if self._gfun_per_run is None:
                self._gfun_per_run = vmap(grad(self._weighted), in_dims=(0, 0, 0, 0))
            return self._gfun_per_run(theta, weights, x, y)
        if weights is None:
            return self.fm.loss_grad(theta, x, y)[0]
        if self._gfun is None:
            self._gfun = vmap(grad(self._weighted), in_dims=(0, 0, None, None))
        return self._gfun(theta, weights, x, y)

    def _weighted(self, th: Tensor, w: Tensor, xx: Any, yy: Any) -> Tensor:
        """The batch's training loss with loss weights w (B,) (the function whose gradient
        :meth:`gradient` vmaps): Σ_i w_i·l_i(θ) for a per-sample loss; for a batch loss, ``fn``
        with member weights |B|·w (``keep``: w = kept/|B|, so ω = 1 kept, 0 removed)."""
        return self.fm.batch_loss(th, xx, yy, w * batch_len(xx))

    def advance(self, state: TrainState, t: int, g: Tensor, stats: Tensor | None = None) -> TrainState:
        """Step t from ``state`` given the raw batch gradient g (P,) or (K, P): clipped (row by
        row) when the run clipped, then the rule's step with η_t. ``stats``: the running
        statistics after the step (train-mode BatchNorm; default: unchanged)."""
        g = self._scaled(g, t)
        gc = clip(g, self.clip_norm) if self.clip_norm is not None else g
        theta, opt = self.rule.step(state.theta, state.opt, gc, self.lr(t), state.k)
        buffers = state.buffers
        if buffers:  # num_batches_tracked counts the step
            buffers = {n: b + 1 if n.endswith("num_batches_tracked") else b for n, b in buffers.items()}
        return TrainState(theta, opt, state.k + 1, state.stats if stats is None else stats, buffers)

    def step(
        self, state: TrainState, t: int, x: Any = None, y: Any = None,
        weights: Tensor | None = None, per_run: bool = False, scale: float = 1.0,
    ) -> tuple[TrainState, Tensor]:
        """One recorded training step: the gradient at θ on step t's batch (or on ``x, y``), in the
        recorded modes (masks, weighted batch statistics, their running-statistics update),
        clipping, the rule's step. Returns the next state and the raw gradient g.

        ``scale``: every batch member's loss weight times ``scale`` (the raw gradient scaled; batch
        statistics, which normalise their weights, unchanged): the run in which each sample has
        weight ``scale`` (``diffin-retrain`` with ``removal_fraction``)."""
        if x is None or y is None:
            _, x, y = self.batch(t)
        with self.at_step(t, state, x, per_run):
            if state.stats is not None:
                g, stats = self.gradient_and_stats(state.theta, state.stats, x, y, weights, per_run=per_run)
                g = g * scale if scale != 1.0 else g
                return self.advance(state, t, g, stats), g
            g = self.gradient(state.theta, x, y, weights, per_run=per_run)
        g = g * scale if scale != 1.0 else g
        return self.advance(state, t, g), g

    def graph_step(self, state: TrainState, t: int) -> tuple[TrainState, Tensor, TrainState]:
        """:meth:`step` of one run (θ (P,)) on the recorded batch with the gradient's graph kept:
        (next state, raw gradient g, the state before the step with the graph attached)."""
        _, x, y = self.batch(t)
        with self.at_step(t, state, x):
            if state.stats is not None:
                sg = self.fm.step_graph(state.theta, state.stats, x, y)
                g, stats = sg.g.detach(), sg.r_new.detach()
                return self.advance(state, t, g, stats), g, dataclasses.replace(state, graph=sg)
            gg = self.fm.grad_graph(state.theta, x, y)
        g = gg.g.detach()
        return self.advance(state, t, g), g, dataclasses.replace(state, graph=gg)

    def gradient_and_stats(
        self, theta: Tensor, stats: Tensor, x: Any, y: Any, weights: Tensor | None = None, *, per_run: bool = False
    ) -> tuple[Tensor, Tensor]:
        """:meth:`gradient` of a model with train-mode BatchNorm (inside :meth:`at_step`), and the
        running statistics after the step: θ (P,), stats (R,) → (P,), (R,); θ (K, P), stats (K, R),
        weights (K, B) → (K, P), (K, R) (x, y (K, B, ...) with ``per_run``)."""
        fm = self.fm
        if weights is None:
            with torch.enable_grad():
                th = theta.detach().requires_grad_(True)
                L, r_new, _ = fm.step_loss(th, stats, x, y)
                (g,) = torch.autograd.grad(L, th, allow_unused=True)
            return (torch.zeros_like(theta) if g is None else g), r_new.detach()
        if per_run not in self._sfun:
            def f(th: Tensor, w: Tensor, r: Tensor, xx: Any, yy: Any) -> tuple[Tensor, Tensor]:
                L, r_new, _ = fm.step_loss(th, r, xx, yy, w * batch_len(xx))
                return L, r_new
            dims = (0, 0, 0, 0, 0) if per_run else (0, 0, 0, None, None)
            self._sfun[per_run] = vmap(grad(f, has_aux=True), in_dims=dims)
        return self._sfun[per_run](theta, weights, stats, x, y)

    def transpose(
        self, t: int, state: TrainState, g: Tensor | None, x: Any, y: Any, theta_bar: Tensor,
        opt_bar: dict[str, Tensor], stats_bar: Tensor | None, mode: str, eps: float | None, dots: str,
    ) -> tuple[Tensor, dict[str, Tensor], Tensor | None, Tensor]:
        """The transpose of step t (docs/method.md §4.7): from the adjoint after the step (θ̄, s̄ and,
        for train-mode BatchNorm, r̄ of the running statistics; each (Q, ·)) to the adjoint before
        it, and the members' terms d (Q, B) (removing z changes f by −d_z/|B| under ``keep``).

        The optimizer rule's transpose gives w (:meth:`adjoint`); then one batch HVP and the
        per-member inner products in the recorded modes (masks fixed, weighted batch statistics):
        by finite differences or exactly (``mode``); with running statistics, one exact VJP through
        the step's loss gradient and its statistics update (:meth:`FlatModel.step_vjp`). A state
        that carries its step's kept gradient graph (a replay with :attr:`keep_graphs`) gets both
        exactly from one backward pass of that graph, whatever ``mode``."""
        W, A_direct, S = self.adjoint(t, state, g, theta_bar, opt_bar)
        graph, state.graph = state.graph, None  # used once: its last backward pass frees it
        if isinstance(graph, StepGraph) and stats_bar is not None:
            HW, d, stats_bar = self.fm.step_graph_vjp(graph, W, stats_bar)
            return A_direct + HW, S, stats_bar, d
        if isinstance(graph, GradGraph):
            HW, d = self.fm.graph_hvp_and_dots(graph, W)
            assert d is not None
            return A_direct + HW, S, stats_bar, d
        with self.at_step(t, state, x):
            if state.stats is not None and stats_bar is not None:
                HW, d, stats_bar = self.fm.step_vjp(state.theta, state.stats, x, y, W, stats_bar)
            else:
                HW, d = self.fm.hvp_and_dots(state.theta, x, y, W, mode=mode, eps=eps, dots=dots)  # type: ignore[arg-type]
        assert d is not None
        return A_direct + HW, S, stats_bar, d

    def adjoint(
        self, t: int, state: TrainState, g: Tensor | None, theta_bar: Tensor, opt_bar: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Transpose of step t's linearisation at ``state`` (docs/method.md §4.3).

        From the adjoint (θ̄_{t+1}, s̄_{t+1}), each (Q, P) or (P,), returns ``w_raw`` (the
        coefficient of the step's raw batch gradient: removing samples changes f by
        ⟨w_raw, Δg⟩; clip transpose applied), θ̄ without the Hessian term, and s̄_t. The full
        θ̄_t is that θ̄ plus H_B(θ_t)·w_raw. ``g`` (the raw gradient at θ_t) may be None when
        :attr:`needs_gradient` is False.
        """
        if g is None and self.needs_gradient:
            raise ValueError("this optimizer's adjoint needs the step's batch gradient g")
        scale = self.grad_scale(t)
        g = None if g is None else self._scaled(g, t)
        gc = g
        if self.clip_norm is not None:
            assert g is not None
            gc = clip(g, self.clip_norm)
        w, th, sb = self.rule.adjoint(state.theta, state.opt, gc, self.lr(t), state.k, theta_bar, opt_bar,  # type: ignore[arg-type]
                                      after=state.opt_after)
        if self.clip_norm is not None:
            w = clip_transpose(w, g, self.clip_norm)  # type: ignore[arg-type]
        return (w * scale if scale != 1.0 else w), th, sb

    def grad_scale(self, t: int) -> float:
        """Step t's gradient as a multiple of the mean-over-the-batch gradient (recorded with
        ``Recorder.step(..., grad_scale=)``; 1 unless the loop summed micro-batch means)."""
        scales = getattr(self.run, "grad_scales", None)
        return 1.0 if scales is None else float(scales[t])

    def _scaled(self, g: Tensor, t: int) -> Tensor:
        s = self.grad_scale(t)
        return g if s == 1.0 else g * s

    # ------------------------------------------------------------------ replay
    def replay_reversed(
        self, c0: int, c1: int, with_grads: bool | None = None, freeze_theta: bool = False,
        batch_of: Callable[[int], tuple[Tensor, Tensor]] | None = None,
        start: TrainState | None = None, scale: float = 1.0,
    ) -> Iterator[tuple[int, TrainState, Tensor | None]]:
        """Yield (t, state before step t, raw gradient g_t or None) for t = c1−1 … c0, replaying
        training forward from checkpoint c0.

        ``with_grads`` (default :attr:`needs_gradient`) keeps g_t with each state. Memory holds
        at most about ``memory_mb`` of states: when a segment's do not fit, anchors are kept
        every s steps and each stretch is replayed again (twice the replay cost, memory
        O(√segment)). The replayed θ_{c1} is compared with the recorded one; the relative drift
        is kept in :attr:`drift` and warned about (:class:`ReplayDriftWarning`) when large.

        ``freeze_theta``: θ stays at θ_{c0} (the frozen variants) while the optimizer state and
        step count follow the segment's batches with gradients at θ_{c0}; no drift check.
        ``batch_of(t) -> (x, y)``: the batch of step t (default: the recorded one; proxy batches
        for ``diffin-expected``). ``start``: the state at c0 to replay from (default: checkpoint
        c0's) and ``scale`` the loss weight of every sample (:meth:`step`); either one makes a run
        other than the recorded one, so no drift check.
        """
        keep_g = self.needs_gradient if with_grads is None else with_grads
        state = self.state(c0) if start is None else start
        length = c1 - c0
        n_state = len(self._needed_state_keys(self.rule))
        per_state = state.theta.numel() * state.theta.element_size() * (1 + n_state + (1 if keep_g else 0))
        cap = max(2, int(self.memory_mb * 2**20 // per_state))
        stride = 1 if length <= cap else math.ceil(length / (cap // 2))
        if stride > cap // 2 + 1:
            raise ConfigError(
                f"a segment of {length} steps needs more than {self.memory_mb} MB of replay memory "
                "even with two-level replay; raise replay_memory_mb or record checkpoints more often"
            )
        anchors: list[tuple[int, TrainState]] = []
        stored: list[tuple[TrainState, Tensor | None]] = []
        first: tuple[TrainState, Tensor, TrainState] | None = None
        graph_from = c1  # steps t >= graph_from keep their gradient graph
        if self.keep_graphs and not freeze_theta and batch_of is None and state.theta.ndim == 1 and stride == 1:
            # keep the gradient graphs of as many of the segment's last steps as fit beside its states
            first, g_bytes = graph_bytes(lambda: self.graph_step(state, c0))
            room = self.memory_mb * 2**20 - length * per_state
            n_graphs = min(length, int(room // max(g_bytes, 1)))
            graph_from = c1 - n_graphs
            if graph_from > c0:
                first = (first[0], first[1], state)  # its graph goes, its step stays

        def forward(st: TrainState, t: int) -> tuple[TrainState, Tensor]:
            if batch_of is None:
                nxt, g = self.step(st, t, scale=scale)
            else:
                nxt, g = self.step(st, t, *batch_of(t), scale=scale)
            return (TrainState(st.theta, nxt.opt, nxt.k), g) if freeze_theta else (nxt, g)

        for t in range(c0, c1):
            if t == c0 and first is not None:  # computed above (stride 1)
                nxt, g, before = first
                stored.append((before, g if keep_g else None))
                state = nxt
            elif stride == 1 and t >= graph_from:
                nxt, g, before = self.graph_step(state, t)
                stored.append((before, g if keep_g else None))
                state = nxt
            elif stride == 1:
                nxt, g = forward(state, t)
                stored.append((state, g if keep_g else None))
                state = nxt
            else:
                if (t - c0) % stride == 0:
                    anchors.append((t, state))
                state, _ = forward(state, t)
        if not freeze_theta and start is None and scale == 1.0:
            self._note_drift(c0, c1, state.theta, state.stats)
        if stride == 1:
            for i in range(length - 1, -1, -1):
                after = (stored[i + 1][0].opt if i + 1 < length else state.opt) if keep_g else None
                yield c0 + i, dataclasses.replace(stored[i][0], opt_after=after), stored[i][1]
            return
        for t_a, st in reversed(anchors):
            local: list[tuple[TrainState, Tensor | None]] = []
            for t in range(t_a, min(t_a + stride, c1)):
                nxt, g = forward(st, t)
                local.append((dataclasses.replace(st, opt_after=nxt.opt if keep_g else None), g if keep_g else None))
                st = nxt
            for i in range(len(local) - 1, -1, -1):
                yield t_a + i, local[i][0], local[i][1]

    def _drift_vector(self, step: int, with_stats: bool) -> Tensor:
        """θ of a checkpoint (its buffers installed, as :meth:`theta`), followed by its running
        statistics when ``with_stats``: one read of the checkpoint."""
        ck = self.run.load_checkpoint(step)
        self._install(ck)
        theta = self.fm.flatten(ck.params)
        stats = self._stats_of(ck)[0] if with_stats else None
        return theta if stats is None else torch.cat([theta, stats])

    def _note_drift(self, c0: int, c1: int, replayed: Tensor, stats: Tensor | None = None) -> None:
        recorded = self._drift_vector(c1, stats is not None)
        start = self._drift_vector(c0, stats is not None)
        if stats is not None:  # the running statistics are part of the state (docs/method.md §4.8)
            replayed = torch.cat([replayed, stats])
        moved = float((recorded - start).norm())
        rel = float((replayed - recorded).norm()) / max(moved, torch.finfo(recorded.dtype).tiny)
        self.drift = max(self.drift, rel)
        tol = 100 * torch.finfo(recorded.dtype).eps ** 0.5
        if rel > tol:
            clip_note = (
                f"the run says the loop clipped the gradient norm to {self.clip_norm}: check that it "
                "called clip_grad_norm_ with that max_norm before every optimizer.step()"
                if self.clip_norm is not None else
                "if the loop clipped gradients, record with Recorder(..., clip_grad_norm=max_norm)"
            )
            warnings.warn(
                f"replaying steps {c0}..{c1} from the checkpoint lands {rel:.2e} (relative to the "
                f"segment's movement) away from the recorded checkpoint {c1}. The scores assume the "
                "recorded loop is reproducible: the same loss_fn (mean over the batch), the recorded "
                "learning rates, no randomness in the forward other than dropout recorded by this diffin "
                f"(no augmentation inside the model), {self.run.optimizer.kind} as recorded; {clip_note}.",
                ReplayDriftWarning,
                stacklevel=3,
            )
