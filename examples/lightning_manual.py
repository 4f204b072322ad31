"""Record a Lightning run under manual optimization and score every training sample.

    python examples/lightning_manual.py              # a few seconds on a laptop CPU
    python examples/lightning_manual.py --epochs 1   # the test suite's tiny run

The ``training_step`` does its own ``zero_grad`` / ``manual_backward`` / ``clip_gradients`` /
``step`` / scheduler step; the callback notices each optimizer step and records it with the ids of
its batch, which here come with the batch (``diffin.with_ids``: batches ``(ids, x, y)``). Under
manual optimization the callback cannot see the clipping threshold, so it is passed as
``clip_grad_norm=``. The model has dropout: the callback records each step's masks (the forward
in ``training_step`` goes through ``self(x)``, the recorded module).
"""

from __future__ import annotations

import argparse
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

CLIP = 2.0


class ManualClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        _ids, x, y = batch
        opt, sched = self.optimizers(), self.lr_schedulers()
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()

    def configure_optimizers(self) -> tuple[list, list]:
        opt = torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-4)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    pl.seed_everything(0, verbose=False)
    rng = np.random.default_rng(0)

    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    Y = torch.tensor(digits.target)
    perm = rng.permutation(len(X))
    Xt, Yt, Xv, Yv = X[perm[:1400]], Y[perm[:1400]].clone(), X[perm[1400:]], Y[perm[1400:]]
    flipped = rng.choice(1400, size=140, replace=False)
    Yt[flipped] = (Yt[flipped] + torch.tensor(rng.integers(1, 10, size=140))) % 10
    train = TensorDataset(Xt, Yt)
    loader = DataLoader(diffin.with_ids(train), batch_size=64, shuffle=True)  # yields (ids, x, y)

    module = ManualClassifier()
    run_dir = tempfile.mkdtemp(prefix="diffin-lightning-manual-")
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[DiffinCallback(run_dir, checkpoint_every=20, clip_grad_norm=CLIP)])
    trainer.fit(module, loader)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="none")

    scores = diffin.influence(run_dir, module, loss_fn, train=train, target=(Xv, Yv), progress=False)
    worst = np.argsort(scores)[:140]
    print(f"recorded {diffin.load_run(run_dir).n_steps} optimizer steps (manual optimization, dropout masks "
          f"included); most harmful ids: {worst[:10].tolist()}")
    print(f"{np.isin(worst, flipped).mean():.0%} of the 140 most harmful samples have a flipped label "
          "(10% at random)")


if __name__ == "__main__":
    main()
