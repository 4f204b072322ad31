"""``predicts="retrain"``: the ``diffin-retrain`` estimator against an independent float64
reference (docs/method.md §4.7), the ``predicts`` switch, scoring several runs at once and the
command line's ``--seeds`` / ``--predicts`` / several runs.

Sign convention (the default ``keep``, as every sweep in diffin): a score is the first-order
change of the target f when the sample is removed. With SGD θ_{t+1} = θ_t − η_t g_t the
adjoint's coefficient of the batch gradient is w_t = −η_t u_{t+1}, and removing z from a fresh
batch of size |B| (z in it with probability |B|/N) changes g_t by −G_z/|B| in expectation
|B|/N, so score(z) = Σ_t ⟨w_t, −G_z(θ_t)⟩/N = Σ_t (η_t/N)⟨u_{t+1}, G_z(θ_t)⟩.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

import diffin
from _tiny import Tiny, assert_close, ce, make_model, record, record_loop
from diffin._errors import ConfigError, OutputExistsError, ParameterMismatchError, UnsupportedMethodError
from diffin.bench.builtin.setups import read_setup_meta
from diffin.cli import main

EXACT = {"hvp": "exact", "dots": "jvp"}


# --------------------------------------------------------------------------- the reference


class _Problem:
    """The recorded run as plain functions of a flat θ (float64): mean loss, its gradient, a loop
    of per-sample gradients and the dense Hessian of the mean training loss."""

    def __init__(self, tiny: Tiny) -> None:
        self.tiny, self.run = tiny, diffin.load_run(tiny.run)
        self.model = tiny.make()
        named = list(self.model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        ck = self.run.load_checkpoint(0)
        self.theta0 = torch.cat([ck.params[n].reshape(-1) for n in self.names]).double()
        self.X, self.Y, self.N = tiny.X, tiny.Y, len(tiny.X)

    def mean_loss(self, th: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        params = {n: c.reshape(s) for n, c, s in zip(self.names, th.split(self.sizes), self.shapes)}
        return self.tiny.loss(functional_call(self.model, params, (x,)), y).mean()

    def grad(self, th: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        th = th.detach().requires_grad_(True)
        return torch.autograd.grad(self.mean_loss(th, x, y), th)[0]

    def batch_grad(self, th: torch.Tensor, t: int) -> torch.Tensor:
        ids = torch.as_tensor(self.run.batch(t))
        return self.grad(th, self.X[ids], self.Y[ids])

    def full_grad(self, th: torch.Tensor) -> torch.Tensor:
        return self.grad(th, self.X, self.Y)

    def hessian(self, th: torch.Tensor) -> torch.Tensor:  # (P, P)
        return torch.autograd.functional.hessian(lambda v: self.mean_loss(v, self.X, self.Y), th)

    def per_sample_grads(self, th: torch.Tensor) -> torch.Tensor:  # (N, P), one autograd call per sample
        return torch.stack([self.grad(th, self.X[i : i + 1], self.Y[i : i + 1]) for i in range(self.N)])

    def target_grad(self, th: torch.Tensor) -> torch.Tensor:
        return self.grad(th, self.tiny.Xv, self.tiny.Yv)


class _Credit:
    """Pays the expected credit −⟨Σ w_t, G_z(θ)⟩/N every step, or once per checkpoint segment at
    the segment's first θ (``per_step=False``)."""

    def __init__(self, pb: _Problem, per_step: bool) -> None:
        self.pb, self.per_step = pb, per_step
        self.starts = {c0 for c0, _ in pb.run.segments}
        self.scores = torch.zeros(pb.N, dtype=torch.float64)
        self.W_sum = torch.zeros_like(pb.theta0)

    def add(self, t: int, theta_t: torch.Tensor, w: torch.Tensor) -> None:
        self.W_sum = self.W_sum + w
        if self.per_step or t in self.starts:
            self.scores -= self.pb.per_sample_grads(theta_t) @ self.W_sum / self.pb.N
            self.W_sum = torch.zeros_like(self.W_sum)


