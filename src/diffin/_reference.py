"""Slow, obviously-correct reference computations, shipped so that users and tests can check any
estimator on a tiny model in float64:

* dense Hessians and loops of autograd per-sample gradients;
* the trajectory replayed with a real ``torch.optim.SGD`` on the module itself;
* the explicit forward recursion of docs/method.md §4 (one sample at a time, dense Hessians,
  forward-mode derivatives of the optimizer's step) for any optimizer rule;
* the metagradient: autograd through the whole recorded run unrolled as one program;
* TracIn-CP and the checkpoint closed form (docs/method.md §4.2) sample by sample.

Everything here loops in Python and forms P×P matrices: for tiny models only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jvp

from ._data import DataSource
from ._functional import FlatModel, LossFn
from .recording.run import Run
from .trajectory import TrainState, Trajectory
from .trajectory.clipping import clip


def dense_hessian(fm: FlatModel, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """∇²L_B(θ) of the mean loss on (x, y), shape (P, P)."""
    return torch.autograd.functional.hessian(lambda th: fm.losses(th, x, y).mean(), theta)


def hessian_vector(fm: FlatModel, theta: Tensor, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """∇²L_B(θ)·v (P,) of the mean loss by ``torch.autograd.functional.hvp`` (double backward)."""
    if not bool(v.any()):
        return torch.zeros_like(v)
    return torch.autograd.functional.hvp(lambda th: fm.losses(th, x, y).mean(), theta, v)[1]


def loop_grads(fm: FlatModel, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample gradients by a Python loop of autograd calls, shape (B, P)."""
    rows = []
    for i in range(x.shape[0]):
        th = theta.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fm.losses(th, x[i : i + 1], y[i : i + 1])[0], th)
        rows.append(g)
    return torch.stack(rows)


