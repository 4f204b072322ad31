"""The real-text setups ``text-bert`` and ``text-gpt``: data, model, loss and a Hugging Face ``Trainer``
recipe, recorded by :class:`diffin.integrations.huggingface.DiffinCallback`.

Both are built from Python's documentation topics (:mod:`diffin.bench.builtin.text`) with fixed seeds and no
downloads, and trained by the ``Trainer`` as a user would train them: ``torch.optim.AdamW`` in the two
groups the Trainer builds (weight decay on weights, none on biases and LayerNorm), linear warmup then
linear decay, ``max_grad_norm`` clipping, gradient accumulation, the model's default configuration
(SDPA attention, dropout 0.1), the Trainer's own shuffling. They need the ``hf`` extra.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..._errors import ConfigError
from ..._optional import require
from .data import DataSplit, flip_labels
from .text import bert_classifier, gpt2_lm, load_passages, load_topic_sentences


@dataclass
class TrainerRecipe:
    """The ``transformers.TrainingArguments`` of a text setup (the rest at the Trainer's defaults:
    ``adamw_torch`` with β (0.9, 0.999), ε 1e-8)."""

    epochs: float = 3
    batch_size: int = 16
    """``per_device_train_batch_size``: samples per micro-batch."""
    grad_accum: int = 2
    """``gradient_accumulation_steps``: micro-batches per optimizer step."""
    lr: float = 5e-4
    warmup: float = 0.1
    """``warmup_steps``: a fraction (< 1) of the optimizer steps, or a number of steps."""
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 20
    """Optimizer steps between the callback's checkpoints."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs <= 0 or self.checkpoint_every < 1:
            raise ConfigError("batch_size, grad_accum and checkpoint_every must be >= 1 and epochs > 0")

    def arguments(self, out_dir: str | Path, **overrides: Any) -> Any:
        """The ``TrainingArguments`` (CPU, no logging, saving or evaluation, one process)."""
        tf = require("transformers", "transformers", "the text setups", "hf")
        kw: dict[str, Any] = dict(
            per_device_train_batch_size=self.batch_size, gradient_accumulation_steps=self.grad_accum,
            num_train_epochs=self.epochs, learning_rate=self.lr, warmup_steps=self.warmup,
            weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm, lr_scheduler_type="linear",
            seed=self.seed, data_seed=self.seed, report_to=[], logging_strategy="no", save_strategy="no",
            eval_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
        kw.update(overrides)
        return tf.TrainingArguments(str(out_dir), **kw)

    def describe(self) -> str:
        return (f"HF Trainer, AdamW lr {self.lr:g} (weight decay {self.weight_decay:g} on weights), linear warmup "
                f"{self.warmup:g} then linear decay, max_grad_norm {self.max_grad_norm:g}, batch {self.batch_size} × "
                f"{self.grad_accum} accumulated, {self.epochs:g} epochs")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class TokenDataset(Dataset):  # type: ignore[type-arg]
    """Row ``i`` of ``x`` (a dict of (N, L) tensors) with its label ``y[i]`` under ``"labels"``: the
    dict items a Hugging Face model takes."""

    def __init__(self, x: dict[str, Tensor], y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {**{k: v[i] for k, v in self.x.items()}, "labels": self.y[i]}


@dataclass
class TrainerRun:
    """What :func:`train_with_trainer` measured: wall seconds of ``Trainer.train()``, optimizer steps,
    the Trainer's own ``train_runtime`` and mean training loss."""

    seconds: float
    steps: int
    train_runtime: float
    train_loss: float


def train_with_trainer(model: nn.Module, x: dict[str, Tensor], y: Tensor, recipe: TrainerRecipe,
                       out_dir: str | Path, callbacks: Sequence[Any] = (), use_cpu: bool = True,
                       record_to: str | Path | None = None) -> TrainerRun:
    """Train ``model`` on ``(x, y)`` with ``transformers.Trainer`` and ``recipe`` (its scratch folder
    ``out_dir``); ``callbacks`` go to the Trainer; ``record_to``: also record the run there with a
    ``DiffinCallback`` (the recipe's ``checkpoint_every``, replacing a run already there);
    ``use_cpu=False`` lets the Trainer take the accelerator it finds. The model is left in eval mode."""
    tf = require("transformers", "transformers", "the text setups", "hf")
    args = recipe.arguments(out_dir, use_cpu=use_cpu)
    callbacks = list(callbacks)
    if record_to is not None:
        from ...integrations.huggingface import DiffinCallback

        callbacks.append(DiffinCallback(record_to, checkpoint_every=recipe.checkpoint_every, overwrite=True))
    trainer = tf.Trainer(model=model, args=args, train_dataset=TokenDataset(x, y),
                         data_collator=tf.default_data_collator, callbacks=callbacks)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    model.eval()
    return TrainerRun(seconds, int(out.global_step), float(out.metrics.get("train_runtime", seconds)),
                      float(out.training_loss))


@dataclass
class TextSetup:
    """A real-text setup: ``data()`` → split, ``model(split)`` → fresh seeded module, trained by
    :func:`train_with_trainer` with ``recipe``; ``loss_fn`` is the per-sample loss of its outputs."""

    name: str
    description: str
    load: Callable[[], DataSplit]
    build: Callable[[DataSplit], nn.Module]
    recipe: TrainerRecipe
    loss_fn: Callable[[Any, Tensor], Tensor]
    task: str
    """``"classification"`` (labels (N,), mislabel detection) or ``"causal-lm"`` (labels (N, L))."""
    noise: float = 0.0
    n_ground_truth: int = 100
    lds_subsets: int = 20
    """LDS subsets of the benchmark when ``--lds-subsets`` is not given (each costs a replayed run)."""
    dtype: torch.dtype = torch.float64
    extra: dict[str, Any] = field(default_factory=dict)

    def data(self) -> DataSplit:
        split = self.load()
        if self.noise:
            flip_labels(split, self.noise, self.recipe.seed)
        return split

    def model(self, split: DataSplit) -> nn.Module:
        torch.manual_seed(self.recipe.seed)
        return self.build(split).to(self.dtype)

    def with_changes(self, **kw: Any) -> TextSetup:
        return replace(self, **kw)


def _seq_loss(outputs: Any, labels: Tensor) -> Tensor:
    from ...integrations.huggingface import sequence_classification_loss

    return sequence_classification_loss(outputs, labels)


def _lm_loss(outputs: Any, labels: Tensor) -> Tensor:
    from ...integrations.huggingface import causal_lm_loss

    return causal_lm_loss(outputs, labels)


BERT_LENGTH = 32
GPT_LENGTH = 32
TEXT_SETUPS: dict[str, TextSetup] = {}


def _register(s: TextSetup) -> None:
    TEXT_SETUPS[s.name] = s


_register(TextSetup(
    "text-bert", "Python documentation sentences (pydoc_data.topics), which of 6 topic groups each comes from: "
    "1,024 train (10% labels flipped) / 256 val / 256 test, BERT-style tokenizer trained on the training sentences "
    "(512 tokens, sequences of 32); BertForSequenceClassification from a small config (2 layers, hidden 64, 2 heads, "
    "intermediate 128; SDPA attention, dropout 0.1), float64",
    lambda: load_topic_sentences(1024, 256, 256, max_length=BERT_LENGTH, vocab_size=512, seed=0),
    lambda s: bert_classifier(s.vocab_size, s.n_classes, BERT_LENGTH),  # type: ignore[attr-defined]
    TrainerRecipe(epochs=3, batch_size=16, grad_accum=2, lr=1e-3, checkpoint_every=16),
    _seq_loss, "classification", noise=0.1, n_ground_truth=40, lds_subsets=20,
))
_register(TextSetup(
    "text-gpt", "Python documentation passages of 32 byte-level BPE tokens (tokenizer of 512 tokens trained on the "
    "text): 1,024 train / 128 held-out; GPT2LMHeadModel from a small config (2 layers, hidden 64, 2 heads; SDPA "
    "attention, dropout 0.1), float64; target: the mean loss of the held-out passages",
    lambda: load_passages(1024, 128, 0, length=GPT_LENGTH, vocab_size=512, seed=0),
    lambda s: gpt2_lm(s.vocab_size, GPT_LENGTH),  # type: ignore[attr-defined]
    TrainerRecipe(epochs=2, batch_size=16, grad_accum=2, lr=1e-3, checkpoint_every=16),
    _lm_loss, "causal-lm", n_ground_truth=40, lds_subsets=20,
))


def get_text_setup(name: str) -> TextSetup:
    try:
        return TEXT_SETUPS[name]
    except KeyError:
        raise ConfigError(f"unknown text setup {name!r}; available: {', '.join(sorted(TEXT_SETUPS))}") from None