def reference(tiny: Tiny, *, per_step: bool = True) -> np.ndarray:
    """Expected-credit scores (N,) of ``diffin-retrain`` with full-data proxy batches on an SGD
    run, written from scratch: θ_t by a plain replay of the recorded batches from θ_0 (the rule
    of ``torch.optim.SGD`` with the recorded momentum and weight decay), the adjoint carried with
    the DENSE Hessian of the mean training loss, per-sample gradients by a loop of autograd calls.

    ``per_step``: credit each step at its own θ_t (``credit_every=1``); else credit the summed
    coefficients of a checkpoint segment at the segment's first θ (the default).
    """
    pb = _Problem(tiny)
    run, opt = pb.run, pb.run.optimizer
    mu, wd = float(opt.momentum), float(opt.weight_decay)
    assert not opt.nesterov and float(opt.dampening) == 0.0, "reference covers plain/momentum SGD"
    # forward: θ_t and whether step t found a momentum buffer (torch: the first step starts it at d_p)
    thetas, had_buf = [pb.theta0], []
    theta, buf = pb.theta0.clone(), None
    for t in range(run.n_steps):
        d_p = pb.batch_grad(theta, t) + wd * theta
        had_buf.append(buf is not None)
        if mu:
            buf = d_p.clone() if buf is None else mu * buf + d_p
            d_p = buf
        theta = theta - float(run.lrs[t]) * d_p
        thetas.append(theta)
    # backward: (u, b̄) = ∂f/∂(θ_{t+1}, buf_{t+1}); w = coefficient of the raw batch gradient g_t
    u = pb.target_grad(thetas[-1])
    b_bar = torch.zeros_like(u)
    credit = _Credit(pb, per_step)
    for t in range(run.n_steps - 1, -1, -1):
        w = -float(run.lrs[t]) * u + (b_bar if mu else 0.0)  # adjoint of d_p (with momentum: of buf_{t+1})
        b_bar = mu * w if (mu and had_buf[t]) else torch.zeros_like(u)
        u = u + wd * w + pb.hessian(thetas[t]) @ w
        credit.add(t, thetas[t], w)
    return credit.scores.numpy()


def adam_reference(tiny: Tiny, *, per_step: bool = True) -> np.ndarray:
    """As :func:`reference` for an Adam run (no weight decay, no amsgrad). Adam's step depends on
    the gradient it is given: the state (θ_t, m_t, v_t) is replayed with the recorded batches,
    and the step is linearised at the full-data gradient g_t = ∇L(θ_t) (what full-data proxy
    batches give), by ``torch.func.vjp`` of a hand-written Adam step."""
    pb = _Problem(tiny)
    run, opt = pb.run, pb.run.optimizer
    hyper = opt.groups[0]["hyper"]
    b1, b2, eps = float(hyper["beta1"]), float(hyper["beta2"]), float(hyper["eps"])
    assert len(opt.groups) == 1 and not hyper["weight_decay"] and not hyper["amsgrad"], "plain Adam only"

    def step(th: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, lr: float, k: int):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        denom = (v / (1 - b2**k)).sqrt() + eps
        return th - lr * (m / (1 - b1**k)) / denom, m, v

    states = [(pb.theta0, torch.zeros_like(pb.theta0), torch.zeros_like(pb.theta0))]
    for t in range(run.n_steps):
        th, m, v = states[-1]
        states.append(step(th, m, v, pb.batch_grad(th, t), float(run.lrs[t]), t + 1))
    u = pb.target_grad(states[-1][0])
    m_bar = v_bar = torch.zeros_like(u)
    credit = _Credit(pb, per_step)
    for t in range(run.n_steps - 1, -1, -1):
        th, m, v = states[t]
        lr, k = float(run.lrs[t]), t + 1
        _, pull = torch.func.vjp(lambda a, b, c, g, lr=lr, k=k: step(a, b, c, g, lr, k), th, m, v, pb.full_grad(th))
        th_bar, m_bar, v_bar, w = pull((u, m_bar, v_bar))
        u = th_bar + pb.hessian(th) @ w
        credit.add(t, th, w)
    return credit.scores.numpy()


# --------------------------------------------------------------------------- numerics


