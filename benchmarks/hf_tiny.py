"""Tiny BERT in its default configuration (SDPA attention, dropout 0.1 everywhere) and LoRA on it, trained by
the Hugging Face Trainer (AdamW, linear warmup, max_grad_norm=1, gradient_accumulation_steps=2) and recorded
by DiffinCallback alone: diffin and tracin against replayed removal (Pearson / Spearman), seconds of scoring
against the Trainer's, checkpoint bytes. Prints a Markdown table, writes JSON; asserts nothing.

    python benchmarks/hf_tiny.py --json hf_tiny.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from scipy.stats import pearsonr, spearmanr

import diffin
from diffin.groundtruth import replay_removal
from diffin.integrations.huggingface import DiffinCallback, sequence_classification_loss

V = 40


def _rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(5, V, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        rows.append({"input_ids": [2, *ids.tolist()], "attention_mask": [1] * (1 + len(ids)),
                     "labels": int(ids[0] > V // 2), "sentence": "unused text column"})
    return rows


def _bert(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=24, num_labels=2)
    return transformers.BertForSequenceClassification(cfg).to(dtype)  # defaults: sdpa, dropout 0.1


def _collate(items: list[dict]) -> dict:
    """DataCollatorWithPadding without a tokenizer: pad on the right to the longest of the batch."""
    L = max(len(it["input_ids"]) for it in items)
    out = {k: torch.tensor([it[k] + [0] * (L - len(it[k])) for it in items]) for k in ("input_ids", "attention_mask")}
    out["labels"] = torch.tensor([it["labels"] for it in items])
    return out


def _train(tmp_path: Path, model: torch.nn.Module, ds, every: int = 3, **overrides) -> Path:
    kw = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
              num_train_epochs=2, learning_rate=5e-4, warmup_steps=2, lr_scheduler_type="linear", max_grad_norm=1.0,
              weight_decay=0.01, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
              disable_tqdm=True)
    kw.update(overrides)
    args = transformers.TrainingArguments(**kw)
    run = tmp_path / "run"
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, data_collator=_collate,
                                   callbacks=[DiffinCallback(run, checkpoint_every=every)])
    trainer.train()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="training sentences")
    ap.add_argument("--json", default="hf_tiny.json", help="where to write the results")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    out = {}
    for name, dtype, lora in [("bert-f64", torch.float64, False), ("bert-f32", torch.float32, False),
                              ("lora-bert-f64", torch.float64, True)]:
        torch.set_default_dtype(dtype)
        tmp = Path(tempfile.mkdtemp())
        ds = datasets.Dataset.from_list(_rows(a.n, 1))
        val = datasets.Dataset.from_list(_rows(16, 2))
        model = _bert(dtype)
        if lora:
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                               lora_dropout=0.0, modules_to_save=["classifier"]))
        t0 = time.perf_counter()
        run = _train(tmp, model, ds, learning_rate=(2e-3 if lora else 5e-4))
        t_train = time.perf_counter() - t0
        torch.set_default_dtype(torch.float32)
        loss = sequence_classification_loss
        truth = replay_removal(run, model, loss, train=ds, target=val, remove=list(range(a.n)), progress=False)
        rec = diffin.load_run(run)
        row: dict = {"n_train": a.n, "steps": rec.n_steps, "train_s": t_train,
                     "theta_size": sum(int(np.prod(rec.param_shapes[n])) for n in rec.trainable),
                     "checkpoint_bytes": max(f.stat().st_size for f in (run / "checkpoints").iterdir())}
        for m in ("diffin", "tracin"):
            t0 = time.perf_counter()
            s = diffin.influence(run, model, loss, train=ds, target=val, method=m, progress=False)
            row[m] = {"pearson": float(pearsonr(s, truth)[0]), "spearman": float(spearmanr(s, truth)[0]),
                      "score_s": time.perf_counter() - t0}
        out[name] = row
    print("| setup | N | steps | diffin Pearson / Spearman | tracin Pearson / Spearman | Trainer s | diffin s | "
          "ratio | θ size | checkpoint bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, r in out.items():
        print(f"| {k} | {r['n_train']} | {r['steps']} | {r['diffin']['pearson']:.4f} / {r['diffin']['spearman']:.4f} "
              f"| {r['tracin']['pearson']:.4f} / {r['tracin']['spearman']:.4f} | {r['train_s']:.2f} | "
              f"{r['diffin']['score_s']:.2f} | {r['diffin']['score_s'] / r['train_s']:.1f}x | {r['theta_size']} | "
              f"{r['checkpoint_bytes']} |")
    Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
