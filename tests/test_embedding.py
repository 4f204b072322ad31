"""Trajectory influence embeddings (diffin.embed): with an exact projection (K = P') the queries equal
the exact sweep's scores in float64; a random projection is an unbiased estimate; disk, resume and
refusals."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

import diffin
from _tiny import Tiny, assert_close, record, record_loop
from diffin.embedding import EmbedConfig, Projection


def _sgd_momentum(tmp: Path) -> Tiny:
    return record(tmp / "mom", opt_kw={"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3})


def _adam(tmp: Path) -> Tiny:
    return record_loop(tmp / "adam", lambda m: torch.optim.Adam(m.parameters(), lr=0.02), clip=1.0)


def _embed(t: Tiny, **kw) -> diffin.Embedding:
    kw.setdefault("dim", 10**9)
    return diffin.embed(t.run, t.make(), t.loss, train=(t.X, t.Y), progress=False, **kw)


@pytest.mark.parametrize("make", [_sgd_momentum, _adam], ids=["sgd-momentum", "adam-clip"])
@pytest.mark.parametrize("projection", ["identity", "orthogonal"])
def test_exact_projection_equals_the_sweep(tmp_path: Path, make, projection: str) -> None:
    t = make(tmp_path)
    emb = _embed(t, projection=projection, chunk=7, method="diffin-exact")
    P = sum(p.numel() for p in t.make().parameters())
    assert emb.dim == P and emb.exact
    mean = t.score("diffin-exact", hvp="exact").scores
    assert_close(emb.influence((t.Xv, t.Yv)), mean)
    pair = t.score("diffin-exact", hvp="exact", pairwise=True).scores
    assert_close(emb.influence((t.Xv, t.Yv), pairwise=True), pair)
    self_ = t.score("diffin-exact", hvp="exact", target="self").scores
    assert_close(emb.self_influence(), self_)
    top = emb.top((t.Xv[:1], t.Yv[:1]), k=3)
    assert np.array_equal(top.proponents, np.argsort(-pair[:, 0], kind="stable")[:3])
    assert np.all(top.proponent_scores >= top.opponent_scores[0])


def test_groups_are_sums_of_members(tmp_path: Path) -> None:
    t = record(tmp_path / "run")
    emb = _embed(t, projection="identity")
    groups = [[0, 3, 5], [1], [7, 8]]
    res = t.score("diffin-exact", hvp="exact", groups=groups)
    assert_close(emb.group_influence((t.Xv, t.Yv), groups), res.group_scores)


def test_random_projection_is_unbiased_and_converges(tmp_path: Path) -> None:
    """E_R[⟨R a, R b⟩] = ⟨a, b⟩: averaged over seeds, Gaussian and Rademacher embeddings approach
    the exact scores, and the error shrinks as K grows."""
    t = record(tmp_path / "run")
    exact = t.score("diffin-exact", hvp="exact").scores
    errs = {}
    for kind in ("gaussian", "rademacher"):
        for K in (8, 40):
            est = np.mean([_embed(t, dim=K, projection=kind, projection_seed=s).influence((t.Xv, t.Yv))
                           for s in range(12)], axis=0)
            errs[kind, K] = np.linalg.norm(est - exact) / np.linalg.norm(exact)
    for kind in ("gaussian", "rademacher"):
        assert errs[kind, 40] < errs[kind, 8]
        assert errs[kind, 40] < 0.25


def test_projection_rows_do_not_depend_on_chunks() -> None:
    p = Projection.make("gaussian", 20, 50, 3, seed=4)
    full = p._make(0, 20, torch.float64, "cpu")
    parts = torch.cat([p._make(k, min(k + 6, 20), torch.float64, "cpu") for k in range(0, 20, 6)])
    assert torch.equal(full, parts)
    assert full.shape == (20, 53)
    G = torch.randn(4, 53, dtype=torch.float64)
    assert_close(p.apply(G), G @ full.T)
    assert Projection.make("gaussian", 60, 50, 3).kind == "identity"


def test_disk_reload_and_resume(tmp_path: Path) -> None:
    t = record(tmp_path / "run")
    out = tmp_path / "emb"
    emb = _embed(t, dim=12, out=out, chunk=5)
    assert (out / "embedding.npy").exists() and (out / "embedding.json").exists()
    assert not (out / ".embed").exists()
    again = diffin.load_embedding(out, model=t.make(), loss_fn=t.loss, train=(t.X, t.Y))
    assert isinstance(again.values, np.memmap) and again.values.shape == (len(t.X), 12)
    assert_close(again.influence((t.Xv, t.Yv)), emb.influence((t.Xv, t.Yv)))
    # the same call loads, another config is refused
    assert np.array_equal(np.asarray(_embed(t, dim=12, out=out, chunk=5).values), np.asarray(emb.values))
    with pytest.raises(diffin.OutputExistsError):
        _embed(t, dim=13, out=out)
    # a build killed after its first chunk continues to the same bytes
    out2 = tmp_path / "emb2"
    from diffin.embedding import _build

    calls = {"n": 0}
    real = _build._write_progress

    def die_after_first(*a, **k):
        real(*a, **k)
        if a[3]:
            calls["n"] += 1
            raise KeyboardInterrupt

    _build._write_progress = die_after_first
    try:
        with pytest.raises(KeyboardInterrupt):
            _embed(t, dim=12, out=out2, chunk=5)
    finally:
        _build._write_progress = real
    with pytest.raises(diffin.OutputExistsError):
        _embed(t, dim=12, out=out2, chunk=5)
    resumed = _embed(t, dim=12, out=out2, chunk=5, resume=True)
    assert np.array_equal(np.asarray(resumed.values), np.asarray(emb.values))


def test_refusals(tmp_path: Path) -> None:
    t = record(tmp_path / "run")
    assert {f.name for f in fields(EmbedConfig)} <= set(inspect.signature(diffin.embed).parameters)
    with pytest.raises(diffin.UnsupportedMethodError):
        _embed(t, method="tracin")
    with pytest.raises(diffin.ConfigError):
        _embed(t, dim=0)
    with pytest.raises(diffin.EmbeddingNotFoundError):
        diffin.load_embedding(tmp_path / "nothing")
    emb = _embed(t, dim=4)
    emb._model = None
    with pytest.raises(diffin.ConfigError):
        emb.influence((t.Xv, t.Yv))
    emb.bind(t.make(), t.loss, (t.X[:5], t.Y[:5]))
    with pytest.raises(diffin.DataMismatchError):
        emb.self_influence()


def test_batch_loss_exact(tmp_path: Path) -> None:
    """A batch-coupled InfoNCE run: the exact embedding's mean target and self-influence (shares within
    chunks of the recorded batch size) equal the sweep's; pairwise targets are refused as in scoring."""
    from test_batch_loss import CLIP, record_clip

    make, train, val = record_clip(tmp_path / "run")
    emb = diffin.embed(tmp_path / "run", make(), CLIP, train=train, dim=10**9, progress=False)
    kw = dict(train=train, method="diffin-exact", hvp="exact", progress=False)
    assert_close(emb.influence(val), diffin.score(tmp_path / "run", make(), CLIP, target=val, **kw).scores)
    assert_close(emb.self_influence(), diffin.score(tmp_path / "run", make(), CLIP, target="self", **kw).scores)
    with pytest.raises(diffin.BatchLossUnsupportedError):
        emb.influence(val, pairwise=True)


