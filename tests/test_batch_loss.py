"""Batch-coupled losses (diffin.batch_loss, docs/method.md §4.7) and inputs made of several tensors.

* a per-sample loss wrapped as a batch loss scores exactly as the per-sample path;
* on a two-tower model (tuple inputs) trained with a weighted symmetric InfoNCE loss, the sweep
  equals the metagradient through the unrolled run and the explicit forward recursion (forward-mode
  derivative of the unrolled run in one member's weight), all float64;
* it tracks replayed removal of single pairs (weight 0 in every batch that held the pair);
* bad input gets named errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import grad, jvp

import diffin
from _tiny import assert_close, ce, record
from diffin._data import DataSource
from diffin._functional import FlatModel
from diffin._reference import metagradient
from diffin.groundtruth import lds_ground_truth, lds_subsets, replay_removal
from diffin.recording.run import load_run
from diffin.trajectory import Trajectory

METHODS = ("diffin-exact", "diffin-frozen", "tracin", "tracin-every-step")


def separable(out: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w * ce(out, y)).sum() / len(w)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("hvp", ["exact", "central"])
def test_separable_batch_loss_scores_as_the_per_sample_loss(tmp_path, method, hvp):
    tiny = record(tmp_path / "run", epochs=2)
    ref = tiny.score(method, hvp=hvp).scores
    got = diffin.score(tiny.run, tiny.make(), diffin.batch_loss(separable), train=(tiny.X, tiny.Y),
                       target=(tiny.Xv, tiny.Yv), method=method, hvp=hvp, progress=False).scores
    assert_close(got, ref, computation="exact" if hvp == "exact" else "fd")


def test_separable_batch_loss_ground_truth_matches(tmp_path):
    tiny = record(tmp_path / "run", epochs=2)
    kw = dict(train=(tiny.X, tiny.Y), target=(tiny.Xv, tiny.Yv), remove=[0, 3, 7], progress=False)
    ref = replay_removal(tiny.run, tiny.make(), tiny.loss, **kw)
    got = replay_removal(tiny.run, tiny.make(), diffin.batch_loss(separable), **kw)
    assert_close(got, ref, scale=float(np.abs(ref).max()))


# ---------------------------------------------------------------------- a tiny two-tower model
class TwoTower(nn.Module):
    """Image tower (linear-tanh), text tower (embedding mean + linear), learned temperature."""

    def __init__(self, d: int = 5, vocab: int = 7, e: int = 3) -> None:
        super().__init__()
        self.img = nn.Sequential(nn.Linear(d, 4), nn.Tanh(), nn.Linear(4, e))
        self.emb = nn.Embedding(vocab, 4)
        self.txt = nn.Linear(4, e)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        a = self.img(image)
        b = self.txt(self.emb(tokens).mean(dim=1))
        a = a / a.norm(dim=1, keepdim=True)
        b = b / b.norm(dim=1, keepdim=True)
        return self.logit_scale.exp() * a @ b.T  # (B, B) logits


def info_nce(logits: torch.Tensor, _: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with member weights: weight 0 removes the pair's row and column."""
    logw = torch.log(w)
    diag = logits.diagonal()
    rows = torch.logsumexp(logits + logw[None, :], dim=1) - diag
    cols = torch.logsumexp(logits + logw[:, None], dim=0) - diag
    return 0.5 * ((w * rows).sum() + (w * cols).sum()) / len(w)


CLIP = diffin.batch_loss(info_nce)


def _pairs(n: int, g: torch.Generator) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    cls = torch.randint(0, 3, (n,), generator=g)
    image = torch.randn(n, 5, generator=g, dtype=torch.float64) + cls[:, None].double()
    tokens = (cls[:, None] * 2 + torch.randint(0, 2, (n, 3), generator=g)).clamp(max=6)
    return (image, tokens), cls


def record_clip(path: Path, *, n: int = 16, batch: int = 4, epochs: int = 2, lr: float = 0.05,
                momentum: float = 0.0):
    g = torch.Generator().manual_seed(0)
    train, y = _pairs(n, g)
    val, yv = _pairs(8, g)

    def make() -> nn.Module:
        torch.manual_seed(3)
        return TwoTower().double()

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    rec = diffin.Recorder(path, model, optimizer=opt, checkpoint_every=3, n_train=n)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch):
            b = perm[s : s + batch]
            loss = info_nce(model(train[0][b], train[1][b]), y[b], torch.ones(len(b), dtype=torch.float64))
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(b)
    rec.close()
    return make, (train, y), (val, yv)


