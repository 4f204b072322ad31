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


class AlphaAttn(Attn):
    """Attn with an alpha-dropout module too (two draws per mask under one state)."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.AlphaDropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.alpha(x))


class LayerDrop(Attn):
    """Attn that also draws a number outside any dropout (a layer-drop decision): its masks cannot be
    drawn without running the forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = bool(torch.rand(()) < 0.9) if self.training else True
        return super().forward(x if keep else x * 1.0)


def _modes(model: nn.Module) -> dict[str, bool]:
    from diffin._train_mode import train_mode_modules

    return {n: True for n in train_mode_modules(model)}


@pytest.mark.parametrize("cls, planned", [(AlphaAttn, True), (LayerDrop, False)])
def test_mask_draw_plans_equal_the_forward_and_are_refused_for_other_randomness(cls, planned):
    """After the first capture of an input signature, masks come from the forward's draws alone
    (no forward) only when those draws leave the generator where the forward left it; either way
    every capture equals a full forward's, the caller's generator is untouched, and a module left in
    eval mode draws as recorded (training)."""
    from diffin._train_mode import TrainModeForward, _signature

    torch.manual_seed(0)
    model = cls().double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    fwd = TrainModeForward(model, _modes(model))
    states = []
    for s in range(4):
        torch.manual_seed(100 + s)
        states.append(torch.get_rng_state())
    for x in (torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(6, 7, 3, dtype=torch.float64)):
        torch.manual_seed(7)
        caller = torch.get_rng_state()
        for i, st in enumerate(states):
            got = fwd.capture_masks(params, x, st)
            want = TrainModeForward(model, _modes(model)).capture_masks(params, x, st)  # a full forward
            assert got.keys() == want.keys() and len(got) >= 3
            assert all(torch.equal(got[k], want[k]) for k in want)
            assert any(bool((got[k] == 0).any()) for k in want)  # something was dropped
            if i == 0:
                assert (fwd._plans[_signature(x)] is not None) == planned
        assert torch.equal(torch.get_rng_state(), caller)
        assert not model.training
    a, b = (fwd.capture_masks(params, torch.randn(4, 5, 3, dtype=torch.float64), st) for st in states[:2])
    assert not all(torch.equal(a[k], b[k]) for k in a)  # another state, other masks


def test_mask_draw_plans_stop_at_max_plans(monkeypatch):
    """Inputs of ever new shapes (padded per batch) stop making plans at MAX_PLANS: past it, each
    capture runs the forward, and the masks are the same."""
    from diffin import _train_mode
    from diffin._train_mode import TrainModeForward, _signature

    monkeypatch.setattr(_train_mode, "MAX_PLANS", 1)
    torch.manual_seed(0)
    model = Attn().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    fwd = TrainModeForward(model, _modes(model))
    torch.manual_seed(5)
    st = torch.get_rng_state()
    xs = [torch.randn(4, L, 3, dtype=torch.float64) for L in (5, 6, 7)]
    for x in xs + xs:
        got = fwd.capture_masks(params, x, st)
        want = TrainModeForward(model, _modes(model)).capture_masks(params, x, st)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert list(fwd._plans) == [_signature(xs[0])] and fwd._plans[_signature(xs[0])] is not None
