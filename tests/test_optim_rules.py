"""Optimizer rules (SGD, Adam, AdamW, clipping): the forward step equals torch.optim's, and the
adjoint equals the generic VJP of the step (torch.func.vjp), in float64."""

from __future__ import annotations

import pytest
import torch
from torch.func import vjp

from diffin._errors import UnsupportedOptimizerError
from diffin.trajectory.clipping import clip, clip_transpose
from diffin.trajectory.optim import get_rule

P = 7
EPS64 = torch.finfo(torch.float64).eps


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e3 * EPS64) -> None:
    scale = float(b.abs().max()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(scale, 1e-300))


CASES = {
    "sgd": ("SGD", dict(lr=0.1), {}),
    "sgd-wd": ("SGD", dict(lr=0.1, weight_decay=0.01), {"weight_decay": 0.01}),
    "momentum": ("SGD", dict(lr=0.1, momentum=0.9), {"momentum": 0.9}),
    "nesterov-damp": ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1),
                      {"momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
    "dampening": ("SGD", dict(lr=0.05, momentum=0.7, dampening=0.3), {"momentum": 0.7, "dampening": 0.3}),
    "adam": ("Adam", dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8),
             {"beta1": 0.9, "beta2": 0.99, "eps": 1e-8}),
    "adam-l2": ("Adam", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05),
                {"beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.05}),
    "adamw": ("AdamW", dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
              {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "decoupled": True}),
}


def _torch_opt(kind: str, kw: dict, p: torch.Tensor) -> torch.optim.Optimizer:
    return getattr(torch.optim, kind)([p], **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_equals_torch_optim(case: str) -> None:
    kind, kw, hyper = CASES[case]
    g_gen = torch.Generator().manual_seed(0)
    p = torch.randn(P, dtype=torch.float64, generator=g_gen).requires_grad_(True)
    opt = _torch_opt(kind, kw, p)
    rule = get_rule(kind)(hyper)
    theta, state = p.detach().clone(), {}
    for k in range(5):
        g = torch.randn(P, dtype=torch.float64, generator=g_gen)
        p.grad = g.clone()
        opt.step()
        theta, state = rule.step(theta, state, g, kw["lr"], k)
        close(theta, p.detach())
        for key in rule.state_keys:
            if key in opt.state[p]:
                close(state[key], opt.state[p][key])


@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_adjoint_equals_generic_vjp(case: str, fresh: bool) -> None:
    kind, kw, hyper = CASES[case]
    gen = torch.Generator().manual_seed(1)
    rule = get_rule(kind)(hyper)
    theta = torch.randn(P, dtype=torch.float64, generator=gen)
    g = torch.randn(P, dtype=torch.float64, generator=gen)
    keys = rule.state_keys if kind != "SGD" or hyper.get("momentum") else ()
    state = {} if fresh else {k: torch.rand(P, dtype=torch.float64, generator=gen) for k in keys}
    k = 0 if fresh else 3
    lr = kw["lr"]
    theta_bar = torch.randn(P, dtype=torch.float64, generator=gen)
    _, s1 = rule.step(theta, state, g, lr, k)
    state_bar = {key: torch.randn(P, dtype=torch.float64, generator=gen) for key in s1}

    def f(th, st, gg):
        return rule.step(th, st, gg, lr, k)

    _, pull = vjp(f, theta, state, g)
    th_ref, st_ref, g_ref = pull((theta_bar, state_bar))
    w, th, st = rule.adjoint(theta, state, g, lr, k, theta_bar, state_bar)
    close(w, g_ref)
    close(th, th_ref)
    for key in state:
        close(st[key], st_ref[key])


def test_per_coordinate_hyper_parameters() -> None:
    """Parameter groups as vectors: two groups with their own lr and weight decay."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_(True)
    b = torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.1, "lr": 0.02},
                             {"params": [b], "weight_decay": 0.0, "lr": 0.01}])
    wd = torch.tensor([0.1] * 3 + [0.0] * 4, dtype=torch.float64)
    lr = torch.tensor([0.02] * 3 + [0.01] * 4, dtype=torch.float64)
    rule = get_rule("AdamW")({"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": wd, "decoupled": True})
    theta, state = torch.cat([a, b]).detach().clone(), {}
    for k in range(4):
        g = torch.randn(7, dtype=torch.float64, generator=gen)
        a.grad, b.grad = g[:3].clone(), g[3:].clone()
        opt.step()
        theta, state = rule.step(theta, state, g, lr, k)
        close(theta, torch.cat([a, b]).detach())


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clipping_matches_torch_and_its_transpose_the_vjp(max_norm: float) -> None:
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(P, dtype=torch.float64, generator=gen)
    p = torch.zeros(P, dtype=torch.float64, requires_grad=True)
    p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_([p], max_norm)
    close(clip(g, max_norm), p.grad)
    w = torch.randn(P, dtype=torch.float64, generator=gen)
    _, pull = vjp(lambda gg: clip(gg, max_norm), g)
    close(clip_transpose(w, g, max_norm), pull(w)[0])
    G = torch.stack([g, 10 * g])  # rows clipped separately
    close(clip(G, max_norm)[1], clip(10 * g, max_norm))


def test_refused_settings_are_named() -> None:
    with pytest.raises(UnsupportedOptimizerError, match="amsgrad"):
        get_rule("Adam").check({"amsgrad": True})
    with pytest.raises(UnsupportedOptimizerError, match="Adagrad"):
        get_rule("Adagrad")


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_adam_adjoint_is_finite_in_float32_where_gradients_vanish(kind: str) -> None:
    """Coordinates whose gradient was always 0 (v' = 0, m' = 0: e.g. weights of an always-zero input
    pixel) and coordinates with tiny gradients: the float32 adjoint is finite and agrees with
    float64 (the ṽ term is 0 where v' = 0; it once came out 0/0 in float32)."""
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(P, dtype=torch.float64, generator=gen)
    g[:2] = 0.0
    g[2] = 1e-30
    theta = torch.randn(P, dtype=torch.float64, generator=gen)
    tb = torch.randn(P, dtype=torch.float64, generator=gen)
    state = {"exp_avg": 0.1 * torch.randn(P, dtype=torch.float64, generator=gen),
             "exp_avg_sq": 0.01 * torch.rand(P, dtype=torch.float64, generator=gen)}
    for v in state.values():
        v[:2] = 0.0  # never a gradient there
    hyper = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0 if kind == "Adam" else 0.01,
             "decoupled": kind == "AdamW"}
    rule = get_rule(kind)(hyper)
    outs = {}
    for dt in (torch.float32, torch.float64):
        st = {k: v.to(dt) for k, v in state.items()}
        w, th, sb = rule.adjoint(theta.to(dt), st, g.to(dt), 1e-3, 5, tb.to(dt), {})
        assert all(bool(torch.isfinite(t).all()) for t in (w, th, *sb.values()))
        outs[dt] = w
    scale = float(outs[torch.float64].abs().max())
    torch.testing.assert_close(outs[torch.float32].double(), outs[torch.float64], rtol=1e-3, atol=1e-5 * scale)