def _val_loss(fm: FlatModel, val) -> callable:
    (x, y) = val
    return lambda th: fm.batch_loss(th, x, y)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_coupled_sweep_equals_metagradient(tmp_path, momentum):
    make, train, val = record_clip(tmp_path / "run", momentum=momentum)
    got = diffin.score(tmp_path / "run", make(), CLIP, train=train, target=val, method="diffin-exact",
                       hvp="exact", progress=False).scores
    run = load_run(tmp_path / "run")
    fm = FlatModel(make(), CLIP, trainable=run.trainable)
    ref = metagradient(run, fm, DataSource(train, fm.dtype, fm.device), _val_loss(fm, val))
    assert_close(got, ref)
    # central differences: the same up to their truncation error
    fd = diffin.score(tmp_path / "run", make(), CLIP, train=train, target=val, method="diffin-exact",
                      hvp="central", progress=False).scores
    assert_close(fd, ref, computation="fd")


def test_coupled_sweep_equals_forward_recursion(tmp_path):
    """δ_t = dθ_t/dω_z by forward mode through the unrolled SGD run, for three members z."""
    make, train, val = record_clip(tmp_path / "run")
    got = diffin.score(tmp_path / "run", make(), CLIP, train=train, target=val, method="diffin-exact",
                       hvp="exact", progress=False).scores
    run = load_run(tmp_path / "run")
    fm = FlatModel(make(), CLIP, trainable=run.trainable)
    traj = Trajectory(run, fm, DataSource(train, fm.dtype, fm.device))
    theta0 = traj.theta(0)
    for z in (0, 5, 11):
        theta, delta = theta0.clone(), torch.zeros_like(theta0)
        for t in range(run.n_steps):
            ids, x, y = traj.batch(t)
            e = torch.as_tensor(ids == z, dtype=theta.dtype)
            lr = traj.lr(t)

            def step(th: torch.Tensor, w: torch.Tensor, x=x, y=y, lr=lr) -> torch.Tensor:
                return th - lr * grad(lambda t_: fm.batch_loss(t_, x, y, w))(th)

            theta, delta = jvp(step, (theta, torch.ones_like(e)), (delta, e))
        gf = grad(_val_loss(fm, val))(theta)
        # removal sets ω_z from 1 to 0: θ_T^{-z} − θ_T ≈ −δ_T
        assert_close(got[z], -float(gf @ delta), scale=float(np.abs(got).max()))


def test_coupled_tracks_replayed_removal(tmp_path):
    make, train, val = record_clip(tmp_path / "run", n=24, batch=6, epochs=2, lr=0.02)
    res = diffin.score(tmp_path / "run", make(), CLIP, train=train, target=val, method="diffin", progress=False)
    truth = replay_removal(tmp_path / "run", make(), CLIP, train=train, target=val, remove=list(range(24)),
                           progress=False)
    assert np.corrcoef(res.scores, truth)[0, 1] > 0.95
    tr = diffin.score(tmp_path / "run", make(), CLIP, train=train, target=val, method="tracin", progress=False)
    assert np.all(np.isfinite(tr.scores)) and np.any(tr.scores != 0)
    masks = lds_subsets(24, n_subsets=12, fraction=0.9, seed=0)  # remove 10%: in-batch negatives go too
    truth_lds = lds_ground_truth(tmp_path / "run", make(), CLIP, train=train, target=val, masks=masks, progress=False)
    # LDS: the sum of scores over the removed pairs predicts the subset's change
    pred = np.array([res.scores[~m].sum() for m in masks])
    assert np.corrcoef(pred, truth_lds)[0, 1] > 0.8


def test_separable_rule_under_groundtruth_weights(tmp_path):
    """Replayed removal of a pair = weight 0 in every batch that held it: the replay of the full run
    lands on the recorded θ_T, and removing nobody changes nothing."""
    make, train, val = record_clip(tmp_path / "run")
    vals = replay_removal(tmp_path / "run", make(), CLIP, train=train, target=val, remove=[[]], progress=False)
    assert np.all(vals == 0)


