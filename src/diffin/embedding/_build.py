"""``diffin.embed``: the trajectory influence embedding of every training sample (docs/method.md §4.10).

The effect of removing z on any target f is ⟨∇f(θ_T), e_z⟩ with e_z the sensitivity of the final
state to z's weight (§4.1): one vector per sample, independent of the target. The sweep is linear
in its starting adjoint, so the adjoint sweep started from row k of a projection R (instead of
∇f) gives ⟨R_k, e_z⟩ for every z at once: K rows swept together, as a "target" of K directions
(:class:`Directions`), are the N × K embedding E = (R e_z)_z. Any target's scores are then
E (R ∇f(θ_T)): a gradient at θ_T and a product (:class:`diffin.Embedding`).

The sweep is the estimator's own (``diffin-exact`` when the run recorded batch ids, else
``diffin-expected``; the optimizer rules, clipping, BatchNorm/dropout replay, batch losses and
the removal convention are followed exactly as in scoring), run by :func:`diffin._api._score_one`
on chunks of directions whose width fits ``memory_mb``.

On disk (``out``): ``embedding.npy`` (N × K, memory-mapped when read) and ``embedding.json`` (the
manifest: projection, run and data key, config, timing), written when every chunk is done. While
building, ``out/.embed/`` holds ``partial.npy`` (the columns done so far), ``progress.json`` (the
key and the done chunks, rewritten atomically after each chunk) and the current chunk's sweep
state (``chunk-NNNNNN/.resume``, saved at segment boundaries like any scoring's): a killed build
continues with ``resume=True`` from the last segment boundary of the last chunk.

Several processes (a ``torch.distributed`` group, e.g. under ``torchrun``) split the chunks of
directions: rank r sweeps chunks r, r + W, ... whole, in its own process (no batch is split, so
batch losses and train-mode BatchNorm/dropout runs, which batch-split scoring refuses, are fine),
and writes each finished chunk's columns to ``.embed/cols-NNNNNN.npy``; rank 0 gathers them into
``partial.npy`` and writes the embedding. A killed multi-process build resumes chunk by chunk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._distributed import all_reduce_sum, barrier, broadcast_tensor, world
from .._errors import ConfigError, OutputExistsError, ResumeMismatchError, UnsupportedMethodError
from .._functional import FlatModel, LossFn
from .._io import write_json, write_npy
from .._resume import resume_config
from .._version import __version__
from ..config import ScoreConfig, config_field, config_from_kwargs
from ..recording.run import Run, load_run
from ..targets import Target, _Subset
from ._basis import gradient_basis
from ._embedding import EMBED_JSON, EMBED_NPY, Embedding, load_embedding
from ._projection import BASIS_NPY, PROJECTIONS, Projection

log = logging.getLogger("diffin")

WORK_DIR = ".embed"
PARTIAL_NPY = "partial.npy"
PROGRESS_JSON = "progress.json"
CHUNK_PATTERN = "chunk-{c:06d}"
COLS_PATTERN = "cols-{c:06d}"  # a chunk's columns done by one rank of several (.npy) and its diagnostics (.json)
SWEEP_METHODS = ("diffin", "diffin-exact", "diffin-frozen", "diffin-expected")
DEFAULT_DIM = 256
"""Chosen from the table in BENCHMARKS.md ("Trajectory influence embeddings")."""


@dataclass
class EmbedConfig:
    """The embedding's own options (the sweep's are :class:`diffin.ScoreConfig`'s)."""

    dim: int = config_field(DEFAULT_DIM, "K, the embedding's width (directions swept); K >= P gives an exact "
                                         "embedding (identity projection)")
    projection: str = config_field("gradients", "projection R: 'gaussian', 'rademacher' (random), 'gradients' "
                                               "(the training gradients' dominant subspace at theta_T), "
                                               "'identity' (exact, K = P) or 'orthogonal' (exact, small models)",
                                   choices=PROJECTIONS)
    projection_seed: int = config_field(0, "seed of the projection's rows")
    chunk: int | None = config_field(None, "directions swept together (default: as many as memory_mb allows)")
    memory_mb: float = config_field(1024.0, "memory budget of one chunk's sweep state (MiB)")
    power_iters: int = config_field(1, "projection='gradients': power iterations of the range finder")
    basis_samples: int | None = config_field(
        20000, "projection='gradients': training samples the range finder reads (a seeded random subset "
               "when N is larger; None: all)")

    def __post_init__(self) -> None:
        if int(self.dim) < 1:
            raise ConfigError(f"dim must be >= 1, got {self.dim}")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.chunk is not None and int(self.chunk) < 1:
            raise ConfigError(f"chunk must be >= 1, got {self.chunk}")
        if self.basis_samples is not None and int(self.basis_samples) < 1:
            raise ConfigError(f"basis_samples must be >= 1, got {self.basis_samples}")
        if int(self.power_iters) < 0:
            raise ConfigError(f"power_iters must be >= 0, got {self.power_iters}")
        if not self.memory_mb > 0:
            raise ConfigError(f"memory_mb must be > 0, got {self.memory_mb}")


