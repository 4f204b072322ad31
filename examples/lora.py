"""LoRA adapters on a small GPT-2-style model, recorded with diffin.Recorder, scored per token.

Only the adapters train: they alone enter θ and the checkpoints (the frozen base is fingerprinted),
so a run of a large base model costs the adapters' size per checkpoint. The target is the loss of
chosen tokens of held-out sequences (``token_targets``), one column per sequence (``pairwise=True``).
Runs in seconds on a CPU:  python examples/lora.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

import diffin
from diffin.integrations.huggingface import causal_lm_loss, token_targets


def main(out: Path) -> None:
    torch.manual_seed(0)
    V, L, N = 64, 12, 32
    base = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=L, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                      eos_token_id=0))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0))
    ids = torch.randint(0, V, (N, L))
    ids[:, 1::2] = (ids[:, 0::2] + 1) % V                    # a learnable rule: every odd token follows its left one
    train = ({"input_ids": ids}, ids)                          # inputs, labels (the ids: causal_lm_loss shifts them)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    with diffin.Recorder(out / "run", model, opt, checkpoint_every=4) as rec:
        for _epoch in range(2):
            for b in torch.randperm(N).reshape(-1, 8):
                loss = causal_lm_loss(model(input_ids=ids[b]), ids[b]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.step(b)
    run = diffin.load_run(out / "run")
    n_theta = sum(int(np.prod(run.param_shapes[n])) for n in run.trainable)
    print(f"θ: {len(run.trainable)} adapter tensors, {n_theta} numbers; the frozen base is only fingerprinted: "
          f"{run.frozen_sha256 is not None}")

    q = torch.randint(0, V, (3, L))
    q[:, 1::2] = (q[:, 0::2] + 1) % V
    mask = torch.zeros_like(q, dtype=torch.bool)
    mask[:, 5] = True                                          # the loss of token 5 of each query sequence
    scores = diffin.influence(out / "run", model, causal_lm_loss, train=train, target=token_targets(q, mask),
                              pairwise=True, progress=False)    # (N, 3): loss change of each token if removed
    print("scores", scores.shape, "most helpful training sequence per query token:", scores.argmax(0).tolist())


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp))
