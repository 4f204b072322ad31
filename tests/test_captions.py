"""mnist-captions: data, two-tower model, the weighted symmetric InfoNCE loss, zero-shot accuracy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffin.bench.builtin.captions import (
    CLIP_LOSS,
    SEQ_LEN,
    TEMPLATES,
    TwoTower,
    caption,
    clip_loss,
    clip_scores,
    detokenize,
    evaluate_captions,
    load_mnist_captions,
    mismatch_captions,
    tokenize,
    zero_shot_accuracy,
)
from diffin.bench.builtin.setups import get_setup
from diffin.bench.builtin.trainer import TrainConfig, train

pytest.importorskip("mlxtend")


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> None:
    torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=1e-12 * max(1.0, float(b.detach().abs().max())))


def test_tokenize_roundtrip_and_errors() -> None:
    texts = [caption(7, 0), caption(3, 1), caption(0, len(TEMPLATES) - 1)]
    tok = tokenize(texts)
    assert tok.dtype == torch.int64 and tok.shape == (3, SEQ_LEN)
    assert detokenize(tok) == texts
    assert texts[0] == "a handwritten seven" and texts[1] == "the digit 3"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenize(["a handwritten eleven"])


def test_data_deterministic_and_mismatch_recorded() -> None:
    base = load_mnist_captions(200, 50, 50, seed=0)
    a = mismatch_captions(copy.deepcopy(base), 0.1, seed=3)
    b = mismatch_captions(load_mnist_captions(200, 50, 50, seed=0), 0.1, seed=3)
    assert a.sizes() == {"train": 200, "val": 50, "test": 50}
    for u, v in zip(a.x_train + a.x_val + a.x_test, b.x_train + b.x_val + b.x_test):
        assert torch.equal(u, v)
    assert np.array_equal(a.flipped, b.flipped) and a.flipped.sum() == 20
    y = a.y_train.numpy()
    assert np.array_equal(a.caption_class != y, a.flipped)  # mismatched exactly where recorded
    assert torch.equal(a.y_train, a.y_train_clean)  # targets stay the true digits
    words = [caption(int(c), int(t)) for c, t in zip(a.caption_class, a.templates)]
    assert a.captions() == words
    matched = base
    digits = {w: d for d, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven",
                                          "eight", "nine"))}
    for text, d in zip(matched.captions(), matched.y_train.tolist()):
        last = [w for w in text.split() if w in digits or w.isdigit()]
        assert last and (digits.get(last[0]) == d or last[0] == str(d))
    c = mismatch_captions(copy.deepcopy(base), 0.1, seed=4)
    assert not np.array_equal(a.flipped, c.flipped)
    again = mismatch_captions(copy.deepcopy(a), 0.1, seed=3)  # re-drawn from the matched captions, not compounded
    assert np.array_equal(again.flipped, a.flipped) and torch.equal(again.x_train[1], a.x_train[1])
    with pytest.raises(ValueError, match="mismatch fraction"):
        mismatch_captions(copy.deepcopy(base), 1.0)


def _logits(B: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 5 * torch.randn(B, B, generator=g, dtype=torch.float64)


def test_loss_is_clip_loss_at_ones() -> None:
    s = _logits()
    B = s.shape[0]
    ref = 0.5 * (F.cross_entropy(s, torch.arange(B)) + F.cross_entropy(s.T, torch.arange(B)))
    _close(clip_loss(s, None, torch.ones(B, dtype=torch.float64)), ref)


@pytest.mark.parametrize("z", [[0], [3, 5]])
def test_loss_weight_zero_is_the_sub_batch(z: list[int]) -> None:
    s = _logits(8, seed=1)
    B = s.shape[0]
    w = torch.ones(B, dtype=torch.float64)
    w[z] = 0
    keep = torch.as_tensor([i for i in range(B) if i not in z])
    sub = s[keep][:, keep]
    # removal convention "keep": still divided by the recorded B
    _close(clip_loss(s, None, w) * B, clip_loss(sub, None, torch.ones(len(keep), dtype=torch.float64)) * len(keep))


def test_loss_smooth_in_weights_and_finite_theta_gradient_at_zero() -> None:
    s = _logits(6, seed=2).requires_grad_(True)
    w = torch.ones(6, dtype=torch.float64, requires_grad=True)
    (gw,) = torch.autograd.grad(clip_loss(s, None, w), w)
    # ∂L/∂ω_z by central differences (smooth at ω = 1)
    h = 1e-6
    for z in range(6):
        e = torch.zeros(6, dtype=torch.float64)
        e[z] = h
        fd = (clip_loss(s.detach(), None, w.detach() + e) - clip_loss(s.detach(), None, w.detach() - e)) / (2 * h)
        assert abs(float(fd) - float(gw[z])) <= 1e-6 * max(1.0, abs(float(gw[z])))
    w0 = torch.ones(6, dtype=torch.float64)
    w0[2] = 0
    (gs,) = torch.autograd.grad(clip_loss(s, None, w0), s)
    assert torch.isfinite(gs).all()
    assert float(gs[2].abs().sum() + gs[:, 2].abs().sum()) == 0.0  # the removed pair's logits play no part


def test_batch_loss_wrapper_and_model_shapes() -> None:
    torch.manual_seed(0)
    m = TwoTower(8).double()
    x = torch.rand(5, 784, dtype=torch.float64)
    t = tokenize([caption(d, d % len(TEMPLATES)) for d in range(5)])
    out = m(x, t)
    assert out.shape == (5, 5)
    img, txt, scale = m(x.reshape(5, 1, 28, 28), t, embed=True)
    _close(out, scale * img @ txt.T)
    _close(img.norm(dim=1), torch.ones(5, dtype=torch.float64))
    assert float(scale.detach()) == pytest.approx(1 / 0.07)
    _close(CLIP_LOSS(out, None, torch.ones(5, dtype=torch.float64)), clip_loss(out, None, torch.ones(5)))
    # padding does not count in the text tower's mean
    t2 = torch.cat([t, torch.zeros(5, 3, dtype=torch.int64)], 1)
    _close(m.encode_text(t2), txt)


def test_trained_tiny_model_zero_shot_and_clip_score(tmp_path) -> None:  # noqa: ANN001
    split = mismatch_captions(load_mnist_captions(500, 100, 200, seed=0), 0.2, seed=0)
    torch.manual_seed(0)
    model = TwoTower(32).double()
    before = zero_shot_accuracy(model, split.x_test[0], split.y_test)
    train(model, split.x_train, split.y_train, TrainConfig(epochs=6, batch_size=32, lr=0.1, checkpoint_every=0),
          tmp_path / "run", loss=CLIP_LOSS)
    acc = zero_shot_accuracy(model, split.x_test[0], split.y_test)
    assert acc > 0.4 and acc > before + 0.2  # chance is 0.1; 0.645 measured
    ev = evaluate_captions(model, split.x_test, split.y_test)
    assert ev["accuracy"] == acc and np.isfinite(ev["loss"])
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    cs = clip_scores(model, split.x_train)
    assert cs.shape == (500,) and np.allclose(cs, clip_scores(model, split.x_train, params), rtol=1e-12)
    assert cs[split.flipped].mean() < cs[~split.flipped].mean()  # mismatched pairs match worse


def test_setup_registered() -> None:
    s = get_setup("mnist-captions")
    d = s.data()
    assert d.sizes() == {"train": 1000, "val": 500, "test": 2000}
    assert d.flipped.sum() == 100 and d.x_train[1].dtype == torch.int64 and d.x_train[0].dtype == torch.float64
    assert s.loss_fn is CLIP_LOSS and s.pair_scores is clip_scores


def test_builtin_evaluate_takes_tuple_inputs_and_batch_loss() -> None:
    from diffin.bench.builtin.trainer import evaluate

    torch.manual_seed(1)
    m = TwoTower(8).double()
    x = (torch.rand(12, 784, dtype=torch.float32), tokenize([caption(d % 10, d % len(TEMPLATES)) for d in range(12)]))
    y = torch.arange(12) % 10
    ones = torch.ones(12, dtype=torch.float64)
    with torch.no_grad():
        ref = float(clip_loss(m(x[0].double(), x[1]), None, ones))  # float inputs are cast to the model's dtype
        halves = [float(clip_loss(m(x[0][s : s + 6].double(), x[1][s : s + 6]), None, ones[:6])) for s in (0, 6)]
    assert evaluate(m, x, y, loss_fn=CLIP_LOSS)["loss"] == pytest.approx(ref, rel=1e-12)
    # in chunks of 6 rows: the loss of each chunk as one batch, averaged by rows
    assert evaluate(m, x, y, loss_fn=CLIP_LOSS, batch_size=6)["loss"] == pytest.approx(np.mean(halves), rel=1e-12)