class Directions(Target):
    """K rows of R as a target of K "directions": f_k(θ, r) = ⟨R_k, (θ, r)⟩, whose gradient is
    R_k itself. A sweep of it gives columns k0..k1−1 of the embedding."""

    kind = "directions"

    def __init__(self, projection: Projection, k0: int, k1: int) -> None:
        self.projection, self.k0, self.k1 = projection, k0, k1
        self.size = k1 - k0

    def _rows(self, like: Tensor) -> Tensor:
        return self.projection.rows(self.k0, self.k1, like.dtype, like.device)

    def grads(self, fm: FlatModel, theta: Tensor) -> Tensor:
        return self.projection.split(self._rows(theta))[0].clone()

    def stat_grads(self, fm: FlatModel, theta: Tensor, stats: Tensor) -> Tensor:
        return self.projection.split(self._rows(stats))[1].clone()

    def values(self, fm: FlatModel, theta: Tensor) -> Tensor:
        return self.grads(fm, theta) @ theta


def embed(
    run: str | os.PathLike[str] | Run,
    model: nn.Module,
    loss_fn: LossFn,
    *,
    train: Any,
    dim: int | None = None,
    out: str | os.PathLike[str] | None = None,
    projection: str | None = None,
    projection_seed: int | None = None,
    chunk: int | None = None,
    memory_mb: float | None = None,
    power_iters: int | None = None,
    basis_samples: int | None = None,
    method: str | None = None,
    config: ScoreConfig | None = None,
    embed_config: EmbedConfig | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    **options: Any,
) -> Embedding:
    """The trajectory influence embedding of every training sample: E (N × K), E[z] = R e_z.

    Args:
        run, model, loss_fn, train: as for :func:`diffin.influence`.
        dim: K (default 256 with the ``gradients`` projection, chosen from the table in
            BENCHMARKS.md); ``dim >= P'`` (parameters plus train-mode running statistics) gives the
            exact embedding (identity projection, K = P').
        out: folder for ``embedding.npy`` + ``embedding.json`` (and the build's resume state). A
            folder holding the same embedding (run, data, config, projection) is loaded, not rebuilt;
            another one is refused unless ``overwrite``.
        projection / projection_seed / chunk / memory_mb / power_iters / basis_samples:
            :class:`EmbedConfig` fields (``embed_config``: the whole dataclass; a keyword given
            here overrides its field).
        method: a sweep variant (``diffin``, ``diffin-exact``, ``diffin-frozen``, ``diffin-expected``).
        config / options: :class:`diffin.ScoreConfig` or its fields (``convention``, ``hvp``, ...).
            ``hvp`` defaults to ``"exact"`` here (one double backward per direction: measured 4× faster
            per direction than central differences at width 256 on mnist5k-mlp).
        resume: continue a killed build in ``out`` (bit-identical to an uninterrupted one).

    Returns:
        :class:`diffin.Embedding` (``values``: (N, K) in the model's dtype, memory-mapped when
        ``out`` is given), with the model, loss and data bound for queries
        (:meth:`~diffin.Embedding.influence`, :meth:`~diffin.Embedding.self_influence`,
        :meth:`~diffin.Embedding.top`). Sign and units: loss_change_if_removed (docs/method.md §2).
    """
    from .._api import _fingerprint_or_token, _score_one, scoring_model

    ecfg = config_from_kwargs(EmbedConfig, embed_config, **{k: v for k, v in {
        "dim": dim, "projection": projection, "projection_seed": projection_seed, "chunk": chunk,
        "memory_mb": memory_mb, "power_iters": power_iters, "basis_samples": basis_samples}.items()
        if v is not None})
    if method is not None:
        options["method"] = method
    if config is None and "hvp" not in options:
        options["hvp"] = "exact"
    cfg = config_from_kwargs(ScoreConfig, config, **options)
    if cfg.method not in SWEEP_METHODS:
        raise UnsupportedMethodError(
            f"an embedding is built by a backward sweep; method must be one of {SWEEP_METHODS}, got {cfg.method!r}")
    if cfg.predicts != "replay":
        raise UnsupportedMethodError("an embedding answers predicts='replay' (the recorded run's sweep)")
    if resume and out is None:
        raise ConfigError("resume=True needs out= (the folder whose build to continue)")
    if resume and overwrite:
        raise ConfigError("resume=True continues the saved build, overwrite=True discards it: choose one")
    run_obj = run if isinstance(run, Run) else load_run(run)
    run_obj.check_model(model)
    fm = FlatModel(scoring_model(model, cfg.device), loss_fn, trainable=run_obj.trainable)
    from ..trajectory import Trajectory

    traj = Trajectory(run_obj, fm)
    n_stats = fm.num_stats if (fm.stat_names and traj.train_mode) else 0
    proj = Projection.make(ecfg.projection, ecfg.dim, fm.num_params, n_stats, ecfg.projection_seed)
    from .._data import DataSource

    train_src = DataSource(train, fm.dtype, fm.device, name="train")
    n = len(train_src)
    data_key = {"train": _fingerprint_or_token(train), "target": "embedding"}
    key = {"run": run_obj.fingerprint, "train": data_key["train"]}
    ident = {"key": key, "config": resume_config(cfg.to_json()), "projection": proj.to_json(), "n": n,
             "basis": [ecfg.power_iters, ecfg.basis_samples] if proj.kind == "gradients" else None,
             "diffin_version": __version__}
    folder = Path(out) if out is not None else None
    rank, n_proc = world()
    if folder is not None:
        done_emb = _existing(folder, ident, overwrite, resume) if rank == 0 else False
        if n_proc > 1:  # every rank follows rank 0's reading of the folder
            done_emb = bool(broadcast_tensor(torch.tensor([float(done_emb)]) if rank == 0 else None,
                                             torch.zeros(1)).item())
        if done_emb:
            return load_embedding(folder, run=run_obj, model=model, loss_fn=loss_fn, train=train, device=cfg.device)
    if proj.kind == "gradients":
        saved = None if folder is None else folder / WORK_DIR / BASIS_NPY
        basis = None
        if rank == 0:
            if resume and saved is not None and saved.exists():
                basis = torch.as_tensor(np.load(saved))
            else:
                t_basis = time.perf_counter()
                basis = _gradient_basis(fm, traj, train_src, run_obj, n_stats, ecfg)
                log.info("embedding: gradient subspace of dim %d in %.1fs", basis.shape[0],
                         time.perf_counter() - t_basis)
        if n_proc > 1:  # one basis for every rank: rank 0's
            basis = broadcast_tensor(basis, torch.empty(0, dtype=fm.dtype, device=fm.device))
        assert basis is not None
        proj.set_basis(basis)
    width = int(ecfg.chunk) if ecfg.chunk else _chunk_width(fm, traj, n, n_stats, ecfg.memory_mb)
    width = max(1, min(width, proj.dim))
    spans = [(k, min(k + width, proj.dim)) for k in range(0, proj.dim, width)]
    np_dtype = torch.empty(0, dtype=fm.dtype).numpy().dtype
    done: set[int] = set()
    seconds = 0.0
    values: np.ndarray | None = None
    if folder is None:
        values = np.zeros((n, proj.dim), dtype=np_dtype)
    elif rank == 0:
        values, done, seconds = _open_partial(folder, ident, (n, proj.dim), np_dtype, spans, resume)
        _gather_cols(folder, values, spans, done, ident, seconds)  # what a killed multi-process build left
        if proj.basis is not None:
            write_npy(folder / WORK_DIR / BASIS_NPY, proj.basis.numpy())
    if n_proc > 1 and folder is not None:
        barrier()  # rank 0 has the work folder ready
        if rank != 0:
            done = set(json.loads((folder / WORK_DIR / PROGRESS_JSON).read_text(encoding="utf-8"))["done"])
    diags: list[dict[str, Any]] = []
    variant = cfg.method
    first = True
    t0 = time.perf_counter()
    for c, (k0, k1) in enumerate(spans):
        if c in done or c % n_proc != rank:
            continue
        log.info("embedding: directions %d..%d of %d", k0, k1 - 1, proj.dim)
        # several processes resume chunk by chunk (a chunk's sweep state is one process's)
        chunk_out = None if folder is None or n_proc > 1 else folder / WORK_DIR / CHUNK_PATTERN.format(c=c)
        res = _score_one(run_obj, model, loss_fn, train=train, target=Directions(proj, k0, k1), cfg=cfg,
                         progress=progress and rank == 0, out=chunk_out, overwrite=False, groups=None,
                         resume=chunk_out is not None, data_key=data_key, check_finite=first and not done,
                         local=True)
        first = False
        variant = res.variant
        diag = {"directions": [k0, k1], "seconds": res.seconds, **_small(res.diagnostics)}
        if folder is not None and n_proc > 1:  # this rank's columns, for rank 0 to gather
            write_npy(folder / WORK_DIR / (COLS_PATTERN.format(c=c) + ".npy"), res.scores)
            write_json(folder / WORK_DIR / (COLS_PATTERN.format(c=c) + ".json"), diag)
            continue
        diags.append(diag)
        assert values is not None
        values[:, k0:k1] = res.scores
        if folder is not None:
            assert isinstance(values, np.memmap)
            values.flush()
            done.add(c)
            _write_progress(folder, ident, spans, done, seconds + time.perf_counter() - t0)
            shutil.rmtree(chunk_out, ignore_errors=True)  # type: ignore[arg-type]
    if n_proc > 1:
        if folder is None:  # each rank filled its own columns of a zero matrix: the sum is the whole
            assert values is not None
            values = all_reduce_sum(torch.from_numpy(values)).numpy()
        else:
            barrier()  # every rank's columns are on disk
            if rank != 0:
                barrier()  # rank 0 writes the embedding
                return load_embedding(folder, run=run_obj, model=model, loss_fn=loss_fn, train=train,
                                      device=cfg.device)
            assert isinstance(values, np.memmap)
            diags += _gather_cols(folder, values, spans, done, ident, seconds + time.perf_counter() - t0)
            diags.sort(key=lambda d: d["directions"][0])
    seconds += time.perf_counter() - t0
    manifest = {
        "format": 1, "kind": "diffin-embedding", "diffin_version": __version__,
        "column": "loss_change_if_removed of the target <R_k, (theta_T, r_T)>",
        "meaning": "row z: R e_z, the projected change of the final state if z had been removed; a target f's "
                   "scores are values @ (R grad f(theta_T)) (loss units; positive = helpful)",
        "shape": [n, proj.dim], "dtype": str(np_dtype), "projection": proj.to_json(), "key": key,
        "run": str(run_obj.path), "method": cfg.method, "variant": variant, "config": cfg.to_json(),
        "param_names": list(fm.spec.names), "param_numels": list(fm.spec.numels),
        "chunk_width": width, "seconds": seconds, "chunks": diags,
    }
    if folder is None:
        return Embedding(values, manifest, None, run=run_obj, model=model, loss_fn=loss_fn, train=train,
                         device=cfg.device, projection=proj)
    del values
    if proj.basis is not None:
        os.replace(folder / WORK_DIR / BASIS_NPY, folder / BASIS_NPY)
    os.replace(folder / WORK_DIR / PARTIAL_NPY, folder / EMBED_NPY)
    write_json(folder / EMBED_JSON, {**manifest, "ident": ident})
    shutil.rmtree(folder / WORK_DIR, ignore_errors=True)
    if n_proc > 1:
        barrier()  # the other ranks load what rank 0 wrote
    return load_embedding(folder, run=run_obj, model=model, loss_fn=loss_fn, train=train, device=cfg.device)


