"""``diffin.influence`` and ``diffin.score``: score every training sample of a recorded run."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _constants as C
from ._data import DataSource, check_id_groups, fingerprint, probe_model_and_loss
from ._distributed import ShardedFlatModel, barrier, world
from ._errors import (
    BatchLossUnsupportedError,
    ConfigError,
    DataMismatchError,
    OutputExistsError,
    UntrainedRowsWarning,
)
from ._functional import FlatModel, LossFn, check_convention
from ._io import write_json, write_npy
from ._resume import NO_RESUME, RESUME_DIR, SweepResume, refuse_stale_state, resume_config, world_size
from ._train_mode import eval_mode as _eval_mode
from ._trust import assess, check_removals, warn_if_unstable
from ._version import __version__
from .config import ScoreConfig, config_from_kwargs
from .estimators import ScoringContext, get_estimator
from .recording.run import Run, load_run
from .targets import SelfLoss, Target, make_target

log = logging.getLogger("diffin")


@dataclass
class ScoreResult:
    """Scores with everything needed to interpret and reproduce them.

    ``scores``: (N,) or (N, Q) numpy array in the model's dtype: the predicted change of the
    target (loss units) if each training sample had been removed; positive = helpful.
    ``variant``: the estimator actually run (``diffin`` resolves to a concrete variant).
    ``key``: what made the scores besides ``config``: ``run`` (:attr:`Run.fingerprint`),
    ``train`` and ``target`` (content hashes of the data, ``diffin._data.fingerprint``; data
    it cannot hash gets a random token, so a rerun into the same folder needs ``overwrite``).
    """

    scores: np.ndarray
    method: str
    variant: str
    config: ScoreConfig
    run: str
    target_kind: str
    seconds: float
    diagnostics: dict[str, Any] = field(default_factory=dict)
    group_scores: np.ndarray | None = None
    key: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "diffin_version": __version__,
            "column": C.SCORE_COLUMN,
            "meaning": "predicted change of the target if the sample had been removed "
            "(loss units; positive = helpful, negative = harmful)",
            "method": self.method,
            "variant": self.variant,
            "run": self.run,
            "target": self.target_kind,
            "shape": list(self.scores.shape),
            "dtype": str(self.scores.dtype),
            "seconds": self.seconds,
            "diagnostics": self.diagnostics,
            "config": self.config.to_json(),
            "key": self.key,
        }

    def save(self, out: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write ``scores.npy`` and ``scores.json`` (with the config and the key) into ``out``.

        A folder holding scores made from another run (:attr:`Run.fingerprint`), other training
        or target data, or another config is refused (:class:`OutputExistsError`, nothing
        written) unless ``overwrite``; the same ones are simply written again.
        """
        out = Path(out)
        if not overwrite:
            refuse_other_scores(out, self.config, self.key, self.run)
        write_npy(out / C.SCORES_NPY, self.scores)
        write_json(out / C.SCORES_JSON, self.to_json())
        return out


def result_key(run: Run, train: Any, target: Any) -> dict[str, str]:
    """The identity of what a score is computed from, besides its config: the run's content
    hash and the content hashes of the training and target data (see :func:`diffin._data.fingerprint`;
    a ``Target`` object hashes as its class)."""
    tgt = f"target-object:{type(target).__qualname__}" if isinstance(target, Target) else target
    return {"run": run.fingerprint, "train": _fingerprint_or_token(train), "target": _fingerprint_or_token(tgt)}


def _fingerprint_or_token(data: Any) -> str:
    """The data's fingerprint; data it cannot hash gets a fresh random token, so a saved result
    made from it is never mistaken for another (a rerun into the same folder needs overwrite)."""
    try:
        return fingerprint(data)
    except DataMismatchError:
        return f"unhashable-{uuid.uuid4().hex}"


