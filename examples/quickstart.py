"""Record a plain PyTorch training loop with diffin and score every training sample.

    python examples/quickstart.py

Trains a small MLP on scikit-learn's digits with 10% of the labels flipped, then prints which
samples hurt the validation loss most and how many of them carry a flipped label.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import diffin

torch.manual_seed(0)
rng = np.random.default_rng(0)
digits = load_digits()
X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
Y = torch.tensor(digits.target)
perm = rng.permutation(len(X))
train, val = perm[:1400], perm[1400:]
Xt, Yt, Xv, Yv = X[train], Y[train].clone(), X[val], Y[val]
flipped = rng.choice(len(Xt), size=140, replace=False)
Yt[flipped] = (Yt[flipped] + torch.tensor(rng.integers(1, 10, size=140))) % 10

model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(torch.arange(len(Xt)), Xt, Yt), batch_size=32, shuffle=True
)

run_dir = tempfile.mkdtemp(prefix="diffin-quickstart-")
rec = diffin.Recorder(run_dir, model, optimizer=opt, checkpoint_every=50)  # saves θ_0
for _ in range(10):
    for ids, x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(ids, lr=opt.param_groups[0]["lr"])  # after opt.step()
rec.close()


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


scores = diffin.influence(run_dir, model, loss_fn, train=(Xt, Yt), target=(Xv, Yv), progress=False)
worst = np.argsort(scores)[:140]
print(f"scored {len(scores)} samples; most harmful: {worst[:10].tolist()}")
print(f"{np.isin(worst, flipped).mean():.0%} of the 140 most harmful samples have a flipped label "
      f"(10% at random)")
