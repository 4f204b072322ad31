"""Record a Hugging Face Trainer run with one callback, then score every training sentence.

A BERT-style classifier built from a small config (no downloads), in its default configuration
(SDPA attention, dropout 0.1 everywhere), a WordPiece tokenizer trained here on Python's own
documentation (``pydoc_data.topics``), AdamW with linear warmup, ``max_grad_norm=1`` and
``gradient_accumulation_steps=2``. The task: which of two documentation topics a sentence comes from.
Runs in seconds on a CPU:  python examples/huggingface_trainer.py
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

import diffin
from diffin.integrations.huggingface import DiffinCallback, sequence_classification_loss, trainer_dataset


def sentences(topic: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+", " ".join(topics[topic].split()))
    return [s for s in parts if 20 <= len(s) <= 200]


def main(out: Path, n_per_class: int = 24) -> None:
    torch.manual_seed(0)
    a, b = sentences("assignment"), sentences("exceptions")
    n = min(len(a), len(b), n_per_class) // 2 * 2          # 2n sentences: whole micro-batches of 4
    a, b = a[:n], b[:n]
    texts, labels = a + b, [0] * len(a) + [1] * len(b)

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    wp.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=special))
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    ds = Dataset.from_dict({"text": texts, "label": labels}).map(
        lambda r: tok(r["text"], truncation=True, max_length=32), batched=True)

    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(config)          # default: sdpa attention, dropout 0.1
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, num_train_epochs=2, learning_rate=5e-4, warmup_steps=2,
                             max_grad_norm=1.0, weight_decay=0.01, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok),
                      callbacks=[DiffinCallback(out / "run", checkpoint_every=4)])   # the one added line
    t0 = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t0

    train = trainer_dataset(trainer)          # the columns the Trainer fed the model (text left out)
    t0 = time.perf_counter()
    scores = diffin.influence(out / "run", model, sequence_classification_loss, train=train, target=train,
                              progress=False)
    t_score = time.perf_counter() - t0
    order = np.argsort(scores)
    print(f"trained {len(ds)} sentences in {t_train:.1f} s, scored them in {t_score:.1f} s")
    print("most harmful to the training loss (score = loss change if removed):")
    for i in order[:3]:
        print(f"  {scores[i]:+.2e}  label {labels[i]}  {texts[i][:70]!r}")
    print("most helpful:")
    for i in order[-3:]:
        print(f"  {scores[i]:+.2e}  label {labels[i]}  {texts[i][:70]!r}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp))
