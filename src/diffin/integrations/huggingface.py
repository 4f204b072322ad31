"""Hugging Face Transformers: record a ``Trainer`` run with one callback, score it with loss helpers.

    from diffin.integrations.huggingface import DiffinCallback, sequence_classification_loss
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[DiffinCallback("runs/x", checkpoint_every=50)])
    trainer.train()
    scores = diffin.influence("runs/x", model, sequence_classification_loss, train=ds, target=val_ds)

The callback records what the Trainer does, nothing to thread by hand: the sample ids of every
optimizer step from the Trainer's own batch sampler (its shuffling; under gradient accumulation the
step's batch is the union of its micro-batches), every parameter group's learning rate as the
optimizer used it (warmup and decay schedules), ``max_grad_norm`` clipping, the AdamW groups the
Trainer builds, the modes of the dropout modules and the RNG state of every training forward, so that
scoring replays each step with its own dropout masks — those of the attention too, which Hugging Face
applies inside ``scaled_dot_product_attention`` (diffin redraws them on the CPU exactly;
docs/method.md §4.8). Settings that cannot be replayed are refused when training starts
(:class:`~diffin._errors.UnsupportedTrainingError`, with what to change).

The loss helpers turn a ``ModelOutput`` into one loss per sample, (B,), in nats: the sample's cross-
entropy for sequence classification, its mean over non-ignored tokens (label -100) for token
classification and causal language modelling. ``train=`` and ``target=`` take the ``datasets.Dataset``
the Trainer used (tokenized columns, the label under ``labels``/``label``; :func:`trainer_dataset` gives
it with the columns the Trainer removed left out) or any Dataset of such dict items; batches are padded
on the right to their longest sequence, as ``DataCollatorWithPadding`` pads them.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import UnsupportedTrainingError
from .._optional import require
from .._train_mode import DROPOUT_TYPES
from ..recording.recorder import Recorder

_transformers = require("transformers", "transformers", "diffin.integrations.huggingface", extra="hf")
TrainerCallback = _transformers.TrainerCallback

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (padding, prompts), as in Hugging Face."""


# ---------------------------------------------------------------------------------------- losses
def _logits(outputs: Any) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)):
        logits = outputs[0]
    if logits is None:
        raise TypeError(f"expected a ModelOutput with .logits (or a logits tensor), got {type(outputs).__name__}")
    return logits


def sequence_classification_loss(outputs: Any, labels: Tensor) -> Tensor:
    """Per-sample loss of a ``...ForSequenceClassification`` model, (B,) in nats: cross-entropy of
    the logits (B, C) against integer labels (B,); with one output and float labels (regression), the
    squared error."""
    logits = _logits(outputs)
    if logits.shape[-1] == 1 and labels.is_floating_point():
        return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
    return F.cross_entropy(logits, labels.long(), reduction="none")


def token_classification_loss(outputs: Any, labels: Tensor) -> Tensor:
    """Per-sample loss of a ``...ForTokenClassification`` model, (B,) in nats: the mean cross-entropy
    over the sample's tokens whose label is not -100 (0 for a sample without any)."""
    return _token_mean(_logits(outputs), labels)


def causal_lm_loss(outputs: Any, labels: Tensor) -> Tensor:
    """Per-sample loss of a causal language model, (B,) in nats per token: the mean cross-entropy of
    predicting token j+1 from tokens ≤ j, over the positions whose label is not -100 (labels are the
    input ids, shifted inside, as ``...ForCausalLM`` does)."""
    return _token_mean(_logits(outputs)[:, :-1], labels[:, 1:])


def _token_mean(logits: Tensor, labels: Tensor) -> Tensor:
    valid = labels != IGNORE_INDEX
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1).long(),
                          reduction="none").reshape(labels.shape)
    n = valid.sum(-1)
    return (tok * valid).sum(-1) / n.clamp_min(1).to(tok.dtype)