def refuse_other_scores(out: Path, config: ScoreConfig, key: dict[str, str], run_path: str) -> None:
    """Raise :class:`OutputExistsError` if ``out`` holds scores made from anything else than
    ``config`` and ``key`` (a result without a key, built by hand, compares its run path)."""
    meta_path = out / C.SCORES_JSON
    if not meta_path.exists():
        return
    try:
        old = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = {}
    if not isinstance(old, dict):
        old = {}
    differs = []
    old_cfg, new_cfg = resume_config(old.get("config") or {}), resume_config(config.to_json())
    if old_cfg != new_cfg:
        fields = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
        differs.append("config (" + ", ".join(f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}"
                                              for k in fields[:4]) + ")")
    old_key = old.get("key") or {}
    if key:
        names = {"run": "run (another recording)", "train": "training data", "target": "target data"}
        differs += [names.get(k, k) for k in key if old_key.get(k) != key[k]]
    elif old.get("run") != run_path:
        differs.append("run")
    if differs:
        raise OutputExistsError(
            f"{out} holds scores made with a different {', '.join(differs)}; pass overwrite=True "
            "(on the command line: --overwrite) to replace them, or choose another output folder"
        )


def score(
    run: str | os.PathLike[str] | Run | list[Any],
    model: nn.Module,
    loss_fn: LossFn,
    *,
    train: Any,
    target: Any,
    method: str | None = None,
    config: ScoreConfig | None = None,
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    groups: list[Any] | None = None,
    resume: bool = False,
    **options: Any,
) -> ScoreResult:
    """Score every training sample of a recorded run; see :func:`influence` for the arguments.

    ``run``: one run, or a list of independently recorded runs whose scores are averaged
    (``ScoreResult.diagnostics["runs"]`` lists each run's variant and time).

    ``out``: save the result there (:meth:`ScoreResult.save`). A folder holding scores made from
    another run, other data or another config is refused before anything is computed, unless
    ``overwrite``. With ``out``, the sweep variants save their state into ``out/.resume`` at
    segment boundaries (every ``resume_every_steps`` steps or ``resume_every_minutes`` minutes);
    ``resume=True`` continues a killed or failed scoring from there to scores bit-identical to an
    uninterrupted one (docs/method.md §4.1, "Resumable sweeps"), or starts when there is no state.
    A state of another config, run, data, method or world size is refused
    (:class:`diffin.ResumeMismatchError`); without ``resume`` an existing state is refused
    (:class:`OutputExistsError`) unless ``overwrite``, which discards it. The state is removed once
    the scores are written. Several runs cannot be resumed (``resume=True`` is refused with them).

    ``groups`` (lists of ids): the sweep variants also predict the effect of removing each whole
    group at once (``ScoreResult.group_scores``; under the ``keep`` convention it is the sum of
    the members' scores, under ``renormalize`` it accounts for the shrunken batches).

    Returns a :class:`ScoreResult` (scores, the variant used, config, timing, diagnostics) and
    saves it into ``out`` when given.
    """
    if method is not None:
        options["method"] = method
    cfg = config_from_kwargs(ScoreConfig, config, **options)
    get_estimator(cfg.method)  # an unknown method is refused before anything is loaded
    if resume and out is None:
        raise ConfigError("resume=True needs out= (the folder whose .resume state to continue from)")
    if resume and overwrite:
        raise ConfigError("resume=True continues the saved state, overwrite=True discards it: choose one")
    if isinstance(run, (list, tuple)):
        if resume:
            raise ConfigError(
                "resume=True is not supported when scoring several runs; score each run into its own "
                "folder with resume=True, or rerun the list without it"
            )
        if out is not None and not overwrite and (Path(out) / RESUME_DIR).exists():
            refuse_stale_state(Path(out) / RESUME_DIR)
        return _score_runs(list(run), model, loss_fn, train=train, target=target, config=cfg,
                           progress=progress, out=out, overwrite=overwrite, groups=groups)
    return _score_one(run, model, loss_fn, train=train, target=target, cfg=cfg, progress=progress, out=out,
                      overwrite=overwrite, groups=groups, resume=resume)