# ---------------------------------------------------------------------- bad input
def test_batch_loss_errors(tmp_path):
    make, train, val = record_clip(tmp_path / "run")
    kw = dict(train=train, target=val, progress=False)
    with pytest.raises(diffin.LossShapeError, match="one scalar"):
        diffin.score(tmp_path / "run", make(), diffin.batch_loss(lambda o, y, w: o.sum(1) * w), **kw)
    with pytest.warns(diffin.BatchLossWeightsWarning, match="does not depend on its weights"):
        diffin.score(tmp_path / "run", make(), diffin.batch_loss(lambda o, y, w: info_nce(o, y, torch.ones_like(w))),
                     method="tracin", **kw)
    for method in ("diffin-expected", "diffin-closed-form", "if-cg", "grad-dot"):
        with pytest.raises(diffin.BatchLossUnsupportedError, match="diffin-exact"):
            diffin.score(tmp_path / "run", make(), CLIP, method=method, **kw)
    with pytest.raises(diffin.BatchLossUnsupportedError, match="predicts"):
        diffin.score(tmp_path / "run", make(), CLIP, predicts="retrain", **kw)
    with pytest.raises(diffin.BatchLossUnsupportedError, match="pairwise"):
        diffin.score(tmp_path / "run", make(), CLIP, pairwise=True, **kw)
    with pytest.raises(diffin.ConfigError, match="keep"):
        diffin.score(tmp_path / "run", make(), CLIP, convention="renormalize", **kw)
    with pytest.raises(diffin.ConfigError, match="callable"):
        diffin.batch_loss(3)


class _Ragged(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int):
        return (torch.zeros(5, dtype=torch.float64), torch.zeros(1 + i % 2, dtype=torch.long)), 0


def test_inputs_that_cannot_be_collated_are_a_named_error(tmp_path):
    make, train, val = record_clip(tmp_path / "run")
    with pytest.raises(diffin.DataMismatchError, match="collate"):
        diffin.score(tmp_path / "run", make(), CLIP, train=_Ragged(), target=val, progress=False)


def test_dict_inputs_reach_the_model_as_keywords(tmp_path):
    make, (train, y), (val, yv) = record_clip(tmp_path / "run")
    as_dict = ({"image": train[0], "tokens": train[1]}, y)
    ref = diffin.score(tmp_path / "run", make(), CLIP, train=(train, y), target=(val, yv), progress=False).scores
    got = diffin.score(tmp_path / "run", make(), CLIP, train=as_dict,
                       target=({"image": val[0], "tokens": val[1]}, yv), progress=False).scores
    assert_close(got, ref)


def test_coupled_self_influence_equals_metagradient(tmp_path):
    """target='self' with a batch loss: f_z = z's share within its chunk of the recorded batch size;
    the sweep's diagonal equals the metagradient of each f_z (float64), and TracIn runs on it."""
    make, train, val = record_clip(tmp_path / "run")
    got = diffin.score(tmp_path / "run", make(), CLIP, train=train, target="self", method="diffin-exact",
                       hvp="exact", progress=False).scores
    run = load_run(tmp_path / "run")
    fm = FlatModel(make(), CLIP, trainable=run.trainable)
    src = DataSource(train, fm.dtype, fm.device)
    B = run.batch_size_hint()
    for z in (0, 5, 11):
        c0 = z // B * B
        x, y = src.get(np.arange(c0, c0 + B))
        ref = metagradient(run, fm, src, lambda th, x=x, y=y, k=z - c0: fm.losses(th, x, y)[k])
        assert_close(got[z], ref[z], scale=float(np.abs(got).max()))
    for method in ("tracin", "tracin-every-step"):
        tr = diffin.score(tmp_path / "run", make(), CLIP, train=train, target="self", method=method, progress=False)
        assert np.all(np.isfinite(tr.scores)) and np.any(tr.scores != 0)
    # replayed removal of a pair changes its own share (self target of the ground truth)
    own = replay_removal(tmp_path / "run", make(), CLIP, train=train, target="self", remove=[[3]], progress=False)
    assert np.isfinite(own).all()