@pytest.mark.parametrize("kind", ["bn1d-dropout", "bn2d-dropout2d"])
def test_train_mode_batchnorm_and_dropout_exact(tmp_path: Path, kind: str) -> None:
    """Train-mode BatchNorm (running statistics in the state, read by eval-mode targets) and replayed
    dropout: the projection spans (θ, r) and the exact embedding equals the sweep."""
    from _tiny import ce
    from test_train_mode_sweep import record_bn

    make, train, val = record_bn(tmp_path / "run", kind, momentum=0.9)
    emb = diffin.embed(tmp_path / "run", make(), ce, train=train, dim=10**9, progress=False)
    assert emb.projection.n_stats > 0
    kw = dict(train=train, method="diffin-exact", hvp="exact", progress=False)
    assert_close(emb.influence(val), diffin.score(tmp_path / "run", make(), ce, target=val, **kw).scores)
    assert_close(emb.influence(val, pairwise=True),
                 diffin.score(tmp_path / "run", make(), ce, target=val, pairwise=True, **kw).scores)
    assert_close(emb.self_influence(), diffin.score(tmp_path / "run", make(), ce, target="self", **kw).scores)


@pytest.mark.parametrize("make", [_sgd_momentum, _adam], ids=["sgd-momentum", "adam-clip"])
def test_gradient_subspace_is_exact_for_training_targets(tmp_path: Path, make) -> None:
    """projection='gradients' with K = N spans every training sample's gradient at θ_T: self-influence
    and targets made of training examples are exact although K < P; saved and reloaded with its rows."""
    t = make(tmp_path)
    N = len(t.X)
    emb = _embed(t, dim=N, projection="gradients", out=tmp_path / "emb", chunk=9, power_iters=1, basis_samples=10**6)
    P = sum(p.numel() for p in t.make().parameters())
    assert emb.dim == N < P and not emb.exact
    U = emb.projection.rows(0, N)
    assert_close(U @ U.T, torch.eye(N))
    kw = dict(hvp="exact")
    assert_close(emb.self_influence(), t.score("diffin-exact", target="self", **kw).scores)
    tr = (t.X[:5], t.Y[:5])
    assert_close(emb.influence(tr, pairwise=True), t.score("diffin-exact", target=tr, pairwise=True, **kw).scores)
    again = diffin.load_embedding(tmp_path / "emb", model=t.make(), loss_fn=t.loss, train=(t.X, t.Y))
    assert again.projection.kind == "gradients"
    assert_close(again.self_influence(), emb.self_influence())


def test_runs_without_batch_ids_use_the_expected_sweep(tmp_path: Path) -> None:
    """Without recorded batch ids 'diffin' runs diffin-expected: its proxy batches are drawn from the same
    seed in every chunk of directions, so the exact embedding equals that sweep too."""
    t = record(tmp_path / "run", ids=False)
    emb = _embed(t, projection="identity", chunk=11)
    assert emb.manifest["variant"] == "diffin-expected"
    assert_close(emb.influence((t.Xv, t.Yv)), t.score("diffin-expected", hvp="exact").scores)
