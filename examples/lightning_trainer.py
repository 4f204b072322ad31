"""Record a Lightning training run with diffin's callback and score every training sample.

    python examples/lightning_trainer.py              # about 10 seconds on a laptop CPU
    python examples/lightning_trainer.py --epochs 1   # the test suite's tiny run

Automatic optimization: AdamW with two parameter groups (no decay on biases), linear warmup then
cosine decay stepped every optimizer step, gradient-norm clipping and gradient accumulation, all
set the usual Lightning way; diffin adds one callback. The data is scikit-learn's digits with 10%
of the labels flipped, read through an ordinary shuffled DataLoader: the callback takes each
batch's sample ids from the DataLoader's sampler. The most harmful samples are then listed with
how many of them carry a flipped label.
"""

from __future__ import annotations

import argparse
import math
import tempfile

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import diffin
from diffin.integrations.lightning import DiffinCallback


class DigitsClassifier(pl.LightningModule):
    def __init__(self, total_steps: int, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        self.total_steps, self.lr = total_steps, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> dict:
        decay = [p for n, p in self.named_parameters() if n.endswith("weight")]
        rest = [p for n, p in self.named_parameters() if not n.endswith("weight")]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                 {"params": rest, "weight_decay": 0.0}], lr=self.lr)
        warmup = max(1, self.total_steps // 10)

        def schedule(t: int) -> float:  # linear warmup, then cosine decay
            if t < warmup:
                return (t + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, self.total_steps - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--n-train", type=int, default=1400)
    args = ap.parse_args()
    pl.seed_everything(0, verbose=False)
    rng = np.random.default_rng(0)

    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    Y = torch.tensor(digits.target)
    perm = rng.permutation(len(X))
    n = args.n_train
    Xt, Yt, Xv, Yv = X[perm[:n]], Y[perm[:n]].clone(), X[perm[n:]], Y[perm[n:]]
    flipped = rng.choice(n, size=n // 10, replace=False)
    Yt[flipped] = (Yt[flipped] + torch.tensor(rng.integers(1, 10, size=len(flipped)))) % 10
    train = TensorDataset(Xt, Yt)  # item i is (x_i, y_i): score i belongs to it

    batch, accumulate = 32, 2
    loader = DataLoader(train, batch_size=batch, shuffle=True, drop_last=True)
    steps = args.epochs * (len(loader) // accumulate)
    module = DigitsClassifier(total_steps=steps)

    run_dir = tempfile.mkdtemp(prefix="diffin-lightning-")
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, gradient_clip_val=1.0,
        accumulate_grad_batches=accumulate, limit_train_batches=len(loader) // accumulate * accumulate,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[DiffinCallback(run_dir, checkpoint_every=20)],  # the one line diffin adds
    )
    trainer.fit(module, loader)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="none")

    result = diffin.score(run_dir, module, loss_fn, train=train, target=(Xv, Yv), progress=False)
    scores = result.scores  # ≈ validation loss without sample i − with it: negative = hurt
    k = len(flipped)
    worst = np.argsort(scores)[:k]
    print(f"recorded {diffin.load_run(run_dir).n_steps} optimizer steps in {run_dir}; "
          f"scored {len(scores)} samples with {result.variant}")
    print(f"most harmful ids: {worst[:10].tolist()}")
    print(f"{np.isin(worst, flipped).mean():.0%} of the {k} most harmful samples have a flipped label "
          "(10% at random)")


if __name__ == "__main__":
    main()