def _score_one(
    run: str | os.PathLike[str] | Run, model: nn.Module, loss_fn: LossFn, *, train: Any, target: Any,
    cfg: ScoreConfig, progress: bool, out: str | os.PathLike[str] | None, overwrite: bool,
    groups: list[Any] | None, resume: bool, data_key: dict[str, str] | None = None, check_finite: bool = True,
    local: bool = False,
) -> ScoreResult:
    """:func:`score` of one run. ``data_key``: the content hashes of ``train`` and ``target``
    (``{"train", "target"}``) when the caller has them (several runs of the same data hash it once);
    ``check_finite=False`` when the caller already checked this data for NaN/Inf. ``local``: score in
    this process alone even inside a process group (the caller split the work another way, e.g.
    :func:`diffin.embed` by directions), so no batch is split and this process writes ``out``."""
    est_cls = get_estimator(cfg.method)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise ConfigError("loss_fn must be callable: loss_fn(outputs, targets) -> per-sample losses")
    run_obj = run if isinstance(run, Run) else load_run(run)
    run_obj.check_model(model)
    model = scoring_model(model, cfg.device)
    fm = FlatModel(model, loss_fn, trainable=run_obj.trainable)
    check_convention(cfg.convention, fm.coupled)
    rank, n_proc = (0, 1) if local else world()
    if n_proc > 1 and fm.coupled:
        raise BatchLossUnsupportedError(
            "scoring a batch-coupled loss on several processes is not supported: a rank's part of a batch is "
            "not a batch of the loss (in-batch negatives span the ranks); score it in one process"
        )
    if n_proc > 1 and any((run_obj.train_modes or {}).values()):
        raise BatchLossUnsupportedError(
            "scoring a run whose BatchNorm/dropout layers trained in training mode on several processes is not "
            "supported: a rank's part of a batch has other batch statistics and dropout masks than the step had; "
            "score it in one process (docs/method.md §4.8)"
        )
    if n_proc > 1:  # inside a torch.distributed group: split every batch across the ranks (§4.5)
        fm = ShardedFlatModel(fm)
    train_src = DataSource(train, fm.dtype, fm.device, name="train")
    run_obj.check_ids(len(train_src))
    tgt = make_target(target, train_src, fm, pairwise=cfg.pairwise, batch_size=cfg.batch_size,
                      self_chunk=run_obj.batch_size_hint() or cfg.batch_size)
    est_cls.check(run_obj, tgt.kind, cfg.predicts, coupled=fm.coupled)
    key = result_key(run_obj, train, target) if data_key is None else {"run": run_obj.fingerprint, **data_key}
    if out is not None and not overwrite:
        refuse_other_scores(Path(out), cfg, key, str(run_obj.path))
    with _eval_mode(model):
        check_inputs(train_src, tgt, fm, cfg.batch_size, finite=check_finite)
    warn_untrained_rows(run_obj, len(train_src))
    group_arrays = None
    if groups is not None:
        group_arrays = check_id_groups(groups, len(train_src), allow_empty=True)
    hook = _resume_hook(out, cfg, key, tgt.kind, _groups_key(group_arrays), resume, overwrite)
    ctx = ScoringContext(run_obj, fm, train_src, tgt, cfg, progress=progress, groups=group_arrays, resume=hook)
    t0 = time.perf_counter()
    with _eval_mode(model), torch.no_grad():
        output = est_cls().score(ctx)
    seconds = time.perf_counter() - t0
    if ctx.hvp_used is not None:  # the estimator used Hessian-vector products
        output.diagnostics["hvp"] = ctx.hvp_used
        log.info("HVPs: %s (%s)", ctx.hvp_used["mode"], ctx.hvp_used["reason"])
    np_dtype = torch.empty(0, dtype=fm.dtype).numpy().dtype
    scores = output.scores.detach().to("cpu").numpy().astype(np_dtype, copy=False)
    growth = float(output.diagnostics.get("adjoint_growth", 1.0))
    if not np.all(np.isfinite(scores)) and not growth < 1e12:
        log.warning(
            "%s produced non-finite scores: the adjoint grew by %.1e over the backward sweep. The "
            "linearised training dynamics are unstable (steps at the edge of stability, η·λ_max(H) > 2, "
            "over many steps), so a first-order sensitivity of θ_T does not describe what removing a "
            "sample does to this run. Train with a smaller learning rate, or use 'tracin' (first-order, no adjoint)",
            output.variant, growth,
        )
    elif not np.all(np.isfinite(scores)):
        log.warning(
            "%s produced non-finite scores although the data is finite: the loss may overflow at some "
            "recorded parameters (check the loss of the training data at the checkpoints), or, with "
            "finite-difference HVPs, fd_eps may be too large (try hvp='exact')", output.variant,
        )
    if output.variant != cfg.method:
        log.info("method %s ran as %s", cfg.method, output.variant)
    if cfg.check_removals and tgt.kind != "self":
        with _eval_mode(model):
            output.diagnostics["removal_check"] = check_removals(ctx, scores, cfg.check_removals, progress)
    trust = assess(output.diagnostics, scores, _values_at_end(ctx, model) if est_cls.loss_units else None)
    output.diagnostics["trust"] = trust
    if rank == 0:
        warn_if_unstable(trust, output.variant, stacklevel=4)
    result = ScoreResult(
        scores=scores,
        method=cfg.method,
        variant=output.variant,
        config=cfg,
        run=str(run_obj.path),
        target_kind=tgt.kind,
        seconds=seconds,
        diagnostics=output.diagnostics,
        group_scores=None if output.group_scores is None
        else output.group_scores.detach().cpu().numpy().astype(np_dtype, copy=False),
        key=key,
    )
    result.diagnostics["world_size"] = n_proc
    if out is not None and rank == 0:  # several processes hold the same scores: rank 0 writes
        result.save(out, overwrite=overwrite)
        if hook.saves or hook.resumed:
            log.info("scores written; removing the resume state %s", hook.folder)
        hook.discard()
    if n_proc > 1:
        barrier()  # the other ranks return once the scores are on disk
    return result


