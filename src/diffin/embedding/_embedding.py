"""A built trajectory influence embedding and its queries (docs/method.md §4.10).

E (N × K), row z = R e_z. For a target f with gradient ∇f(θ_T) (and, for train-mode BatchNorm,
∂f/∂r_T), every sample's score is

    score_f(z) ≈ ⟨R ∇f, R e_z⟩ = E[z] · (R ∇f)        (exactly ⟨∇f, e_z⟩ when RᵀR = I)

in the sign and units of docs/method.md §2 (loss_change_if_removed: positive = z helped). A query
costs the target's gradient at θ_T, its projection, and one product with E (streamed over rows).
Self-influence uses each sample's own projected gradient R ∇ℓ_z(θ_T): K forward-mode passes
(JVPs) over the training data, then a row-wise product with E.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._errors import ConfigError, DataMismatchError, EmbeddingNotFoundError
from .._functional import FlatModel, LossFn
from ..recording.run import Run, load_run
from ..targets import PerExample, SelfLoss, Target, _Subset, make_target
from ._basis import shares_along
from ._projection import BASIS_NPY, Projection

EMBED_NPY = "embedding.npy"
EMBED_JSON = "embedding.json"
ROWS_PER_BLOCK = 65536
"""Rows of E multiplied at once (bounded memory for a memory-mapped E of any N)."""


@dataclass
class TopInfluence:
    """The training samples that helped (``proponents``, largest scores first) and hurt
    (``opponents``, most negative first) one test example most; ids and scores (loss units)."""

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


class Embedding:
    """The trajectory influence embedding of a run's training set, with its queries.

    ``values``: (N, K) array (memory-mapped when loaded from disk); ``manifest``: the projection,
    the run's and data's key, the config and timing; ``projection``: R. Queries need the model,
    loss and training data (bound by :func:`diffin.embed` or :func:`diffin.load_embedding`).
    """

    def __init__(self, values: np.ndarray, manifest: dict[str, Any], folder: Path | None, *,
                 run: Run | str | os.PathLike[str] | None = None, model: nn.Module | None = None,
                 loss_fn: LossFn | None = None, train: Any = None, device: str | None = None,
                 projection: Projection | None = None) -> None:
        self.values = values
        self.manifest = manifest
        self.folder = folder
        self.projection = projection if projection is not None else Projection.from_json(manifest["projection"])
        self._run = run
        self._model, self._loss_fn, self._train, self._device = model, loss_fn, train, device
        self._q: _QueryContext | None = None

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    @property
    def exact(self) -> bool:
        """RᵀR = I: queries equal the sweep's scores up to rounding."""
        return self.projection.exact

    def __repr__(self) -> str:
        return (f"Embedding(n={self.n}, dim={self.dim}, projection={self.projection.kind!r}, "
                f"variant={self.manifest.get('variant')!r}, folder={str(self.folder) if self.folder else None!r})")

    def bind(self, model: nn.Module, loss_fn: LossFn, train: Any, run: Run | str | os.PathLike[str] | None = None,
             device: str | None = None) -> Embedding:
        """Attach the model (architecture), loss and training data the queries need; returns self."""
        self._model, self._loss_fn, self._train, self._q = model, loss_fn, train, None
        if run is not None:
            self._run = run
        if device is not None:
            self._device = device
        return self

    # ------------------------------------------------------------------ queries
    def influence(self, target: Any, pairwise: bool = False) -> np.ndarray:
        """Scores of every training sample on ``target``: ``(inputs, targets)`` / Dataset → the mean
        loss over them, (N,); with ``pairwise=True`` one column per example, (N, Q); ``"self"`` →
        :meth:`self_influence`; a :class:`diffin.targets.Target` object as is. float64, loss units,
        positive = removing the sample would raise the target's loss (it helped)."""
        if isinstance(target, str) and target == "self":
            if pairwise:
                raise DataMismatchError("pairwise=True needs target examples, not 'self'")
            return self.self_influence()
        q = self._ctx()
        with q.scoring():
            tgt = make_target(target, q.train, q.fm, pairwise=pairwise)
            if q.fm.coupled and tgt.kind == "pairwise":
                from ..estimators.base import check_coupled

                check_coupled("embedding", True, "pairwise")
            if isinstance(tgt, SelfLoss):
                return self.self_influence()
            out = np.concatenate([self.scores_of(q.target_grads(t)) for t in _target_chunks(tgt)], axis=1)
        return out[:, 0] if tgt.kind == "mean" else out

    def group_influence(self, target: Any, groups: list[Any], pairwise: bool = False) -> np.ndarray:
        """Predicted change of the target if each whole group of ids were removed at once: (G,) or
        (G, Q) with ``pairwise``. Under the ``keep`` convention the first-order effect of a group is
        the sum of its members' scores (the sweep's group scores equal it); ``renormalize`` is not
        additive and is refused."""
        if self.manifest.get("config", {}).get("convention", "keep") != "keep":
            raise ConfigError("group scores from an embedding need convention='keep' (renormalize is not additive); "
                              "score the groups with diffin.score(..., groups=...)")
        from .._data import check_id_groups

        arrays = check_id_groups(groups, self.n, allow_empty=True)
        s = self.influence(target, pairwise=pairwise)
        return np.stack([s[np.asarray(g, dtype=np.int64)].sum(axis=0) for g in arrays])

    def self_influence(self) -> np.ndarray:
        """Projected self-influence of every training sample, (N,) float64: ⟨R ∇ℓ_z(θ_T), E[z]⟩ ≈
        the change of z's own loss if z were removed (loss units; the exact path is
        ``diffin.influence(..., target="self")``, one sweep per chunk of 64 samples). For a batch
        loss, ℓ_z is z's share within its chunk of the recorded batch size (as the exact path)."""
        q = self._ctx()
        out = np.zeros(self.n, dtype=np.float64)
        with q.scoring():
            for ids, x, y in q.train.chunks(q.self_chunk):
                PG = q.projected_shares(self.projection, x, y)  # (B, K)
                E = torch.tensor(np.asarray(self.values[ids[0]: ids[-1] + 1]), dtype=torch.float64)
                out[ids] = (PG.to(torch.float64) * E).sum(1).numpy()
        return out

    def top(self, example: Any, k: int = 10) -> TopInfluence:
        """The ``k`` training samples that helped (proponents) and hurt (opponents) one test example
        most: ``example`` is an ``(inputs, targets)`` pair with one row (a leading batch dimension of 1)."""
        s = self.influence(example, pairwise=True)
        if s.shape[1] != 1:
            raise DataMismatchError(f"top() takes one example (a batch of 1 row), got {s.shape[1]}; use "
                                    "influence(examples, pairwise=True) for several")
        s = s[:, 0]
        k = min(int(k), self.n)
        order = np.argsort(-s, kind="stable")
        pro, opp = order[:k], order[::-1][:k]
        return TopInfluence(pro, s[pro], opp, s[opp])

    def scores_of(self, G: Tensor) -> np.ndarray:
        """Scores (N, Q) float64 of Q targets given their gradients G (Q, P') at θ_T."""
        Gp = self.projection.apply(G.to(torch.float64)).T.cpu().numpy()  # (K, Q)
        out = np.empty((self.n, Gp.shape[1]), dtype=np.float64)
        for r0 in range(0, self.n, ROWS_PER_BLOCK):
            r1 = min(r0 + ROWS_PER_BLOCK, self.n)
            out[r0:r1] = np.asarray(self.values[r0:r1], dtype=np.float64) @ Gp
        return out

    def _ctx(self) -> _QueryContext:
        if self._q is None:
            if self._model is None or self._loss_fn is None or self._train is None:
                raise ConfigError("this embedding has no model, loss and training data bound: call "
                                  "emb.bind(model, loss_fn, train) (or diffin.load_embedding(out, model=, "
                                  "loss_fn=, train=))")
            run = self._run if self._run is not None else self.manifest["run"]
            self._q = _QueryContext(run, self._model, self._loss_fn, self._train, self, self._device)
        return self._q


