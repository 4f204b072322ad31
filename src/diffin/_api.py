"""``diffin.influence`` and ``diffin.score``: score every training sample of a recorded run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _constants as C
from ._data import DataSource
from ._errors import ConfigError, DataMismatchError, OutputExistsError
from ._functional import FlatModel, LossFn
from ._io import write_json, write_npy
from ._version import __version__
from .config import ScoreConfig, config_from_kwargs
from .estimators import ScoringContext, get_estimator
from .recording.run import Run, load_run
from .targets import make_target

log = logging.getLogger("diffin")


@dataclass
class ScoreResult:
    """Scores with everything needed to interpret and reproduce them.

    ``scores``: (N,) or (N, Q) numpy array in the model's dtype: the predicted change of the
    target (loss units) if each training sample had been removed; positive = helpful.
    ``variant``: the estimator actually run (``diffin`` resolves to a concrete variant).
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
        }

    def save(self, out: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write ``scores.npy`` and ``scores.json`` (with the config) into ``out``.

        A folder holding scores made with a different config is refused unless ``overwrite``.
        """
        out = Path(out)
        meta_path = out / C.SCORES_JSON
        if meta_path.exists() and not overwrite:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
            if old.get("config") != self.config.to_json() or old.get("run") != self.run:
                raise OutputExistsError(
                    f"{out} holds scores made with another config or run; pass overwrite=True "
                    "(--overwrite) or choose another folder"
                )
        write_npy(out / C.SCORES_NPY, self.scores)
        write_json(meta_path, self.to_json())
        return out


def score(
    run: str | os.PathLike[str] | Run,
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
    **options: Any,
) -> ScoreResult:
    """Score every training sample of a recorded run; see :func:`influence` for the arguments.

    ``groups`` (lists of ids): the sweep variants also predict the effect of removing each whole
    group at once (``ScoreResult.group_scores``; under the ``keep`` convention it is the sum of
    the members' scores, under ``renormalize`` it accounts for the shrunken batches).

    Returns a :class:`ScoreResult` (scores, the variant used, config, timing, diagnostics) and
    saves it into ``out`` when given.
    """
    if method is not None:
        options["method"] = method
    cfg = config_from_kwargs(ScoreConfig, config, **options)
    est_cls = get_estimator(cfg.method)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise ConfigError("loss_fn must be callable: loss_fn(outputs, targets) -> per-sample losses")
    run_obj = run if isinstance(run, Run) else load_run(run)
    run_obj.check_model(model)
    fm = FlatModel(model, loss_fn, trainable=run_obj.trainable)
    train_src = DataSource(train, fm.dtype, fm.device, name="train")
    run_obj.check_ids(len(train_src))
    tgt = make_target(target, train_src, fm, pairwise=cfg.pairwise, batch_size=cfg.batch_size)
    est_cls.check(run_obj, tgt.kind)
    group_arrays = None
    if groups is not None:
        group_arrays = [np.asarray(g, dtype=np.int64).reshape(-1) for g in groups]
        bad = [k for k, g in enumerate(group_arrays) if g.size and (g.min() < 0 or g.max() >= len(train_src))]
        if bad:
            raise DataMismatchError(f"groups {bad[:5]} hold ids outside [0, {len(train_src)})")
    ctx = ScoringContext(run_obj, fm, train_src, tgt, cfg, progress=progress, groups=group_arrays)
    t0 = time.perf_counter()
    with _eval_mode(model), torch.no_grad():
        output = est_cls().score(ctx)
    seconds = time.perf_counter() - t0
    if ctx._hvp_mode is not None:  # the estimator used Hessian-vector products
        output.diagnostics["hvp"] = {"mode": ctx._hvp_mode, "reason": ctx.hvp_reason}
        log.info("HVPs: %s (%s)", ctx._hvp_mode, ctx.hvp_reason)
    np_dtype = torch.empty(0, dtype=fm.dtype).numpy().dtype
    scores = output.scores.detach().to("cpu").numpy().astype(np_dtype, copy=False)
    if not np.all(np.isfinite(scores)):
        log.warning("%s produced non-finite scores; check the run and the fd_eps setting", cfg.method)
    if output.variant != cfg.method:
        log.info("method %s ran as %s", cfg.method, output.variant)
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
    )
    if out is not None:
        result.save(out, overwrite=overwrite)
    return result


def influence(
    run: str | os.PathLike[str] | Run,
    model: nn.Module,
    loss_fn: LossFn,
    *,
    train: Any,
    target: Any,
    method: str = "diffin",
    pairwise: bool = False,
    progress: bool = True,
    config: ScoreConfig | None = None,
    **options: Any,
) -> np.ndarray:
    """Influence of every training sample on a target, as a numpy array.

    Args:
        run: a run folder written by :class:`diffin.Recorder` (or a loaded :class:`Run`).
        model: a module of the trained architecture. Parameter values are taken from the run,
            never from the module; its dtype decides the computation's dtype.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-sample losses (reduction "none"),
            the same loss the training loop averaged over each batch.
        train: the training set, indexed by the ids recorded at every step: an
            ``(inputs, targets)`` pair of tensors/arrays, or a ``Dataset`` of (input, target).
        target: ``(inputs, targets)`` / Dataset → the mean loss over them; ``"self"`` → each
            sample's own loss.
        method: an estimator name (``diffin.methods()``); ``"diffin"`` picks the best variant.
        pairwise: with target examples, one column per example (N × Q).
        progress: show a progress bar.
        config / options: :class:`diffin.ScoreConfig` or its fields as keywords
            (``hvp="exact"``, ``convention="renormalize"``, ...).

    Returns:
        ``(N,)`` (or ``(N, Q)`` with ``pairwise=True``) array in the model's dtype:
        ``score[i]`` ≈ f(θ_T without sample i) − f(θ_T), in the target's loss units.
        Positive: the sample helped (removing it raises the loss). Negative: it hurt.
    """
    return score(
        run, model, loss_fn, train=train, target=target, method=method, pairwise=pairwise,
        progress=progress, config=config, **options,
    ).scores


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)