def _values_at_end(ctx: ScoringContext, model: nn.Module) -> np.ndarray | None:
    """f(θ_T) of the target, (Q,) (the own losses (N,) for self-influence), for the trust measures;
    None where it cannot be evaluated (a target object without values)."""
    try:
        with _eval_mode(model), torch.no_grad():
            theta_T = ctx.trajectory.theta(ctx.run.n_steps)
            return ctx.target.values(ctx.fm, theta_T).detach().to("cpu", torch.float64).numpy().reshape(-1)
    except NotImplementedError:
        return None


def scoring_model(model: nn.Module, device: str | None) -> nn.Module:
    """The module to score with: ``model`` itself when ``device`` is None or already holds all of
    it, else a copy moved there (``copy.deepcopy(model).to(device)``; the caller's module is never
    moved). The functional model takes its device from this module, and every batch, checkpoint
    and target follows it. ``"cuda"`` without an index means the current CUDA device (under
    torchrun, the process's ``LOCAL_RANK``). A device this machine lacks raises
    :class:`ConfigError`."""
    if device is None:
        return model
    dev = _available_device(torch.device(device))
    tensors = [*model.parameters(), *model.buffers()]
    if tensors and all(t.device == dev for t in tensors):
        return model
    try:
        moved = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - any failure of a user's module to copy
        raise ConfigError(
            f"device={device!r} needs a copy of the model, and copying it failed ({type(e).__name__}: {e}); "
            f"move the model to {device!r} yourself and leave device unset"
        ) from e
    try:
        return moved.to(dev)
    except (RuntimeError, AssertionError) as e:  # a device type this torch build cannot reach
        raise ConfigError(f"cannot move the model to device={device!r} ({e}); use device='cpu'") from e


def _available_device(dev: torch.device) -> torch.device:
    """``dev`` with its index filled in for CUDA, or :class:`ConfigError` if this machine lacks it."""
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={str(dev)!r} was asked for, but this machine has no CUDA device (torch "
                f"{torch.__version__}, torch.cuda.is_available() is False); score on the CPU (device='cpu' or "
                "unset), or install a CUDA build of torch on a machine with a GPU"
            )
        count = torch.cuda.device_count()
        index = dev.index
        if index is None:
            local = os.environ.get("LOCAL_RANK")
            index = int(local) % count if local is not None and world()[1] > 1 else torch.cuda.current_device()
        if index >= count:
            raise ConfigError(
                f"device={str(dev)!r}: this machine has {count} CUDA device(s), cuda:0 .. cuda:{count - 1}"
            )
        return torch.device("cuda", index)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={str(dev)!r} was asked for, but MPS is not available here; use device='cpu'")
    return dev