def sgd_trajectory(run: Run, model: nn.Module, loss_fn: LossFn, train: DataSource) -> list[Tensor]:
    """θ_0 … θ_T by replaying the recorded batches with ``torch.optim.SGD`` on ``model``.

    Uses the recorded θ_0 (and momentum buffers, if any) and the per-step learning rates; the
    batch loss is ``loss_fn(...).mean()``. Returns flat θ's (trainable parameters, as recorded).
    """
    ck = run.load_checkpoint(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in ck.params:  # frozen parameters are not in the checkpoints: the model's own
                p.copy_(ck.params[n])
    named = dict(model.named_parameters())
    params = [named[n] for n in run.trainable]
    o = run.optimizer
    opt = torch.optim.SGD(params, lr=0.1, momentum=o.momentum, dampening=o.dampening,
                          nesterov=o.nesterov, weight_decay=o.weight_decay)
    if ck.momentum is not None:
        for n, p in zip(run.trainable, params):
            opt.state[p]["momentum_buffer"] = ck.momentum[n].clone()

    def flat() -> Tensor:
        return torch.cat([p.detach().reshape(-1).clone() for p in params])

    out = [flat()]
    was = model.training
    model.eval()
    for t in range(run.n_steps):
        x, y = train.get(run.batch(t))
        for g in opt.param_groups:
            g["lr"] = float(run.lrs[t])
        opt.zero_grad()
        loss_fn(model(x), y).mean().backward()
        opt.step()
        out.append(flat())
    model.train(was)
    return out


def forward_recursion(
    run: Run,
    fm: FlatModel,
    train: DataSource,
    thetas: list[Tensor],
    target_grad: Tensor,
    z: int | np.ndarray,
    convention: str = "keep",
    states: list[tuple[dict[str, Tensor], int]] | None = None,
) -> float:
    """Score of sample z (or of removing the group z at once) by the explicit forward recursion
    of docs/method.md §4 (§4.3 for any optimizer rule), with Hessian-vector products by
    ``torch.autograd.functional.hvp`` (not diffin's functional core).

    Tracks the linearised change (Δθ, Δs) of the parameters and the optimizer's state when the
    samples are removed from every batch: the raw batch gradient changes by
    ``Δg_t = H_B(θ_t)Δθ + Δg_rem``, with ``Δg_rem`` = −Σ_{z∈S∩B} G_z/|B| (keep) or
    (k·G_B − Σ_{z∈S∩B} G_z)/(|B| − k) (renormalize; −G_B when the whole batch goes) for a batch
    holding k of them (with multiplicity), and (Δθ', Δs') is the forward-mode derivative
    (``torch.func.jvp``) of the recorded step ``(θ, s, g) ↦ rule.step(θ, s, clip(g), η_t, k)``
    at (θ_t, s_t, g_t) along (Δθ, Δs, Δg_t). No adjoint code is involved.

    ``thetas``: θ_0 … θ_T (P,) to linearise at; ``states``: (optimizer state, step count) at
    each step, by default carried along ``thetas`` with the rule from checkpoint 0's state.
    Returns ⟨∇f(θ_T), Δθ_T⟩ (loss units).
    """
    traj = Trajectory(run, fm, train)
    rule = traj.rule
    c = traj.clip_norm
    group = np.atleast_1d(np.asarray(z))
    if states is None:
        st = traj.state(0)
        states = []
        for t in range(run.n_steps):
            states.append((st.opt, st.k))
            _, x, y = traj.batch(t)
            st = traj.advance(TrainState(thetas[t], st.opt, st.k), t, fm.loss_grad(thetas[t], x, y)[0])
    d_theta = torch.zeros_like(thetas[0])
    d_s: dict[str, Tensor] = {}
    for t in range(run.n_steps):
        ids = run.batch(t)
        x, y = train.get(ids)
        th = thetas[t]
        opt, k_t = states[t]
        members = np.isin(ids, group)
        k = int(members.sum())
        B = len(ids)
        G = loop_grads(fm, th, x, y)
        dg = hessian_vector(fm, th, x, y, d_theta)
        if k:
            removed = G[torch.as_tensor(members)].sum(0)
            if convention == "keep":
                dg = dg - removed / B
            elif k == B:
                dg = dg - G.mean(0)
            else:
                dg = dg + (k * G.mean(0) - removed) / (B - k)
        lr = traj.lr(t)

        def one_step(th_: Tensor, s_: dict[str, Tensor], g_: Tensor, lr=lr, k_t=k_t) -> tuple[Tensor, dict]:  # noqa: ANN001
            return rule.step(th_, s_, clip(g_, c) if c is not None else g_, lr, k_t)

        s_tan = {key: d_s.get(key, torch.zeros_like(th)) for key in opt}
        _, (d_theta, d_s) = jvp(one_step, (th, opt, G.mean(0)), (d_theta, s_tan, dg))
    return float(target_grad @ d_theta)


def metagradient(run: Run, fm: FlatModel, train: DataSource, target: Callable[[Tensor], Tensor]) -> Tensor:
    """−∂f(θ_T)/∂c_z for every training sample (N,): reverse-mode autograd through the whole
    recorded run unrolled as one differentiable program, each step
    ``θ', s' = rule.step(θ, s, clip(∇_θ L_{B_t}(θ; c_{B_t})), η_t, k)`` from checkpoint 0, with
    L_B(θ; c) = Σ_{i∈B} c_i·l_i(θ)/|B| for a per-sample loss or the batch loss ``fn(outputs, y, c)``,
    and per-sample weights c = 1 (removing z under ``keep`` sets c_z = 0, so this is the
    first-order removal effect the sweep computes). ``target(θ_T) -> f`` (a scalar). Memory and
    time grow with the whole run: for tiny models only.
    """
    traj = Trajectory(run, fm, train)
    st = traj.state(0)
    weights = torch.ones(len(train), dtype=st.theta.dtype, requires_grad=True)
    with torch.enable_grad():
        theta = st.theta.detach().clone().requires_grad_(True)
        state = TrainState(theta, dict(st.opt), st.k, st.stats, st.buffers)
        for t in range(run.n_steps):
            ids, x, y = traj.batch(t)
            w = weights[torch.as_tensor(ids)]
            with traj.at_step(t, state, x):  # training-mode layers: masks, weighted batch statistics
                if state.stats is not None:
                    loss, stats, _ = fm.step_loss(state.theta, state.stats, x, y, w)
                else:
                    loss, stats = fm.batch_loss(state.theta, x, y, w), None
            (g,) = torch.autograd.grad(loss, state.theta, create_graph=True)
            state = traj.advance(state, t, g, stats)
        f = target(state.theta) if state.stats is None else target(state.theta, state.stats)
        (dw,) = torch.autograd.grad(f, weights)
    return -dw.detach()


def tracin_cp(run: Run, fm: FlatModel, train: DataSource, target_grads) -> Tensor:  # noqa: ANN001
    """TracIn-CP sample by sample: Σ_k (Σ_{t∈seg k} η_t / N)·⟨∇f(θ_{c_{k+1}}), G_z(θ_{c_{k+1}})⟩.

    ``target_grads(theta) -> (P,)``. Returns (N,).
    """
    N = len(train)
    out = torch.zeros(N, dtype=torch.float64)
    for c0, c1 in run.segments:
        ck = run.load_checkpoint(c1)
        th = fm.flatten(ck.params)
        g = target_grads(th)
        G = loop_grads(fm, th, *train.all())
        out += float(np.sum(run.lrs[c0:c1])) / N * (G @ g).double()
    return out


def closed_form(
    run: Run, fm: FlatModel, train: DataSource, target_grads, batch: int, n_batches: int = 1,  # noqa: ANN001
    seed: int = 0,
) -> Tensor:
    """The closed form of docs/method.md §4.2 (negated to the removal sign), sample by sample with
    dense Hessians. Proxy batches are drawn exactly as the estimator draws them
    (``numpy.random.default_rng(seed)``, ``n_batches`` × ``choice(N, batch, replace=False)`` per
    checkpoint, in checkpoint order)."""
    N = len(train)
    steps = [c for c in run.checkpoint_steps if c > 0]
    m = len(steps)
    rng = np.random.default_rng(seed)
    out = torch.zeros(N, dtype=torch.float64)
    for c in steps:
        th = fm.flatten(run.load_checkpoint(c).params)
        eta = float(run.lrs[min(c, run.n_steps - 1)])
        coef = c * eta**2 / (N * m)
        proxy = np.concatenate([rng.choice(N, size=batch, replace=False) for _ in range(n_batches)])
        xp, yp = train.get(proxy)
        HB = dense_hessian(fm, th, xp, yp)
        GB = loop_grads(fm, th, xp, yp).mean(0)
        g = target_grads(th)
        for z in range(N):
            xz, yz = train.get(np.array([z]))
            Gz = loop_grads(fm, th, xz, yz)[0]
            Hz = dense_hessian(fm, th, xz, yz)
            out[z] += coef * float(g @ (HB @ Gz + Hz @ GB))
    return out
