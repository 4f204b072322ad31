"""Dropout drawn by functions (F.dropout, attention dropout inside scaled_dot_product_attention) and
dropout under gradient accumulation (one RNG state per micro-batch forward): replayed exactly, the
exact sweep equals the float64 metagradient (issue 20)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffin
from diffin import _reference as ref
from diffin._data import DataSource
from diffin._functional import FlatModel


class Attn(nn.Module):
    """A token mixer with dropout inside SDPA, a dropout module, and F.dropout called directly."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.qkv = nn.Linear(8, 24)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, L, 3)
        h = torch.tanh(self.emb(x))
        q, k, v = self.qkv(h).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3 if self.training else 0.0)
        h = self.drop(a.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8))
        h = F.dropout(h, 0.1, self.training)
        return self.out(h.mean(1))


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("micro", [1, 2])
def test_functional_dropout_and_accumulation_equal_the_metagradient(tmp_path, micro):
    torch.manual_seed(0)
    model = Attn().double()
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(16, 5, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (16,), generator=g)
    Xv, Yv = torch.randn(6, 5, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    with diffin.Recorder(tmp_path / "run", model, opt, checkpoint_every=2) as rec:
        model.train()
        for ids in torch.randperm(16, generator=g).reshape(-1, 4):
            opt.zero_grad()
            parts = ids.reshape(micro, -1)
            for p in parts:
                (_loss(model(X[p]), Y[p]).mean() / micro).backward()
            opt.step()
            rec.step(list(parts))
    run = diffin.load_run(tmp_path / "run")
    assert all(len(run.forwards(t)) == micro for t in range(run.n_steps))
    got = diffin.score(run, model, _loss, train=(X, Y), target=(Xv, Yv), method="diffin-exact", hvp="exact",
                       progress=False)
    assert got.diagnostics["replay_drift"] < 1e-12
    fm = FlatModel(model, _loss, run.trainable)
    want = ref.metagradient(run, fm, DataSource((X, Y), torch.float64, torch.device("cpu")),
                            lambda th: fm.losses(th, Xv, Yv).mean())
    np.testing.assert_allclose(got.scores, want.numpy(), rtol=1e-9, atol=1e-12 * float(want.abs().max()))
