"""open_clip: a CLIP model from a small config (no weights), trained with open_clip's own
``ClipLoss``, recorded and scored through ``clip_batch_loss``; in float64 the scores equal the
metagradient through the unrolled run and track replayed removal of single pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import diffin
from diffin._data import DataSource
from diffin._errors import MissingExtraError
from diffin._functional import FlatModel
from diffin._reference import metagradient
from diffin.groundtruth import replay_removal
from diffin.integrations.open_clip import clip_batch_loss, import_open_clip
from diffin.recording.run import load_run

try:
    open_clip = import_open_clip()
except MissingExtraError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"needs the clip extra ({e})", allow_module_level=True)

N, B, CTX, VOCAB = 48, 16, 8, 32


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=4, image_size=8),
        text_cfg=open_clip.CLIPTextCfg(context_length=CTX, vocab_size=VOCAB, width=32, heads=2, layers=1),
    ).double()


def make_data(n: int, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """n image–caption pairs: a caption's tokens name the image's class (4 classes), the image is
    its class pattern plus noise; the last token is the end token (the highest id)."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, 4, (n,), generator=g)
    patterns = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    images = patterns[cls] + 0.5 * torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    tokens = torch.randint(5, VOCAB - 1, (n, CTX), generator=g)
    tokens[:, 0] = 1 + cls
    tokens[:, -1] = VOCAB - 1
    return (images, tokens), torch.zeros(n)


def _train(run: Path, lr: float = 0.02) -> None:
    (images, tokens), _ = make_data(N, 0)
    model = make_model()
    loss = open_clip.ClipLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)
    order = np.random.default_rng(0)
    with diffin.Recorder(run, model, opt, checkpoint_every=4) as rec:
        for _ in range(2):
            for ids in order.permutation(N).reshape(-1, B):
                value = loss(*model(images[ids], tokens[ids]))  # open_clip's own loss, as a user trains
                opt.zero_grad()
                value.backward()
                opt.step()
                rec.step(ids)


def test_clip_batch_loss_is_clip_loss_at_unit_weights() -> None:
    model = make_model()
    (images, tokens), y = make_data(B, 1)
    out = model(images, tokens)
    loss = open_clip.ClipLoss()
    fn = clip_batch_loss(loss).fn
    torch.testing.assert_close(fn(out, y, torch.ones(B, dtype=torch.float64)), loss(*out), rtol=1e-14, atol=0)
    # weight 0 is the batch without that pair: the loss of the other B-1 pairs, scaled by (B-1)/B
    w = torch.ones(B, dtype=torch.float64)
    w[2] = 0
    keep = [i for i in range(B) if i != 2]
    without = model(images[keep], tokens[keep])
    torch.testing.assert_close(fn(out, y, w), loss(*without) * (B - 1) / B, rtol=1e-12, atol=0)


def test_open_clip_run_scores_equal_the_metagradient(tmp_path: Path) -> None:
    _train(tmp_path / "run")
    train, val = make_data(N, 0), make_data(12, 2)
    loss = clip_batch_loss()
    res = diffin.score(tmp_path / "run", make_model(), loss, train=train, target=val, progress=False)
    run = load_run(tmp_path / "run")
    fm = FlatModel(make_model(), loss, trainable=run.trainable)
    (vx, vy) = val
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no double backward
        want = metagradient(run, fm, DataSource(train, fm.dtype, fm.device), lambda th: fm.batch_loss(th, vx, vy))
    # central-difference HVPs in float64: agreement to about 1e-6 of the largest score
    np.testing.assert_allclose(res.scores, want.numpy(), rtol=0, atol=1e-5 * float(want.abs().max()))
    assert res.diagnostics["replay_drift"] < 1e-10
    real = replay_removal(tmp_path / "run", make_model(), loss, train=train, target=val, remove=list(range(N)),
                          progress=False)
    # removing one of 16 pairs is far from infinitesimal for a contrastive loss (the pair leaves 31
    # softmax terms through log w): the scores track replayed removal, not to first-order accuracy
    assert np.corrcoef(res.scores, real)[0, 1] > 0.5


def test_open_clip_example_runs() -> None:
    import subprocess
    import sys

    path = Path(__file__).resolve().parents[1] / "examples" / "open_clip_training.py"
    res = subprocess.run([sys.executable, str(path), "--pairs", "64", "--epochs", "1"], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mismatched" in res.stdout
