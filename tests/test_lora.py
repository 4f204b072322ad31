"""PEFT/LoRA (issue 20): only the adapters enter θ, the frozen base weights are constants that no
checkpoint holds (a fingerprint of them is checked at scoring), and the scores equal the float64
metagradient through the unrolled LoRA run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import diffin
from diffin import _reference as ref
from diffin._data import DataSource
from diffin._errors import FrozenWeightsMismatchError
from diffin._functional import FlatModel

peft = pytest.importorskip("peft")


def _lora_model() -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], lora_dropout=0.0, init_lora_weights="gaussian")
    return peft.get_peft_model(base, cfg)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lora") / "run"
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    Xv, Yv = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    model = _lora_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3, momentum=0.9)
    order = torch.randperm(16, generator=g).reshape(-1, 4)
    with diffin.Recorder(run, model, opt, checkpoint_every=2) as rec:
        for _ in range(2):
            for ids in order:
                loss = _loss(model(X[ids]), Y[ids]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.step(ids)
    return run, model, (X, Y), (Xv, Yv)


def test_lora_checkpoints_hold_no_frozen_weight(lora_run):
    run_dir, model, _, _ = lora_run
    run = diffin.load_run(run_dir, model)
    assert run.trainable and all("lora_" in n for n in run.trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and run.frozen_sha256
    for c in run.checkpoint_steps:
        with safe_open(str(run_dir / run._ckpt_entries[c]["file"]), "pt") as f:
            keys = set(f.keys())
        assert not any(n in k for k in keys for n in frozen), keys
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(p for p in other.parameters() if not p.requires_grad).mul_(1 + 1e-9)
    with pytest.raises(FrozenWeightsMismatchError):
        diffin.load_run(run_dir, other)


def test_lora_scores_equal_the_metagradient(lora_run):
    run_dir, model, (X, Y), (Xv, Yv) = lora_run
    got = diffin.score(run_dir, model, _loss, train=(X, Y), target=(Xv, Yv), method="diffin-exact", hvp="exact",
                       progress=False)
    run = diffin.load_run(run_dir)
    fm = FlatModel(model, _loss, run.trainable)
    assert fm.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    want = ref.metagradient(run, fm, DataSource((X, Y), torch.float64, torch.device("cpu")),
                            lambda th: fm.losses(th, Xv, Yv).mean())
    np.testing.assert_allclose(got.scores, want.numpy(), rtol=1e-9, atol=1e-12 * float(want.abs().max()))