def test_full_batch_gd_equals_diffin_exact(record_tiny: Callable[..., Tiny]) -> None:
    """Full-batch gradient descent: the fresh order is the recorded one, so the expected credit
    with full-data proxies paid every step is diffin-exact's credit (both conventions)."""
    tiny = record_tiny(n=12, batch=12, epochs=4, every=2)
    run = diffin.load_run(tiny.run)
    assert all(len(run.batch(t)) == 12 for t in range(run.n_steps))
    for convention in ("keep", "renormalize"):
        got = tiny.score("diffin-retrain", proxy_batch_size=12, credit_every=1, convention=convention, **EXACT)
        want = tiny.score("diffin-exact", convention=convention, **EXACT)
        assert got.variant == "diffin-retrain"
        assert np.abs(want.scores).max() > 0
        assert_close(got.scores, want.scores, msg=convention)


@pytest.mark.parametrize("opt_kw", [{"lr": 0.1}, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}],
                         ids=["sgd", "momentum-wd"])
def test_minibatch_sgd_equals_reference(record_tiny: Callable[..., Tiny], opt_kw: dict) -> None:
    """Minibatch SGD (with and without momentum/weight decay): full-data proxies make the
    adjoint deterministic; every-step credit and once-per-segment credit match the reference."""
    tiny = record_tiny(n=18, batch=6, epochs=2, every=4, opt_kw=opt_kw)
    N = 18
    got = tiny.score("diffin-retrain", proxy_batch_size=N, credit_every=1, **EXACT).scores
    want = reference(tiny, per_step=True)
    assert np.abs(want).max() > 0
    assert_close(got, want, msg="credit_every=1")
    got_seg = tiny.score("diffin-retrain", proxy_batch_size=N, **EXACT).scores
    want_seg = reference(tiny, per_step=False)
    assert_close(got_seg, want_seg, msg="credit once per segment")
    # the two payments differ (θ moves within a segment), so the comparison can tell them apart
    assert np.abs(want_seg - want).max() > 1e-6 * np.abs(want).max()
    # credit_every=k pays at every k-th step of a segment: k ≥ segment length is the default
    got_k = tiny.score("diffin-retrain", proxy_batch_size=N, credit_every=4, **EXACT).scores
    assert_close(got_k, want_seg, msg="credit_every=segment length")


def test_adam_equals_reference(tmp_path: Path) -> None:
    """Adam (its step's linearisation depends on the gradient): full-data proxies give the
    linearisation at the full-data gradient along the replayed state; both credit schedules."""
    tiny = record_loop(tmp_path / "adam", lambda m: torch.optim.Adam(m.parameters(), lr=0.01), every=4)
    run = diffin.load_run(tiny.run)
    assert run.optimizer.kind == "Adam"
    for per_step, kw in ((True, {"credit_every": 1}), (False, {})):
        got = tiny.score("diffin-retrain", proxy_batch_size=len(tiny.X), **kw, **EXACT).scores
        want = adam_reference(tiny, per_step=per_step)
        assert np.abs(want).max() > 0
        assert_close(got, want, msg=f"per_step={per_step}")


