"""When can Diff-In scores be trusted? The trust measures against replayed removal, run by run.

For each case: train and record, score with ``diffin`` (``check_removals=2``: the two largest
predicted removals replayed for real), replay the removal of K more samples (random) and correlate.
Prints one table row per case (adjoint growth, score scale, removal error, whether the
UnstableInfluenceWarning fired, Pearson / Spearman against replayed removal, and the same for the
horizon-limited sweep and TracIn) and writes JSON:

    python benchmarks/trust.py --cases bert-5e-4,bert-2e-3 --json docs/bench-trust/trust.json
    python benchmarks/trust.py --cases mnist5k-mlp,mnist5k-mlp-adamw,mnist5k-mlp-clip --json ...

Cases: ``bert-<lr>`` (a tiny BertForSequenceClassification from a small config, 2 layers, hidden 64,
eager attention, dropout 0, on 256 synthetic token sequences of 32 tokens, 4 classes, 15% flipped
labels, AdamW with two groups, batch 16, ``--bert-epochs`` epochs, float64; needs transformers) and
the names of built-in setups (``diffin train --setup NAME``'s recipe). Timings are not the point and
are not asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

import diffin
from diffin.groundtruth import replay_removal

VOCAB, LENGTH, N_BERT, N_VAL, CLASSES, BATCH = 64, 32, 256, 128, 4, 16


# ----------------------------------------------------------------------------- the tiny BERT case
def bert_data(seed: int = 0, noise: float = 0.15, n_train: int = N_BERT, length: int = LENGTH
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token sequences (n_train + N_VAL, length) of random filler with one of 4 keyword tokens placed
    at 3 random positions; the label is the keyword, ``noise`` of the training labels flipped."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + N_VAL
    X = torch.randint(CLASSES, VOCAB, (n, length), generator=g)
    k = torch.randint(0, CLASSES, (n,), generator=g)
    pos = torch.randint(0, length, (n, 3), generator=g)
    for j in range(3):
        X[torch.arange(n), pos[:, j]] = k
    flip = (torch.rand(n, generator=g) < noise) & (torch.arange(n) < n_train)
    y = torch.where(flip, (k + 1) % CLASSES, k)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


class TinyBert(nn.Module):
    """``BertForSequenceClassification`` from a small config (no weights; 2 layers, hidden 64, eager
    attention, dropout 0, so eval mode is the training math), input ids (B, L) → logits (B, 4)."""

    def __init__(self, dtype: torch.dtype = torch.float64, seed: int = 0, length: int = LENGTH) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification  # noqa: PLC0415 - optional

        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=length, num_labels=CLASSES,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
        self.bert = BertForSequenceClassification(cfg).to(dtype).eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).logits


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def train_bert(run: str | Path, lr: float, epochs: int, seed: int = 0, eps: float = 1e-8, n_train: int = N_BERT,
               length: int = LENGTH, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """A plain AdamW loop (decay on matrices only) over shuffled batches of 16, recorded into ``run``."""
    X, y, Xv, yv = bert_data(seed, n_train=n_train, length=length)
    model = TinyBert(dtype, seed, length)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, eps=eps)
    order = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with diffin.Recorder(run, model, opt, checkpoint_every=16, overwrite=True) as rec:
        for _ in range(epochs):
            for ids in order.permutation(n_train).reshape(-1, BATCH):
                loss = ce(model(X[ids]), y[ids]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.step(ids)
    with torch.no_grad():
        val = float(ce(model(Xv), yv).mean())
    return {"train_seconds": time.perf_counter() - t0, "val_loss": val, "steps": rec.steps}


# ----------------------------------------------------------------------------- one case
def case(name: str, workdir: Path, bert_epochs: int, k: int, bert_n: int = N_BERT, bert_length: int = LENGTH,
         bert_dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    run = workdir / name
    if name.startswith("bert-"):
        lr = float(name.split("-", 1)[1])
        info = train_bert(run, lr, bert_epochs, n_train=bert_n, length=bert_length, dtype=bert_dtype)
        X, y, Xv, yv = bert_data(n_train=bert_n, length=bert_length)

        def make() -> nn.Module:
            return TinyBert(bert_dtype, 0, bert_length)

        loss: Any = ce
        train, target = (X, y), (Xv, yv)
        info["recipe"] = (f"tiny BERT, {bert_n} sequences of {bert_length} tokens, AdamW lr {lr:g}, {bert_epochs} "
                          f"epochs, batch {BATCH}, {str(bert_dtype).removeprefix('torch.')}")
    else:
        from diffin.bench.builtin import get_setup  # noqa: PLC0415 - the bench layer, benchmarks only
        from diffin.bench.builtin import train as train_setup  # noqa: PLC0415

        setup = get_setup(name)
        data = setup.data()
        res = train_setup(setup.model(data), data.x_train, data.y_train, setup.train, run, overwrite=True,
                          loss=setup.loss_fn)

        def make(setup: Any = setup, data: Any = data) -> nn.Module:
            return setup.model(data)

        loss, train, target = setup.loss_fn, (data.x_train, data.y_train), (data.x_val, data.y_val)
        info = {"train_seconds": res.seconds, "steps": res.steps, "recipe": setup.description}
    row: dict[str, Any] = {"case": name, **info}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        result = diffin.score(run, make(), loss, train=train, target=target, progress=False, check_removals=2)
        row["score_seconds"] = time.perf_counter() - t0
    trust = result.diagnostics["trust"]
    row["warned"] = any(issubclass(w.category, diffin.UnstableInfluenceWarning) for w in caught)
    row.update({key: trust.get(key) for key in ("adjoint_growth", "score_scale", "target_size", "replay_drift",
                                                "removal_error", "stable", "reasons")})
    n = len(result.scores)
    rng = np.random.default_rng(1)
    ids = rng.choice(n, size=min(k, n), replace=False)
    real = replay_removal(run, make(), loss, train=train, target=target, remove=ids.tolist(), progress=False)
    row["replayed_abs_max"] = float(np.abs(real).max())
    row["scores_abs_max"] = float(np.abs(result.scores).max())

    def agree(s: np.ndarray) -> tuple[float, float]:
        return float(np.corrcoef(s[ids], real)[0, 1]), float(spearmanr(s[ids], real).statistic)

    row["pearson"], row["spearman"] = agree(result.scores)
    steps = int(row["steps"])
    for h in sorted({steps // 4, steps // 10}):
        if h >= 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s_h = diffin.influence(run, make(), loss, train=train, target=target, progress=False, horizon=h)
            row[f"pearson_horizon_{h}"], row[f"spearman_horizon_{h}"] = agree(s_h)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s_t = diffin.influence(run, make(), loss, train=train, target=target, progress=False, method="tracin")
    row["pearson_tracin"], row["spearman_tracin"] = agree(s_t)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="bert-5e-4,bert-2e-3")
    ap.add_argument("--bert-epochs", type=int, default=16)
    ap.add_argument("--bert-n", type=int, default=N_BERT, help="training sequences of the bert cases")
    ap.add_argument("--bert-length", type=int, default=LENGTH, help="tokens per sequence of the bert cases")
    ap.add_argument("--bert-dtype", choices=["float32", "float64"], default="float64")
    ap.add_argument("--k", type=int, default=24, help="random samples whose removal is replayed per case")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="diffin-trust-"))
    rows = []
    for name in args.cases.split(","):
        row = case(name.strip(), workdir, args.bert_epochs, args.k, args.bert_n, args.bert_length,
                   getattr(torch, args.bert_dtype))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "reasons"}), flush=True)
    cols = ["case", "steps", "adjoint_growth", "score_scale", "removal_error", "warned", "pearson", "spearman",
            "pearson_tracin"]
    hcols = sorted({k for r in rows for k in r if k.startswith("pearson_horizon_")})
    print("| " + " | ".join(cols + hcols) + " |")
    print("|" + "---|" * (len(cols) + len(hcols)))
    for r in rows:
        vals = [r.get(c) for c in cols + hcols]
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in vals) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args)},
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