def _groups_key(groups: list[np.ndarray] | None) -> str | None:
    """A content hash of the removal groups (None without groups), for the resume key."""
    if groups is None:
        return None
    h = hashlib.sha256()
    for g in groups:
        h.update(np.asarray(g, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


def _resume_hook(
    out: str | os.PathLike[str] | None, cfg: ScoreConfig, key: dict[str, str], target_kind: str,
    groups: str | None, resume: bool, overwrite: bool,
) -> SweepResume:
    """The sweep's save/restore hook for ``out/.resume`` (a no-op without ``out``), after the
    checks: ``overwrite`` discards a saved state, no ``resume`` refuses one, ``resume`` refuses one
    of another key (:class:`diffin.ResumeMismatchError`) and logs when there is none."""
    if out is None:
        return NO_RESUME
    folder = Path(out) / RESUME_DIR
    resume_key = {"config": resume_config(cfg.to_json()), **key, "method": cfg.method,
                  "target_kind": target_kind, "groups": groups, "world_size": world_size(),
                  "diffin_version": __version__}
    hook = SweepResume(folder, resume_key, every_steps=int(cfg.resume_every_steps),
                       every_minutes=float(cfg.resume_every_minutes), load_saved=resume)
    if hook.exists():
        if overwrite:
            hook.discard()
        elif not resume:
            refuse_stale_state(folder)
        else:
            hook.check()
    if resume and not hook.exists():
        log.info("no resume state in %s: scoring from the start", folder)
    elif resume:
        log.info("resuming the scoring saved in %s", folder)
    return hook


def _score_runs(
    runs: list[Any], model: nn.Module, loss_fn: LossFn, *, train: Any, target: Any, config: ScoreConfig,
    progress: bool, out: str | os.PathLike[str] | None, overwrite: bool, groups: list[Any] | None,
) -> ScoreResult:
    """Score each of several independently recorded runs of the same training set and average
    the scores (loss units): what a fresh initialisation asks for (docs/method.md §4.4)."""
    if not runs:
        raise ConfigError("run is an empty list; give one run folder or a list of them")
    loaded = [r if isinstance(r, Run) else load_run(r) for r in runs]
    for r in loaded:
        r.check_model(model)
    prints = [r.fingerprint for r in loaded]
    if len(set(prints)) < len(prints):
        raise ConfigError("the same run is listed twice; give independently recorded runs")
    key = result_key(loaded[0], train, target)
    key["run"] = "runs:" + hashlib.sha256("|".join(prints).encode()).hexdigest()[:32]
    if out is not None and not overwrite:
        refuse_other_scores(Path(out), config, key, str(loaded[0].path))
    t0 = time.perf_counter()
    data_key = {"train": key["train"], "target": key["target"]}  # hashed once for every run
    parts = [_score_one(r, model, loss_fn, train=train, target=target, cfg=config, progress=progress, out=None,
                        overwrite=False, groups=groups, resume=False, data_key=data_key, check_finite=k == 0)
             for k, r in enumerate(loaded)]
    shapes = {p.scores.shape for p in parts}
    if len(shapes) != 1:
        raise DataMismatchError(f"the runs gave scores of different shapes {sorted(shapes)}")
    first = parts[0]
    scores = np.mean([p.scores for p in parts], axis=0).astype(first.scores.dtype, copy=False)
    group_scores = None
    if all(p.group_scores is not None for p in parts):
        group_scores = np.mean([p.group_scores for p in parts], axis=0).astype(first.scores.dtype, copy=False)
    diagnostics = dict(first.diagnostics)
    unstable = [p.diagnostics["trust"] for p in parts if not p.diagnostics.get("trust", {}).get("stable", True)]
    if unstable:  # the averaged scores are as trustworthy as their least trustworthy run
        diagnostics["trust"] = unstable[0]
    diagnostics["runs"] = [{"run": p.run, "variant": p.variant, "seconds": p.seconds} for p in parts]
    spread = np.std([p.scores for p in parts], axis=0)
    diagnostics["run_to_run_std_mean"] = float(np.mean(spread))
    result = ScoreResult(
        scores=scores, method=first.method, variant=first.variant, config=config,
        run=",".join(p.run for p in parts), target_kind=first.target_kind,
        seconds=time.perf_counter() - t0, diagnostics=diagnostics, group_scores=group_scores, key=key,
    )
    if out is not None:
        result.save(out, overwrite=overwrite)
    return result


def influence(
    run: str | os.PathLike[str] | Run | list[Any],
    model: nn.Module,
    loss_fn: LossFn,
    *,
    train: Any,
    target: Any,
    method: str | None = None,
    pairwise: bool | None = None,
    progress: bool = True,
    config: ScoreConfig | None = None,
    **options: Any,
) -> np.ndarray:
    """Influence of every training sample on a target, as a numpy array.

    Args:
        run: a run folder written by :class:`diffin.Recorder` (or a loaded :class:`Run`), or a
            list of independently recorded runs of the same training set (other seeds): each is
            scored and the scores are averaged (with ``predicts="retrain"``, the estimate of a
            retraining with a fresh initialisation as well as a fresh order).
        model: a module of the trained architecture. Parameter values are taken from the run,
            never from the module; its dtype decides the computation's dtype.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses (reduction "none"),
            the same loss the training loop averaged over each batch.
        train: the training set, indexed by the ids recorded at every step: an
            ``(inputs, targets)`` pair of tensors/arrays, a map-style ``Dataset`` of
            ``(input, target)``, or one of ``(id, input, target)`` such as
            ``diffin.with_ids(dataset)`` (the one the training loop read; item i must carry id i).
        target: ``(inputs, targets)`` / Dataset → the mean loss over them; ``"self"`` → each
            sample's own loss.
        method: an estimator name (``diffin.methods()``); ``"diffin"`` (the default) picks the
            best variant.
        pairwise: with target examples, one column per example (N × Q). Default False.
        progress: show a progress bar.
        config: a :class:`diffin.ScoreConfig`; its fields can also be given as keywords.
        **options: fields of :class:`diffin.ScoreConfig` as keywords (``hvp="exact"``,
            ``convention="renormalize"``, ...). A keyword given explicitly (``method``,
            ``pairwise`` included) overrides the config's field; one not given leaves it as the
            config has it.

    Before scoring, the data is checked: NaN or Inf in the training or target data raises
    :class:`diffin.NonFiniteDataError` naming the ids; the model and loss are called on two rows
    and any failure raises :class:`diffin.ModelCallError` saying what was called on which shapes
    (integer labels the loss refuses, e.g. int32 for cross-entropy, are cast to int64); training
    rows that were never in a recorded batch give a :class:`diffin.UntrainedRowsWarning`.

    Returns:
        ``(N,)`` (or ``(N, Q)`` with ``pairwise=True``) array in the model's dtype:
        ``score[i]`` ≈ f(θ_T without sample i) − f(θ_T), in the target's loss units.
        Positive: the sample helped (removing it raises the loss). Negative: it hurt.
    """
    if pairwise is not None:
        options["pairwise"] = pairwise
    return score(
        run, model, loss_fn, train=train, target=target, method=method, progress=progress,
        config=config, **options,
    ).scores


def check_inputs(train: DataSource, target: Target, fm: FlatModel, chunk: int, finite: bool = True) -> None:
    """The checks run before scoring: the model and loss callable on a few rows of the training
    and target data (:func:`diffin._data.probe_model_and_loss`, which also sets the targets' cast),
    and, with ``finite``, every value finite (streamed in chunks of ``chunk`` rows). Call with the
    model in eval mode."""
    sources = [train]
    tsrc = getattr(target, "source", None)
    if isinstance(tsrc, DataSource) and not isinstance(target, SelfLoss) and tsrc is not train:
        sources.append(tsrc)
    for src in sources:
        probe_model_and_loss(src, fm)
    for src in sources if finite else ():
        src.check_finite(chunk)


def warn_untrained_rows(run: Run, n_train: int) -> int:
    """Warn (:class:`UntrainedRowsWarning`) if some of the ``n_train`` training rows were never in
    a recorded batch; returns how many. Runs without batch ids are not checked (returns 0)."""
    if not run.has_batch_ids:
        return 0
    seen = np.zeros(n_train, dtype=bool)
    for t in range(run.n_steps):
        seen[run.batch(t)] = True
    missing = int(n_train - seen.sum())
    if missing:
        first = np.flatnonzero(~seen)[:10].tolist()
        warnings.warn(
            f"{missing} of the {n_train} training rows (first ids: {first}) were never in any recorded "
            "batch: the sweep methods (diffin-exact, diffin-frozen, tracin-every-step) give them score 0, "
            "and methods without the batches score them as if trained on. Pass only the training set "
            "the run used, indexed by its recorded ids, unless leaving them out was intended",
            UntrainedRowsWarning, stacklevel=3,
        )
    return missing