def _target_chunks(tgt: Target, size: int = 256) -> Iterator[Target]:
    """A pairwise target in pieces of ``size`` examples (their gradients fit in memory); others whole."""
    if not isinstance(tgt, PerExample) or tgt.size <= size:
        yield tgt
        return
    for s in range(0, tgt.size, size):
        ids = np.arange(s, min(s + size, tgt.size))
        yield PerExample(_Subset(tgt.source, ids), batch_size=tgt.batch_size)


class _QueryContext:
    """θ_T (and r_T), the functional model and the training data, read once for every query."""

    def __init__(self, run: Run | str | os.PathLike[str], model: nn.Module, loss_fn: LossFn, train: Any,
                 emb: Embedding, device: str | None) -> None:
        from .._api import scoring_model
        from .._data import DataSource, probe_model_and_loss
        from ..trajectory import Trajectory

        self.run = run if isinstance(run, Run) else load_run(run)
        key = emb.manifest.get("key", {})
        if key.get("run") and key["run"] != self.run.fingerprint:
            raise DataMismatchError(f"the embedding was built from another run than {self.run.path} "
                                    "(its fingerprint differs); bind the run it was built from")
        self.run.check_model(model)
        self.model = scoring_model(model, device)
        self.fm = FlatModel(self.model, loss_fn, trainable=self.run.trainable)
        if list(self.fm.spec.names) != list(emb.manifest.get("param_names", self.fm.spec.names)):
            raise DataMismatchError("the model's trainable parameters differ from those the embedding was built on")
        self.train = DataSource(train, self.fm.dtype, self.fm.device, name="train")
        if len(self.train) != emb.n:
            raise DataMismatchError(f"the embedding has {emb.n} rows but the training data has {len(self.train)}")
        with self.scoring():
            probe_model_and_loss(self.train, self.fm)
        traj = Trajectory(self.run, self.fm, self.train)
        T = self.run.n_steps
        self.n_stats = emb.projection.n_stats
        if self.n_stats:
            at = traj.state(T)
            self.theta, self.stats = at.theta, at.stats
        else:
            self.theta, self.stats = traj.theta(T), None
        self.self_chunk = int(self.run.batch_size_hint() or 64) if self.fm.coupled else 256

    @contextlib.contextmanager
    def scoring(self) -> Iterator[None]:
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was)

    def target_grads(self, tgt: Target) -> Tensor:
        """∇f(θ_T) (Q, P'), with ∂f/∂r_T appended for train-mode BatchNorm."""
        G = tgt.grads(self.fm, self.theta)
        if self.n_stats:
            G = torch.cat([G, tgt.stat_grads(self.fm, self.theta, self.stats)], dim=1)
        return G

    def projected_shares(self, proj: Projection, x: Any, y: Any) -> Tensor:
        """R ∇ℓ_i(θ_T) for each sample of a batch (B, K): vmapped JVPs of the members' losses (for a
        batch loss, their shares within this batch) along rows of R."""
        fm = self.fm
        parts = [shares_along(fm, self.theta, self.stats, x, y, proj.rows(k0, k1, fm.dtype, fm.device))
                 for k0, k1 in proj.chunks(fm.dtype, fm.device)]
        return torch.cat(parts, dim=1)