def token_targets(input_ids: Tensor, token_mask: Tensor, attention_mask: Tensor | None = None
                  ) -> tuple[dict[str, Tensor], Tensor]:
    """A per-token (per-span) target for a causal LM: ``target=token_targets(ids, mask)`` with
    :func:`causal_lm_loss` makes each target sequence's loss the mean over the tokens ``mask`` marks
    (the loss of predicting them), in nats per token; ``pairwise=True`` scores every training sample
    against each of the Q sequences, (N, Q). Shapes: ``input_ids``, ``token_mask`` (Q, L)."""
    if token_mask.shape != input_ids.shape:
        raise ValueError(f"token_mask has shape {tuple(token_mask.shape)}; it must match input_ids "
                         f"{tuple(input_ids.shape)}")
    inputs = {"input_ids": input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    return inputs, input_ids.masked_fill(~token_mask.bool(), IGNORE_INDEX)


def trainer_dataset(trainer: Any) -> Any:
    """The training set as the Trainer's dataloader reads it: with ``remove_unused_columns`` (the
    default) the columns its model does not take are left out, as the Trainer leaves them out."""
    ds = trainer.train_dataset
    if getattr(trainer.args, "remove_unused_columns", False) and hasattr(ds, "column_names"):
        ds = trainer._remove_unused_columns(ds, description="training")
    return ds


# ---------------------------------------------------------------------------------------- callback
class DiffinCallback(TrainerCallback):  # type: ignore[misc,valid-type]
    """Records a ``transformers.Trainer`` run into ``run_dir`` for diffin.

    Args:
        run_dir: the run folder (see :class:`diffin.Recorder`).
        checkpoint_every: save θ and the optimizer state every this many optimizer steps.
        overwrite: replace a recording already in ``run_dir``.

    Refused at ``on_train_begin`` (:class:`~diffin._errors.UnsupportedTrainingError`): DeepSpeed, FSDP,
    several processes or GPUs, ``torch_compile``, gradient checkpointing, fp16 (its loss scaler skips
    steps), bf16 together with dropout, ``label_smoothing_factor``, resuming from a Trainer checkpoint,
    an iterable dataset (no sample ids), and on a GPU attention dropout inside a fused attention kernel
    (train with ``attn_implementation="eager"``). A token-level loss that the Trainer normalises by the
    number of tokens of the accumulated batch is refused at the step where two samples carry different
    numbers of tokens (diffin's per-sample loss is each sample's mean: pack sequences to one length).
    How the Trainer weighs each step's samples (the sum of micro-batch means, or a token sum over the
    tokens it counted, e.g. (L − 1)/L of the mean for ``GPT2LMHeadModel``) is recorded as the step's
    ``grad_scale``.
    """

    def __init__(self, run_dir: str | os.PathLike[str], checkpoint_every: int = 50, *, overwrite: bool = False
                 ) -> None:
        self.run_dir = Path(run_dir)
        self.checkpoint_every = checkpoint_every
        self.overwrite = overwrite
        self.recorder: Recorder | None = None
        self._fifo: deque[np.ndarray] = deque()
        self._micro: list[np.ndarray] = []
        self._counts: set[int] = set()
        self._hook: Any = None
        self._post: Any = None
        self._weights: list[float | None] = []  # per micro-batch: its loss = weight · Σ per-sample losses
        self._loader: Any = None
        self._tap: _IdTap | None = None
        self._accumulation = 1

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, train_dataloader: Any = None, **kwargs: Any) -> None:
        if model is None or optimizer is None or train_dataloader is None:
            raise UnsupportedTrainingError("DiffinCallback needs the Trainer's model, optimizer and train dataloader")
        _refuse_unreplayable(args, state, model, train_dataloader)
        self._accumulation = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
        max_norm = float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None
        self.recorder = Recorder(self.run_dir, model, optimizer, self.checkpoint_every, seed=int(args.seed),
                                 n_train=len(train_dataloader.dataset), overwrite=self.overwrite,
                                 clip_grad_norm=max_norm)
        loader = train_dataloader
        while getattr(loader, "base_dataloader", None) is not None:  # accelerate's DataLoaderShard wraps one
            loader = loader.base_dataloader
        self._loader = loader
        self._tap = _IdTap(loader.batch_sampler, self._fifo)
        object.__setattr__(loader, "batch_sampler", self._tap)  # DataLoader forbids plain assignment
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self._post = model.register_forward_hook(self._post_forward, with_kwargs=True)

    def _pre_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if not module.training:
            return
        if not self._fifo:
            raise UnsupportedTrainingError(
                "a training-mode forward ran without a batch from the Trainer's dataloader: DiffinCallback takes "
                "each step's ids from the Trainer's batch sampler, so run no other training-mode forward of the model "
                "during Trainer.train() (call model.eval() first)"
            )
        self._micro.append(self._fifo.popleft())
        labels = kwargs.get("labels")
        if isinstance(labels, Tensor) and labels.ndim >= 2 and kwargs.get("num_items_in_batch") is not None:
            valid = labels != IGNORE_INDEX
            self._counts |= {int(c) for c in valid.sum(-1).tolist()}
            shifted = {int(c) for c in valid[..., 1:].sum(-1).tolist()}
            if len(self._counts) > 1 and len(shifted) > 1:
                raise UnsupportedTrainingError(
                    f"the Trainer normalises this token-level loss by the number of tokens of the accumulated batch, "
                    f"and its samples carry different numbers of tokens ({sorted(self._counts)[:5]}): a sample's "
                    "weight in the step then depends on its batch mates, while diffin's per-sample loss is each "
                    "sample's mean over its tokens. Pack the text into sequences of one length (no padding)"
                )

    def _post_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """How the Trainer weighs this micro-batch. With ``num_items_in_batch`` passed to the model it does
        not divide the loss by the number of micro-batches, and the model's loss is either its plain mean
        over the micro-batch (BERT's sequence classification head ignores the count) or its sum over the
        step's ``num_items_in_batch`` items (a token-level loss): noted here as the weight ``a`` of this
        micro-batch's loss, ``loss = a · Σ_i l_i`` over diffin's per-sample losses l_i, so that the step's
        ``grad_scale`` (:meth:`on_step_end`) is the Trainer's step gradient over the mean one, whatever
        the Trainer counted (it counts a ``GPT2LMHeadModel``'s unshifted labels, L per sequence of L
        tokens, while its loss sums the L − 1 shifted ones)."""
        if not module.training:
            return
        n_items = kwargs.get("num_items_in_batch")
        labels = kwargs.get("labels")
        loss = getattr(output, "loss", None)
        if not isinstance(loss, Tensor) and self._accumulation > 1:
            raise UnsupportedTrainingError(
                "the model computed no loss in this training forward, so the Trainer computes it outside the model "
                "(compute_loss_func, or a compute_loss override), and with gradient_accumulation_steps="
                f"{self._accumulation} how that loss weighs each micro-batch (a mean, or a sum over "
                "num_items_in_batch) cannot be told from the model's outputs. Let the model compute its loss from "
                "labels=, or set gradient_accumulation_steps=1 (a loss computed outside the model is then taken to be "
                "the mean of the per-sample losses diffin scores with)"
            )
        if n_items is None and isinstance(labels, Tensor) and labels.ndim >= 2 and isinstance(loss, Tensor):
            # no num_items_in_batch (a model that takes no loss kwargs): the Trainer divides the model's mean by the
            # number of micro-batches, right only if that mean weighs every sample alike (equal token counts)
            _micro_batch_weight(output, labels, float(max(int((labels != IGNORE_INDEX).sum()), 1)))
        if n_items is None or not isinstance(labels, Tensor) or not isinstance(loss, Tensor):
            self._weights.append(None)
            return
        self._weights.append(_micro_batch_weight(output, labels, float(n_items)))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is None:
            return
        micro, self._micro, self._counts = self._micro, [], set()
        weights, self._weights = self._weights, []
        if len({len(m) for m in micro}) > 1:
            raise UnsupportedTrainingError(
                f"step {state.global_step}: micro-batches of {[len(m) for m in micro]} samples: the Trainer averages "
                "their mean losses, which weighs the samples of a smaller one more; set dataloader_drop_last=True "
                "(or a training set size divisible by per_device_train_batch_size)"
            )
        self.recorder.step(micro, grad_scale=_step_scale(weights, sum(len(m) for m in micro), state.global_step))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.close()
        for h in (self._hook, self._post):
            if h is not None:
                h.remove()
        self._hook = self._post = None
        if self._loader is not None and self._tap is not None:
            object.__setattr__(self._loader, "batch_sampler", self._tap.inner)
            self._loader = self._tap = None


