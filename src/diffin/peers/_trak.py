"""TRAK (``traker``), with checkpoints of the recorded run, or the final models of several
independently recorded runs, as its ensemble.

TRAK attributes a model *output* — for classifiers the margin
``log p_y − log Σ_{k≠y} p_k`` of each target example (``task="image_classification"``, which
suits any logits classifier with integer labels) — not the loss. Its score is
``φ(v)ᵀ (ΦᵀΦ + λI)⁻¹ φ(z) · Q(z)`` with φ randomly projected gradients of the margin and Q(z)
= 1 − p_y(z), averaged over the ensemble; traker rescales (ΦᵀΦ)⁻¹ by its mean absolute entry,
so the numbers have no unit. A positive score means z raises the target's margin, which lowers
its loss: the sign is diffin's (helpful = positive). The adapter averages over the target
examples and applies no other scaling: **compare TRAK with rank metrics only**.

On CPU traker uses its ``BasicProjector`` with a normal (Gaussian) projection: the fast
Rademacher ``CudaProjector`` needs the CUDA-only ``fast_jl`` extension.

The ensemble: by default the closing checkpoint of every segment of the run (``checkpoints``
picks steps, ``n_checkpoints`` the last few). TRAK's own setting is an ensemble of
independently trained models: ``runs`` (a list of run folders, e.g. ``diffin train --seeds``)
makes it the final checkpoint of each listed run, one TRAK model id per run, in the order
given (with ``n_checkpoints`` = k: the last k segment ends of each run, k model ids per run);
the adapter's own run then only supplies the architecture and is part of the ensemble only if
it is listed. Every listed run must have the run's parameter names, shapes, trainable
set and dtype, and a training set of the same size.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import Tensor, nn

from .._errors import ConfigError, DataMismatchError, ParameterMismatchError
from ..recording.run import Run, load_run
from ._base import Peer, PeerInputs, take_options

_DEFAULTS: dict[str, Any] = {
    "proj_dim": 1024,
    "checkpoints": None,
    "n_checkpoints": None,
    "task": "image_classification",
    "lambda_reg": 0.0,
    "batch_size": 256,
    "seed": 0,
    "runs": None,
}


class TRAK(Peer):
    name = "trak"
    package = "trak"
    modules = ("trak.traker",)
    summary = "TRAK (traker): projected margin gradients, ensemble of the run's checkpoints or of runs' final models"
    units = "rank-only"

    def run(self, inp: PeerInputs, workdir: str, pairwise: bool = False,
            **options: Any) -> tuple[np.ndarray, str]:
        opt = take_options(options, _DEFAULTS, self.name)
        model = inp.model_factory()
        members, described = ensemble(inp, opt, model)

        from trak import TRAKer

        for p in model.parameters():
            p.requires_grad_(False)
        grad_wrt = list(inp.run.trainable)
        n_params = sum(p.numel() for n, p in model.named_parameters() if n in set(grad_wrt))
        if int(opt["proj_dim"]) >= min(inp.n_train, n_params) and not opt["lambda_reg"]:
            warnings.warn(
                f"trak: proj_dim={opt['proj_dim']} >= min(N={inp.n_train}, P={n_params}) makes ΦᵀΦ "
                "singular; pass lambda_reg > 0 or a smaller proj_dim",
                stacklevel=2,
            )
        traker = TRAKer(
            model=model, task=opt["task"], train_set_size=inp.n_train, save_dir=workdir,
            load_from_save_dir=True, device="cpu", proj_dim=int(opt["proj_dim"]),
            use_half_precision=False, projector_seed=int(opt["seed"]), grad_wrt=grad_wrt,
            lambda_reg=float(opt["lambda_reg"]), logging_level=logging.WARNING,
        )
        bs = int(opt["batch_size"])
        x, y = inp.train
        for mid, state_dict in enumerate(members):
            traker.load_checkpoint(state_dict(), model_id=mid)
            for s in range(0, inp.n_train, bs):
                traker.featurize(batch=(x[s : s + bs], y[s : s + bs]), num_samples=len(x[s : s + bs]))
        traker.finalize_features()
        # traker frees its BasicProjector's matrix in finalize_features and regenerates it only
        # when the model id changes: with one checkpoint and proj_dim <= 100 scoring would hit
        # the freed matrix. An id that matches no model makes it regenerate (seeded by id).
        traker.projector.model_id = -1
        xt, yt = inp.target
        for mid, state_dict in enumerate(members):
            traker.start_scoring_checkpoint(exp_name="target", checkpoint=state_dict(),
                                            model_id=mid, num_targets=inp.n_target)
            for s in range(0, inp.n_target, bs):
                traker.score(batch=(xt[s : s + bs], yt[s : s + bs]), num_samples=len(xt[s : s + bs]))
        raw = np.asarray(traker.finalize_scores(exp_name="target"), dtype=np.float64)  # (N, Q)
        scores = raw if pairwise else raw.mean(axis=1)
        notes = (
            f"traker TRAKer(task={opt['task']!r}, proj_dim={opt['proj_dim']}, BasicProjector normal, "
            f"float32, lambda_reg={opt['lambda_reg']}), ensemble = {described}; "
            "scores (N, Q) averaged over targets, no rescaling: NOT loss units, compare ranks only"
        )
        return scores, notes


StateDictLoader = Callable[[], dict[str, Tensor]]


def ensemble(inp: PeerInputs, opt: dict[str, Any], model: nn.Module) -> tuple[list[StateDictLoader], str]:
    """TRAK's ensemble: for each model id, a loader of the state dict (``model``'s keys:
    parameters and persistent buffers) it featurizes and scores with; and a description for the
    notes.

    With ``opt["runs"]``: the final checkpoint of each listed run, checked against ``inp``;
    otherwise checkpoints of ``inp.run`` (``checkpoints`` / ``n_checkpoints``, default every
    segment's closing checkpoint)."""
    if opt["runs"] is None:
        steps = _ensemble_steps(inp, opt["checkpoints"], opt["n_checkpoints"])
        return [lambda s=s: inp.state_dict(s) for s in steps], f"checkpoints {steps}"
    if opt["checkpoints"] is not None:
        raise ConfigError("trak: checkpoints (steps) pick checkpoints of one run; with runs, use n_checkpoints "
                          "(the last k segment ends of each run; default 1, the final model)")
    k = 1 if opt["n_checkpoints"] is None else int(opt["n_checkpoints"])
    if k < 1:
        raise ConfigError(f"trak: n_checkpoints must be >= 1, got {opt['n_checkpoints']!r}")
    keys = list(model.state_dict())
    runs = _ensemble_runs(inp, opt["runs"], model)
    steps = [([c1 for _, c1 in r.segments] or [r.n_steps])[-k:] for r in runs]
    loaders = [lambda r=r, c=c: _run_state_dict(r, c, keys) for r, cs in zip(runs, steps, strict=True) for c in cs]
    which = "final checkpoints" if k == 1 else f"the last {k} segment ends"
    listed = ", ".join(f"{r.path} @ {cs}" for r, cs in zip(runs, steps, strict=True))
    return loaders, f"{which} of runs [{listed}]"


def _ensemble_runs(inp: PeerInputs, given: Any, model: nn.Module) -> list[Run]:
    if isinstance(given, (str, os.PathLike, Run)) or not isinstance(given, (list, tuple)) or not given:
        raise ConfigError(f"trak: runs must be a non-empty list of run folders, got {given!r}")
    runs = [r if isinstance(r, Run) else load_run(r) for r in given]
    for r in runs:
        r.check_model(model)
        if list(r.trainable) != list(inp.run.trainable):
            raise ParameterMismatchError(
                f"trak: the run at {r.path} trained {r.trainable} but the run at {inp.run.path} trained "
                f"{inp.run.trainable}; list runs of the same model with the same trainable parameters"
            )
        if r.dtype != inp.run.dtype:
            raise ConfigError(
                f"trak: the run at {r.path} was recorded in {r.dtype} but the run at {inp.run.path} in "
                f"{inp.run.dtype}; list runs recorded in one dtype"
            )
        r.check_ids(inp.n_train)
    prints = [r.fingerprint for r in runs]
    if len(set(prints)) < len(prints):
        raise ConfigError("trak: the same run is listed twice in runs; list independently recorded runs")
    return runs


def _run_state_dict(run: Run, step: int, keys: list[str]) -> dict[str, Tensor]:
    """Checkpoint ``step`` of ``run`` as a state dict with ``keys`` (parameters and persistent
    buffers)."""
    ck = run.load_checkpoint(step)
    sd = {**ck.params, **ck.buffers}
    missing = [k for k in keys if k not in sd]
    if missing:
        raise DataMismatchError(
            f"trak: checkpoint {step} of {run.path} lacks {missing[:5]}; list runs of the model "
            "that model_factory builds"
        )
    return {k: sd[k] for k in keys}


def _ensemble_steps(inp: PeerInputs, steps: Any, n_last: Any) -> list[int]:
    ends = [c for c, _ in inp.segment_ends()]
    if steps is not None:
        chosen = [int(s) for s in steps]
        bad = [s for s in chosen if s not in inp.run.checkpoint_steps]
        if bad:
            raise ConfigError(f"trak: no checkpoints at steps {bad}; have {inp.run.checkpoint_steps}")
        return chosen
    if n_last is not None:
        return ends[-int(n_last) :]
    return ends