def _gradient_basis(fm: FlatModel, traj: Any, train: Any, run: Run, n_stats: int, ecfg: EmbedConfig) -> Tensor:
    """The rows of a ``gradients`` projection at θ_T (and r_T), in eval mode (:mod:`._basis`)."""
    from .._api import _eval_mode
    from .._data import probe_model_and_loss

    with _eval_mode(fm.model), torch.no_grad():
        probe_model_and_loss(train, fm)
        if n_stats:
            at = traj.state(run.n_steps)
            theta, stats = at.theta, at.stats
        else:
            theta, stats = traj.theta(run.n_steps), None
        chunk = int(run.batch_size_hint() or 64) if fm.coupled else 256
        src = train
        m = ecfg.basis_samples
        if m is not None and len(train) > m:  # whole chunks of the recorded batch size for a batch loss
            n_chunks = -(-len(train) // chunk)
            pick = np.random.default_rng([int(ecfg.projection_seed), 0xBA5]).choice(
                n_chunks, size=max(1, int(m) // chunk), replace=False)
            ids = np.concatenate([np.arange(c * chunk, min((c + 1) * chunk, len(train))) for c in np.sort(pick)])
            src = _Subset(train, ids)
        return gradient_basis(fm, theta, stats, src, chunk, int(ecfg.dim), int(ecfg.projection_seed),
                              int(ecfg.power_iters))


def _small(diag: dict[str, Any]) -> dict[str, Any]:
    return {k: diag[k] for k in ("hvp", "replay_drift", "adjoint_growth", "optimizer") if k in diag}


def _chunk_width(fm: FlatModel, traj: Any, n: int, n_stats: int, memory_mb: float) -> int:
    """Directions per sweep under ``memory_mb``: each carries θ̄ and the optimizer state's adjoints
    (P each), the step's w and H w (P each), its statistics adjoint (R) and a float64 score column (N)."""
    item = torch.empty(0, dtype=fm.dtype).element_size()
    n_state = len(traj.rule.state_keys)
    per_dir = item * (fm.num_params * (4 + n_state) + 2 * n_stats) + 8 * n
    return max(1, int(memory_mb * 2**20 // per_dir))


def _existing(folder: Path, ident: dict[str, Any], overwrite: bool, resume: bool) -> bool:
    """Whether ``folder`` holds this embedding already (True); refuse another one unless
    ``overwrite`` (which removes it); refuse a stale build unless ``resume`` or ``overwrite``."""
    manifest = folder / EMBED_JSON
    work = folder / WORK_DIR
    if overwrite:
        for p in (manifest, folder / EMBED_NPY, folder / BASIS_NPY):
            p.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        return False
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8")).get("ident")
        except (OSError, json.JSONDecodeError):
            old = None
        if old == json.loads(json.dumps(ident)) and (folder / EMBED_NPY).exists():
            log.info("embedding: %s holds this embedding already; loading it", folder)
            return True
        raise OutputExistsError(
            f"{folder} holds an embedding of another run, data, config or projection; pass overwrite=True "
            "(--overwrite) to replace it, or choose another folder")
    if work.exists() and not resume:
        raise OutputExistsError(
            f"{work} holds an interrupted embedding build; pass resume=True (--resume) to continue it, or "
            "overwrite=True (--overwrite) to discard it and start again")
    return False


def _open_partial(folder: Path, ident: dict[str, Any], shape: tuple[int, int], dtype: np.dtype,
                  spans: list[tuple[int, int]], resume: bool) -> tuple[np.memmap, set[int], float]:
    """The memory-mapped partial embedding, the chunks already done and the seconds spent on them
    (a fresh file when there is nothing to resume)."""
    work = folder / WORK_DIR
    prog_path, part = work / PROGRESS_JSON, work / PARTIAL_NPY
    if resume and prog_path.exists() and part.exists():
        prog = json.loads(prog_path.read_text(encoding="utf-8"))
        want = json.loads(json.dumps({"ident": ident, "spans": [list(s) for s in spans]}))
        if {"ident": prog.get("ident"), "spans": prog.get("spans")} != want:
            raise ResumeMismatchError(
                f"{work} holds the build of an embedding of another run, data, config, projection or chunk "
                "width; resume with the same arguments, or pass overwrite=True (--overwrite) to start again")
        values = np.lib.format.open_memmap(part, mode="r+")
        log.info("embedding: resuming %s (%d of %d chunks done)", folder, len(prog["done"]), len(spans))
        return values, set(prog["done"]), float(prog.get("seconds", 0.0))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    values = np.lib.format.open_memmap(part, mode="w+", dtype=dtype, shape=shape)
    _write_progress(folder, ident, spans, set(), 0.0)
    return values, set(), 0.0


def _gather_cols(folder: Path, values: np.memmap, spans: list[tuple[int, int]], done: set[int],
                 ident: dict[str, Any], seconds: float) -> list[dict[str, Any]]:
    """Rank 0: copy every chunk's columns a rank of several wrote (``cols-NNNNNN.npy``, by this build or
    a killed one) into ``values``, mark the chunk done, remove its files; returns their diagnostics.
    Nothing to gather (a single-process build): nothing is written."""
    work = folder / WORK_DIR
    if not any(work.glob("cols-*")):
        return []
    diags = []
    for c, (k0, k1) in enumerate(spans):
        path = work / (COLS_PATTERN.format(c=c) + ".npy")
        if c in done or not path.exists():
            continue
        cols = np.load(path, allow_pickle=False)
        if cols.shape != (values.shape[0], k1 - k0):
            raise ResumeMismatchError(f"{path} holds columns of shape {cols.shape}, not {(values.shape[0], k1 - k0)}; "
                                      "pass overwrite=True (--overwrite) to start the build again")
        values[:, k0:k1] = cols
        meta = work / (COLS_PATTERN.format(c=c) + ".json")
        if meta.exists():
            diags.append(json.loads(meta.read_text(encoding="utf-8")))
        done.add(c)
    values.flush()
    _write_progress(folder, ident, spans, done, seconds)
    for p in list(work.glob("cols-*.npy")) + list(work.glob("cols-*.json")):
        p.unlink(missing_ok=True)
    return diags


def _write_progress(folder: Path, ident: dict[str, Any], spans: list[tuple[int, int]], done: set[int],
                    seconds: float) -> None:
    write_json(folder / WORK_DIR / PROGRESS_JSON, {"ident": ident, "spans": [list(s) for s in spans],
                                                   "done": sorted(done), "seconds": seconds})