def _micro_batch_weight(output: Any, labels: Tensor, n_items: float) -> float:
    """The weight a of a micro-batch's loss over diffin's per-sample losses l_i (those of
    :func:`sequence_classification_loss`, :func:`token_classification_loss`, :func:`causal_lm_loss`):
    ``loss = a · Σ_i l_i``, told apart from the per-sample losses recomputed from the logits. Sequence
    labels (B,): the mean (a = 1/B) or the sum over ``n_items`` (a = 1/n_items). Token labels (B, L),
    shifted (causal LM) or not: the mean over the micro-batch's tokens or their sum over ``n_items``,
    which is ``a · Σ_i l_i`` with a = c/(B·c) or c/n_items when every sample carries c tokens.
    Raises :class:`UnsupportedTrainingError` when the loss is none of these, or weighs samples by their
    numbers of tokens (samples that carry different numbers)."""
    with torch.no_grad():
        loss = float(output.loss.detach())
        logits = _logits(output).detach()
        cands: list[tuple[float, float, set[int]]] = []  # (the loss it would be, a, tokens per sample)
        if labels.ndim == 1:
            per = sequence_classification_loss(logits, labels)
            cands += [(float(per.mean()), 1.0 / len(per), set()), (float(per.sum()) / n_items, 1.0 / n_items, set())]
        else:
            for lg, lb in ((logits, labels), (logits[:, :-1], labels[:, 1:])):
                valid = lb != IGNORE_INDEX
                tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), lb.clamp_min(0).reshape(-1).long(),
                                      reduction="none").reshape(lb.shape) * valid
                counts = valid.sum(-1)
                c = {int(v) for v in counts.tolist()}
                total = max(int(counts.sum()), 1)
                cands += [(float(tok.sum()) / total, max(c) / total, c),
                          (float(tok.sum()) / n_items, max(c) / n_items, c)]
    value, weight, counts = min(cands, key=lambda v: abs(v[0] - loss))
    if abs(value - loss) > 1e-4 * max(1.0, abs(loss)):
        raise UnsupportedTrainingError(
            f"cannot tell how the model's loss ({loss:.6g}) weighs its micro-batch: it is neither the mean of the "
            "per-sample losses nor their sum over num_items_in_batch; DiffinCallback supports the cross-entropy losses "
            "of the sequence classification, token classification and causal LM heads"
        )
    if len(counts) > 1:
        raise UnsupportedTrainingError(
            f"the model's token-level loss weighs each sample by its number of tokens, and the samples of this "
            f"micro-batch carry different numbers ({sorted(counts)[:5]}), while diffin's per-sample loss is each "
            "sample's mean over its tokens. Pack the text into sequences of one length (no padding)"
        )
    return weight