def _adam_without_ids(path: Path) -> Tiny:
    """The tiny tanh MLP trained by Adam, recorded without batch ids (``rec.step(None)``)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(18, 4, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (18,), generator=g)
    Xv = torch.randn(8, 4, generator=g, dtype=torch.float64)
    Yv = torch.randint(0, 3, (8,), generator=g)
    model = make_model("mlp", 4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with diffin.Recorder(path, model, optimizer=opt, checkpoint_every=4, n_train=18) as rec:
        for _ in range(2):
            perm = torch.randperm(18, generator=g)
            for s in range(0, 18, 6):
                b = perm[s : s + 6]
                opt.zero_grad()
                ce(model(X[b]), Y[b]).mean().backward()
                opt.step()
                rec.step(None)
    return Tiny(path, lambda: make_model("mlp", 4, 3), ce, X, Y, Xv, Yv)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_without_batch_ids_equals_diffin_expected(tmp_path: Path, optimizer: str) -> None:
    """No batch ids: θ frozen at the checkpoints (Adam's state following the proxy batches), so
    with full-data proxies diffin-retrain is diffin-expected. Adam's frozen path needs no ids."""
    if optimizer == "sgd":
        tiny = record(tmp_path / "run", n=18, batch=6, every=4, ids=False)
    else:
        tiny = _adam_without_ids(tmp_path / "run")
    assert not diffin.load_run(tiny.run).has_batch_ids
    got = tiny.score("diffin", predicts="retrain", proxy_batch_size=18, **EXACT)
    want = tiny.score("diffin-expected", proxy_batch_size=18, **EXACT)
    assert got.variant == "diffin-retrain"
    assert np.abs(want.scores).max() > 0
    assert_close(got.scores, want.scores)


def test_renormalize_centres_the_keep_credit(record_tiny: Callable[..., Tiny]) -> None:
    """renormalize: the keep credit centred over the samples, times |B|/(|B|−1)."""
    tiny = record_tiny(n=18, batch=6, epochs=2, every=4)
    B = 6
    keep = reference(tiny, per_step=True)
    got = tiny.score("diffin-retrain", proxy_batch_size=18, credit_every=1, convention="renormalize", **EXACT)
    assert_close(got.scores, B / (B - 1) * (keep - keep.mean()), scale=float(np.abs(keep).max()))
    assert abs(got.scores.sum()) <= 1e-9 * np.abs(got.scores).sum()


def test_proxy_batches_are_seeded(tiny_run: Tiny) -> None:
    """Minibatch proxies: the same seed gives the same scores, another seed others."""
    a = tiny_run.score("diffin-retrain", seed=3, **EXACT).scores
    b = tiny_run.score("diffin-retrain", seed=3, **EXACT).scores
    c = tiny_run.score("diffin-retrain", seed=4, **EXACT).scores
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-6 * np.abs(a).max()


# --------------------------------------------------------------------------- the predicts switch


def test_diffin_under_retrain_runs_diffin_retrain(tiny_run: Tiny) -> None:
    res = tiny_run.score("diffin", predicts="retrain", **EXACT)
    assert res.variant == "diffin-retrain"
    direct = tiny_run.score("diffin-retrain", **EXACT)
    np.testing.assert_array_equal(res.scores, direct.scores)
    assert tiny_run.score("diffin", **EXACT).variant == "diffin-exact"


@pytest.mark.parametrize("method", ["diffin-exact", "diffin-frozen", "tracin-every-step"])
def test_methods_that_follow_the_recorded_order_refuse_retrain(tiny_run: Tiny, method: str) -> None:
    with pytest.raises(UnsupportedMethodError, match="predicts='retrain'"):
        tiny_run.score(method, predicts="retrain")


@pytest.mark.parametrize("method", ["tracin", "diffin-expected"])
def test_order_free_methods_accept_retrain(tiny_run: Tiny, method: str) -> None:
    res = tiny_run.score(method, predicts="retrain")
    assert res.scores.shape == (24,) and np.isfinite(res.scores).all()
    assert res.config.predicts == "retrain"


def test_predicts_is_validated_and_saved(tiny_run: Tiny, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="predicts"):
        diffin.ScoreConfig(predicts="x")
    out = tmp_path / "scores"
    tiny_run.score("diffin", predicts="retrain", out=out)
    saved = json.loads((out / "scores.json").read_text())
    assert saved["config"]["predicts"] == "retrain"
    with pytest.raises(OutputExistsError, match="predicts"):
        tiny_run.score("diffin", out=out)
    assert tiny_run.score("diffin", out=out, overwrite=True).variant == "diffin-exact"


# --------------------------------------------------------------------------- several runs


def _two_runs(tmp_path: Path) -> tuple[Tiny, Tiny]:
    """Two recordings of the same data with different trajectories (r2 trains a third epoch, so
    its run, θ_T and scores differ from r1's)."""
    r1 = record(tmp_path / "r1", seed=0)
    r2 = record(tmp_path / "r2", seed=0, epochs=3)
    assert torch.equal(r1.X, r2.X) and torch.equal(r1.Y, r2.Y)
    return r1, r2


def test_several_runs_average_their_scores(tmp_path: Path) -> None:
    r1, r2 = _two_runs(tmp_path)
    kw = {"method": "diffin", "predicts": "retrain", **EXACT}
    both = diffin.score([r1.run, r2.run], r1.make(), r1.loss, train=(r1.X, r1.Y), target=(r1.Xv, r1.Yv),
                        progress=False, **kw)
    s1, s2 = r1.score(**kw).scores, r2.score(**kw).scores
    assert np.abs(s1 - s2).max() > 1e-6 * np.abs(s1).max()
    np.testing.assert_array_equal(both.scores, np.mean([s1, s2], axis=0))
    assert [d["variant"] for d in both.diagnostics["runs"]] == ["diffin-retrain"] * 2
    fp = [diffin.load_run(r).fingerprint for r in (r1.run, r2.run)]
    assert both.key["run"] not in fp and both.key["run"].startswith("runs:")


def test_several_runs_input_errors(tmp_path: Path) -> None:
    r1, r2 = _two_runs(tmp_path)

    def go(runs: list, **kw) -> diffin.ScoreResult:
        return diffin.score(runs, r1.make(), r1.loss, train=(r1.X, r1.Y), target=(r1.Xv, r1.Yv), progress=False,
                            method="tracin", **kw)

    with pytest.raises(ConfigError, match="twice"):
        go([r1.run, r1.run])
    with pytest.raises(ConfigError, match="empty"):
        go([])
    out = tmp_path / "s"
    go([r1.run, r2.run], out=out)
    r3 = record(tmp_path / "r3", seed=0, epochs=1)
    with pytest.raises(OutputExistsError, match="run"):
        go([r1.run, r3.run], out=out)
    with pytest.raises(OutputExistsError, match="run"):
        go([r1.run], out=out)  # a one-element list is the set {r1}, not {r1, r2}
    lin = record(tmp_path / "lin", kind="linear", seed=0)
    with pytest.raises(ParameterMismatchError):
        go([r1.run, lin.run])


# --------------------------------------------------------------------------- command line


def test_cli_train_seeds_and_score_several_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    D, S = tmp_path / "D", tmp_path / "S"
    assert main(["train", "--setup", "tiny", "--out", str(D), "--seeds", "2", "--epochs", "1", "--quiet"]) == 0
    runs = [D / "seed-0", D / "seed-1"]
    setups = [read_setup_meta(r) for r in runs]
    metas = [json.loads((r / "diffin_setup.json").read_text()) for r in runs]
    assert [m["noise_seed"] for m in metas] == [0, 0]
    assert [m["train"]["seed"] for m in metas] == [0, 1]
    data = [s.data() for s in setups]
    assert torch.equal(data[0].y_train, data[1].y_train) and torch.equal(data[0].x_train, data[1].x_train)
    assert bool(data[0].flipped.any())
    t0 = [diffin.load_run(r).load_checkpoint(0).params for r in runs]
    assert any(not torch.equal(t0[0][n], t0[1][n]) for n in t0[0])
    capsys.readouterr()

    assert main(["score", *map(str, runs), "--predicts", "retrain", "--out", str(S), "--quiet"]) == 0
    assert "diffin-retrain" in capsys.readouterr().out
    d = data[0]
    want = diffin.score(runs, setups[0].model(d), setups[0].loss_fn, train=(d.x_train, d.y_train),
                        target=(d.x_val, d.y_val), predicts="retrain", progress=False)
    np.testing.assert_array_equal(np.load(S / "scores.npy"), want.scores)
    assert json.loads((S / "scores.json").read_text())["config"]["predicts"] == "retrain"

    assert main(["score", *map(str, runs), "--predicts", "retrain", "--quiet"]) == 2
    assert "--out" in capsys.readouterr().err

    other = tmp_path / "noisier"  # the same setup with other flipped labels: other data
    assert main(["train", "--setup", "tiny", "--noise", "0.3", "--out", str(other), "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["score", str(runs[0]), str(other), "--out", str(tmp_path / "S2"), "--quiet"]) == 2
    assert "other data" in capsys.readouterr().err
    assert not (tmp_path / "S2").exists()


def test_cli_train_seeds_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--setup", "tiny", "--out", str(tmp_path / "D"), "--seeds", "0", "--quiet"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "D").exists()


@pytest.mark.parametrize("method", ["diffin-exact", "diffin-expected", "diffin-retrain"])
def test_adjoint_growth_is_reported(tmp_path: Path, method: str) -> None:
    """Full-batch GD on linear regression past the stability limit (η·λ_max = 3): the adjoint
    θ̄_c = (I − ηH)^{T−c} ∇f grows by |1 − ηλ_max|^{T−c}; the sweeps report the largest
    ‖θ̄_c‖/‖θ̄_T‖ over the checkpoint steps c in ``diagnostics["adjoint_growth"]``."""
    n = 10
    probe = record(tmp_path / "probe", kind="linear", regression=True, n=n, batch=n, epochs=1, every=1)
    model = probe.make()
    names = [k for k, _ in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for k, s in zip(names, shapes):
            out[k] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def mean_loss(v: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return probe.loss(functional_call(model, unflat(v), (x,)), y).mean()

    H = torch.autograd.functional.hessian(lambda v: mean_loss(v, probe.X, probe.Y), flat0)
    lam = float(torch.linalg.eigvalsh(H).max())
    lr = 3.0 / lam
    tiny = record(tmp_path / "run", kind="linear", regression=True, n=n, batch=n, epochs=8, every=2,
                  opt_kw={"lr": lr})
    run = diffin.load_run(tiny.run)
    out = tiny.score(method, proxy_batch_size=n, **EXACT)
    theta_T = torch.cat([run.load_checkpoint(run.n_steps).params[k].reshape(-1) for k in names])
    g = torch.autograd.grad(mean_loss(theta_T.requires_grad_(True), tiny.Xv, tiny.Yv), theta_T)[0]
    step = torch.eye(H.shape[0], dtype=H.dtype) - lr * H
    want = max(float((torch.linalg.matrix_power(step, run.n_steps - c0) @ g).norm() / g.norm())
               for c0, _ in run.segments)
    assert want > 100  # the regime the test is about
    assert_close(np.array(out.diagnostics["adjoint_growth"]), np.array(want), msg=method)


def test_bench_tells_diffin_retrain_the_lds_subsets_removed_share(tmp_path: Path) -> None:
    """With a retraining truth the bench judges ``diffin-retrain`` by LDS on subsets that each remove
    ``1 - lds_fraction`` of the data, so it scores with that ``removal_fraction`` unless one is given:
    the plain row equals the explicit ``removal_fraction=0.5`` row and differs from ``=0``."""
    out = tmp_path / "b.json"
    assert main(["bench", "--setup", "tiny", "--json", str(out), "--workdir", str(tmp_path / "w"), "--methods",
                 "diffin-retrain,diffin-retrain:removal_fraction=0.5,diffin-retrain:removal_fraction=0",
                 "--n-removed", "8", "--lds-subsets", "6", "--truth", "reseed", "--truth-seeds", "2",
                 "--quiet"]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    plain, half, zero = (rows[k] for k in ("diffin-retrain", "diffin-retrain:removal_fraction=0.5",
                                          "diffin-retrain:removal_fraction=0"))
    assert plain["removal_fraction"] == 0.5 and "removal_fraction=0.5" in plain["variant"]
    assert "removal_fraction" not in half and "removal_fraction" not in zero  # given by the user: left be
    assert plain["lds_reseed"] == half["lds_reseed"] and plain["pearson"] == half["pearson"]
    assert plain["pearson"] != zero["pearson"]
    # without a retraining truth there is no subset share to tell: the default stays 0
    out2 = tmp_path / "c.json"
    assert main(["bench", "--setup", "tiny", "--json", str(out2), "--workdir", str(tmp_path / "w2"), "--methods",
                 "diffin-retrain", "--n-removed", "8", "--lds-subsets", "6", "--quiet"]) == 0
    row = json.loads(out2.read_text())["results"][0]
    assert "removal_fraction" not in row and row["pearson"] == zero["pearson"]