def load_embedding(out: str | os.PathLike[str], *, run: Run | str | os.PathLike[str] | None = None,
                   model: nn.Module | None = None, loss_fn: LossFn | None = None, train: Any = None,
                   device: str | None = None) -> Embedding:
    """Load an embedding written by :func:`diffin.embed` (``embedding.npy`` memory-mapped, read-only);
    bind ``model``, ``loss_fn`` and ``train`` for queries (``run`` defaults to the recorded path)."""
    folder = Path(out)
    mpath = folder / EMBED_JSON
    if not mpath.exists() or not (folder / EMBED_NPY).exists():
        raise EmbeddingNotFoundError(f"{folder} holds no finished embedding ({EMBED_JSON} and {EMBED_NPY}); build it "
                                "with diffin.embed(..., out=...) (resume=True continues an interrupted build)")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    values = np.load(folder / EMBED_NPY, mmap_mode="r")
    if list(values.shape) != list(manifest["shape"]):
        raise DataMismatchError(f"{folder / EMBED_NPY} has shape {values.shape}, its manifest says {manifest['shape']}")
    basis = None
    if manifest["projection"]["kind"] == "gradients":
        basis = torch.as_tensor(np.load(folder / BASIS_NPY))
    proj = Projection.from_json(manifest["projection"], basis=basis)
    return Embedding(values, manifest, folder, run=run, model=model, loss_fn=loss_fn, train=train, device=device,
                     projection=proj)