def _step_scale(weights: list[float | None], n_samples: int, step: int) -> float:
    """A step's ``grad_scale`` (its gradient over the mean one over its ``n_samples``) from its micro-batches'
    weights (:func:`_micro_batch_weight`; ``None``: the Trainer divided a mean loss by their number, scale 1)."""
    if all(w is None for w in weights):
        return 1.0
    if any(w is None for w in weights) or max(weights) - min(weights) > 1e-12 * max(weights):  # type: ignore[type-var,operator]
        raise UnsupportedTrainingError(
            f"step {step}: the Trainer weighed the micro-batches of one step differently ({weights}): their samples "
            "carry different numbers of tokens; pack the text into sequences of one length (no padding)")
    return float(weights[0]) * n_samples  # type: ignore[arg-type]


class _IdTap:
    """The Trainer's batch sampler, noting the indices of every batch it hands out (in order: the
    DataLoader's workers and prefetching return batches in the sampler's order)."""

    def __init__(self, inner: Any, fifo: deque[np.ndarray]) -> None:
        self.inner = inner
        self._fifo = fifo

    def __iter__(self) -> Any:
        for batch in self.inner:
            self._fifo.append(np.asarray(list(batch), dtype=np.int64))
            yield batch

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _refuse_unreplayable(args: Any, state: Any, model: nn.Module, loader: Any) -> None:
    """Raise :class:`UnsupportedTrainingError` for what diffin cannot replay, saying what to change."""
    def no(what: str, fix: str) -> UnsupportedTrainingError:
        return UnsupportedTrainingError(f"DiffinCallback cannot record {what}: {fix}")

    if getattr(args, "deepspeed", None):
        raise no("a DeepSpeed run (its optimizer and sharded states are not torch.optim's)",
                 "train without deepspeed= (one process, torch's AdamW)")
    if getattr(args, "fsdp", None):
        raise no("an FSDP run (sharded parameters)", "train without fsdp=")
    if int(getattr(args, "world_size", 1)) > 1 or int(getattr(args, "n_gpu", 1)) > 1:
        raise no("a run over several processes or GPUs", "train on one device (CUDA_VISIBLE_DEVICES=0, no torchrun)")
    if getattr(args, "torch_compile", False):
        raise no("a torch.compile'd model (its fused graph draws dropout differently from the eager replay)",
                 "set torch_compile=False")
    if getattr(args, "gradient_checkpointing", False) or getattr(model, "is_activation_checkpointing", False):
        raise no("gradient checkpointing (the replay recomputes every step's forward itself)",
                 "set gradient_checkpointing=False")
    if getattr(args, "label_smoothing_factor", 0.0):
        raise no("label_smoothing_factor (the Trainer's loss is then not the model's per-sample loss)",
                 "set label_smoothing_factor=0")
    if getattr(args, "fp16", False):
        raise no("fp16 training (its loss scaler skips steps and rescales gradients)",
                 "train in float32, or in bf16 without dropout")
    if int(getattr(state, "global_step", 0)) > 0:
        raise no("a run resumed from a Trainer checkpoint", "record the training from its first step")
    if getattr(loader, "batch_sampler", None) is None:
        raise no("an iterable dataset (no sample ids)", "give the Trainer a map-style dataset")
    bs, n = int(getattr(args, "per_device_train_batch_size", 1)), len(loader.dataset)
    drop_last = getattr(args, "dataloader_drop_last", False)
    if int(getattr(args, "gradient_accumulation_steps", 1)) > 1 and n % bs and not drop_last:
        raise no(f"gradient accumulation over micro-batches of unequal size ({n} samples in batches of {bs}: the "
                 "Trainer averages the micro-batch means, weighing the samples of the short one more)",
                 "set dataloader_drop_last=True, or use a training set whose size per_device_train_batch_size divides")
    dropout = any(isinstance(m, DROPOUT_TYPES) and m.p > 0 for m in model.modules())
    if getattr(args, "bf16", False) and dropout:
        raise no("bf16 autocast with dropout (masks drawn in bf16 cannot be drawn again in the float32 replay)",
                 "train in float32, or set every dropout probability to 0")
    cfg = getattr(model, "config", None)
    attn = getattr(cfg, "_attn_implementation", None)
    p_attn = max((float(v) for k, v in vars(cfg).items()
                  if ("dropout" in k or "pdrop" in k) and "att" in k and isinstance(v, float)),
                 default=0.0) if cfg is not None else 0.0
    on_gpu = any(p.device.type != "cpu" for p in model.parameters())
    if on_gpu and p_attn > 0 and attn not in (None, "eager"):
        raise no(f"attention dropout inside the fused {attn} attention kernel on a GPU (its random numbers cannot "
                 "be drawn again outside the kernel)",
                 "build the model with attn_implementation='eager', or set the attention dropout to 0 "
                 "(on the CPU the default 'sdpa' is replayed exactly)")
    if torch.get_default_dtype() not in (torch.float32, torch.float64):
        raise no(f"default dtype {torch.get_default_dtype()}", "train in float32 or float64")
