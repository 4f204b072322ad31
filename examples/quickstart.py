"""Record a plain PyTorch training loop with diffin and score every training sample.

    python examples/quickstart.py

Trains a small MLP on scikit-learn's digits with 10% of the labels flipped, reading the data
through an ordinary shuffled DataLoader, then prints which samples hurt the validation loss
most and how many of them carry a flipped label. Takes a few seconds on a laptop CPU.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import diffin

torch.manual_seed(0)
rng = np.random.default_rng(0)

# --- data: 1,400 training samples (140 labels flipped), 397 validation samples -------------------
digits = load_digits()
X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
Y = torch.tensor(digits.target)
perm = rng.permutation(len(X))
Xt, Yt, Xv, Yv = X[perm[:1400]], Y[perm[:1400]].clone(), X[perm[1400:]], Y[perm[1400:]]
flipped = rng.choice(len(Xt), size=140, replace=False)
Yt[flipped] = (Yt[flipped] + torch.tensor(rng.integers(1, 10, size=140))) % 10
train = TensorDataset(Xt, Yt)  # item i is (x_i, y_i)

# --- the training loop: plain PyTorch plus three diffin lines -----------------------------------
model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
loader = DataLoader(diffin.with_ids(train), batch_size=64, shuffle=True)  # yields (ids, x, y)

run_dir = tempfile.mkdtemp(prefix="diffin-quickstart-")
rec = diffin.Recorder(run_dir, model, optimizer=opt, checkpoint_every=50)  # saves θ_0
for _epoch in range(5):
    for ids, x, y in loader:  # ids: each sample's index in `train`
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(ids)  # after opt.step(): the learning rate is read from the optimizer
rec.close()


# --- scoring: the same per-sample loss, reduction="none" ----------------------------------------
def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


scores = diffin.influence(run_dir, model, loss_fn, train=train, target=(Xv, Yv), progress=False)
# scores[i] ≈ validation loss without sample i − with it: positive = helped, negative = hurt
worst = np.argsort(scores)[:140]
print(f"scored {len(scores)} samples; most harmful ids: {worst[:10].tolist()}")
print(f"{np.isin(worst, flipped).mean():.0%} of the 140 most harmful samples have a flipped label "
      "(10% at random)")
