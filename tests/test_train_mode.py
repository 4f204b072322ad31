"""The training-mode forward as a pure function (diffin._train_mode.TrainModeForward): weighted
batch statistics equal torch's BatchNorm at ω = 1 and on the sub-batch when ω has zeros, captured
dropout masks reproduce torch's train-mode output under the same RNG state, and the function is
differentiable by torch.func (grad in ω, jvp in θ) as finite differences say. float64."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from diffin._errors import TrainModeError
from diffin._train_mode import OFFSET_SUFFIX, TrainModeForward, current_modes, train_mode_modules


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-12) -> None:
    a_, b_ = a.detach().double().numpy(), b.detach().double().numpy()
    np.testing.assert_allclose(a_, b_, rtol=rtol, atol=rtol * max(float(np.abs(b_).max(initial=0.0)), 1e-300))


class Mlp(nn.Module):
    def __init__(self, momentum: float | None = 0.1, p: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6, momentum=momentum)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


class Cnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout2d(0.3)
        self.head = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.head(h.flatten(1))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def warm(model: nn.Module, x: torch.Tensor) -> None:
    """Move the running statistics off their initial values (one train-mode forward)."""
    model.train()
    with torch.no_grad():
        model(x + 0.5)


@pytest.mark.parametrize("kind", ["bn1d", "bn2d", "bn1d-cumulative"])
def test_unit_weights_equal_torch_batchnorm(kind: str) -> None:
    torch.manual_seed(1)
    if kind == "bn2d":
        model, x = Cnn().double(), torch.randn(7, 2, 4, 4, dtype=torch.float64)
        model.drop.p = 0.0
    else:
        model = Mlp(momentum=None if kind == "bn1d-cumulative" else 0.1).double()
        x = torch.randn(9, 5, dtype=torch.float64)
    warm(model, x)
    fwd = TrainModeForward(model, current_modes(model))
    assert fwd.norm_names == ("bn",)
    assert fwd.buffer_names == ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")
    before = {k: v.clone() for k, v in state(model).items()}
    if kind == "bn2d":  # Dropout2d(p=0) in training mode needs its (all-ones) mask
        masks = {"drop": torch.ones(7, 3, 4, 4, dtype=torch.float64)}
    else:
        masks = {"drop": torch.ones(9, 6, dtype=torch.float64)}
    out, new = fwd(before, x, None, masks)
    out_w, new_w = fwd(before, x, torch.ones(x.shape[0], dtype=torch.float64), masks)
    for k, v in state(model).items():  # pure: nothing of the model touched
        assert torch.equal(v, before[k])
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        want = ref(x)
    close(out, want)
    close(out_w, want)
    for b in fwd.buffer_names:
        r = dict(ref.named_buffers())[b]
        assert new[b].dtype == r.dtype
        close(new[b], r)
        close(new_w[b], r)


def test_zero_weights_equal_the_sub_batch() -> None:
    torch.manual_seed(2)
    model = Cnn().double()
    model.drop.p = 0.0
    x = torch.randn(8, 2, 4, 4, dtype=torch.float64)
    warm(model, x)
    fwd = TrainModeForward(model, current_modes(model))
    keep = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.float64)
    idx = keep.nonzero().squeeze(1)
    out, new = fwd(state(model), x, keep, {"drop": torch.ones(8, 3, 4, 4, dtype=torch.float64)})
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        want = ref(x[idx])
    close(out[idx], want)
    for b in fwd.buffer_names:
        close(new[b], dict(ref.named_buffers())[b])


@pytest.mark.parametrize("kind", ["dropout", "dropout2d", "alpha", "feature-alpha"])
def test_captured_masks_reproduce_torch_dropout(kind: str) -> None:
    torch.manual_seed(3)
    if kind == "dropout2d":
        model, x = Cnn().double(), torch.randn(6, 2, 4, 4, dtype=torch.float64)
    else:
        model, x = Mlp(p=0.4).double(), torch.randn(10, 5, dtype=torch.float64)
        if kind == "alpha":
            model.drop = nn.AlphaDropout(0.4)
        elif kind == "feature-alpha":
            model.drop = nn.FeatureAlphaDropout(0.4)
            x = torch.randn(10, 5, dtype=torch.float64)
    model.train()
    fwd = TrainModeForward(model, current_modes(model))
    assert fwd.dropout_names == ("drop",)
    rng = torch.get_rng_state()
    with torch.no_grad():
        want = copy.deepcopy(model)(x)
    after = torch.get_rng_state()
    torch.manual_seed(99)  # the caller's state, to be restored by capture_masks
    caller = torch.get_rng_state()
    masks = fwd.capture_masks(state(model), x, rng)
    assert torch.equal(torch.get_rng_state(), caller)
    assert not torch.equal(caller, after)
    if kind in ("alpha", "feature-alpha"):
        assert "drop" + OFFSET_SUFFIX in masks
    else:
        assert set(torch.unique(masks["drop"]).tolist()) <= {0.0, 1 / (1 - model.drop.p)}
    out, _ = fwd(state(model), x, None, masks)
    close(out, want, rtol=1e-13)
    if kind in ("dropout", "dropout2d"):  # the dropout's own output: bit for bit (0/1 mask × scale)
        drop = nn.Sequential(copy.deepcopy(model.drop)).train()
        h = torch.randn(6, 3, 4, 4, dtype=torch.float64)
        fd = TrainModeForward(drop, current_modes(drop))
        torch.manual_seed(5)
        r = torch.get_rng_state()
        assert torch.equal(fd({}, h, None, fd.capture_masks({}, h, r))[0], drop(h))


def test_eval_mode_modules_and_errors() -> None:
    torch.manual_seed(4)
    model = Mlp(p=0.5).double()
    x = torch.randn(5, 5, dtype=torch.float64)
    warm(model, x)
    model.eval()
    fwd = TrainModeForward(model, current_modes(model))
    assert fwd.norm_names == () and fwd.dropout_names == () and fwd.buffer_names == ()
    out, new = fwd(state(model), x, torch.ones(5, dtype=torch.float64), None)
    close(out, model(x))
    assert new == {}
    assert set(train_mode_modules(model)) == {"bn", "drop"}
    with pytest.raises(TrainModeError, match="do not match"):
        TrainModeForward(model, {"bn": True})
    model.train()
    fwd = TrainModeForward(model, current_modes(model))
    with pytest.raises(TrainModeError, match="capture_masks"):
        fwd(state(model), x, None, None)
    assert model.training and model.bn.training  # modes restored after the call
    assert "forward" not in model.bn.__dict__


def test_no_running_stats_batchnorm_uses_weighted_batch_statistics() -> None:
    torch.manual_seed(5)
    model = Mlp().double()
    model.bn = nn.BatchNorm1d(6, track_running_stats=False).double()
    model.eval()  # without running statistics it normalises with the batch's in eval mode too
    x = torch.randn(7, 5, dtype=torch.float64)
    fwd = TrainModeForward(model, current_modes(model))
    assert fwd.norm_names == ("bn",) and fwd.buffer_names == ()
    keep = torch.tensor([1, 0, 1, 1, 1, 0, 1], dtype=torch.float64)
    idx = keep.nonzero().squeeze(1)
    out, new = fwd(state(model), x, keep, None)
    close(out[idx], model(x[idx]))
    assert new == {}


def _fd(f, x: torch.Tensor, v: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """Central difference of f at x along v (fourth order)."""
    return (-f(x + 2 * h * v) + 8 * f(x + h * v) - 8 * f(x - h * v) + f(x - 2 * h * v)) / (12 * h)


def test_func_grad_in_weights_and_jvp_in_params_match_finite_differences() -> None:
    torch.manual_seed(6)
    model = Cnn().double()
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    warm(model, x)
    model.train()
    fwd = TrainModeForward(model, current_modes(model))
    pb = {k: v.detach() for k, v in state(model).items()}
    masks = fwd.capture_masks(pb, x, torch.get_rng_state())
    ones = torch.ones(6, dtype=torch.float64)

    def loss(w: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        out, new = fwd({**pb, **params}, x, w, masks)
        ce = nn.functional.cross_entropy(out, y, reduction="none")
        # the running statistics enter too, as an eval-mode target would read them
        return (w * ce).sum() / w.sum() + 0.3 * new["bn.running_var"].sum() + 0.2 * new["bn.running_mean"].pow(2).sum()

    params = {k: v for k, v in pb.items() if k in dict(model.named_parameters())}
    g = grad(loss)(ones, params)
    v = torch.randn(6, dtype=torch.float64)
    close(torch.dot(g, v), _fd(lambda w: loss(w, params), ones, v), rtol=1e-7)

    tangent = {k: torch.randn_like(p) for k, p in params.items()}

    def along(s: torch.Tensor) -> torch.Tensor:
        return loss(ones, {k: params[k] + s * tangent[k] for k in params})

    _, d = jvp(lambda p: loss(ones, p), (params,), (tangent,))
    zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
    close(d, _fd(along, zero, one), rtol=1e-7)

    # forward-over-reverse as the sweep uses it: ⟨w, ∇_θ L⟩ differentiated in ω, and a double backward
    def inner(w: torch.Tensor) -> torch.Tensor:
        return jvp(lambda p: grad(loss, argnums=1)(w, p)["conv.weight"].sum(), (params,), (tangent,))[1]

    gw = grad(inner)(ones)
    close(torch.dot(gw, v), _fd(inner, ones, v), rtol=1e-6)
    p2 = {k: t.clone().requires_grad_(True) for k, t in params.items()}
    gsum = sum(gg.sum() for gg in torch.autograd.grad(loss(ones, p2), list(p2.values()), create_graph=True))
    hv = torch.autograd.grad(gsum, [p2["bn.weight"]])[0]
    assert torch.isfinite(hv).all()


def test_vmap_over_weights() -> None:
    torch.manual_seed(7)
    model = Mlp(p=0.3).double().train()
    x = torch.randn(6, 5, dtype=torch.float64)
    fwd = TrainModeForward(model, current_modes(model))
    pb = {k: v.detach() for k, v in state(model).items()}
    masks = fwd.capture_masks(pb, x, torch.get_rng_state())
    ws = torch.ones(6, 6, dtype=torch.float64) - torch.eye(6, dtype=torch.float64)  # leave-one-out

    def f(w: torch.Tensor) -> torch.Tensor:
        out, new = fwd(pb, x, w, masks)
        return out.sum() + new["bn.running_mean"].sum()

    batched = torch.func.vmap(f)(ws)
    looped = torch.stack([f(w) for w in ws])
    close(batched, looped)


def test_functional_call_default_path_is_unchanged() -> None:
    """Outside a call the module instances are untouched: functional_call runs torch's BatchNorm."""
    model = Mlp().double().train()
    x = torch.randn(4, 5, dtype=torch.float64)
    TrainModeForward(model, current_modes(model))(state(model), x, None, {"drop": torch.ones(4, 6).double()})
    ref = copy.deepcopy(model)
    close(functional_call(model, {k: v.clone() for k, v in state(model).items()}, (x,)), ref(x))
