"""Checkpoints of a recording: the run folder made ready (:func:`prepare_folder`), θ with the
buffers and the optimizer's state written at a step (:func:`write_checkpoint`), and read back into
a model and optimizer to continue a killed run (:func:`restore_checkpoint`, :func:`state_differences`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _constants as C
from .._errors import ResumeError, RunExistsError
from .._io import write_safetensors
from ._optim_capture import optimizer_state, step_dtype
from .manifest import OptimizerSpec
from .run import Checkpoint, Run

OURS = (C.MANIFEST, C.CHECKPOINT_DIR, C.GROUP_LRS_LOG, C.LRS_LOG, C.BATCH_IDS_LOG, C.BATCH_OFFSETS_LOG,
        C.V1_LRS, C.V1_BATCH_IDS, C.V1_BATCH_OFFSETS, C.V1_BATCH_IDS + C.V1_PARTIAL_SUFFIX, C.RNG_LOG)
"""Every name a run folder (format 1, 2 or 3) may hold; an ``overwrite=True`` removes them."""


def prepare_folder(p: Path, overwrite: bool, resume: bool) -> bool:
    """Check (and with ``overwrite`` clear) the run folder ``p``; True when a run is to be resumed."""
    if p.exists() and not p.is_dir():
        raise RunExistsError(f"{p} exists and is not a folder")
    present = [n for n in OURS if (p / n).exists()]
    if not present:
        p.mkdir(parents=True, exist_ok=True)
        return False
    if overwrite:
        for n in present:
            target = p / n
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        for f in p.glob(".*.tmp"):
            f.unlink()  # an atomic write of the old run cut short
        return False
    manifest = _read_json(p / C.MANIFEST)
    status = manifest.get("status", C.STATUS_COMPLETE) if manifest is not None else None
    stopped = manifest.get("n_steps") if manifest is not None else None
    if resume:
        if manifest is None and (p / C.MANIFEST).exists():
            Run(p)  # raises the named error of the damaged manifest
        if manifest is None:
            raise ResumeError(
                f"{p} holds an unfinished recording without a manifest ({', '.join(present)}): it "
                "stopped before its first checkpoint was written, so there is nothing to resume. "
                "Pass overwrite=True to record it again"
            )
        if status == C.STATUS_COMPLETE:
            raise ResumeError(
                f"{p} holds a complete recording ({stopped} steps); a closed run cannot be "
                "resumed. Choose another folder, or pass overwrite=True to replace it"
            )
        if manifest.get("format_version") != C.FORMAT_VERSION:
            raise ResumeError(
                f"{p} was written in run format {manifest.get('format_version')}; only format "
                f"{C.FORMAT_VERSION} runs can be resumed. Pass overwrite=True to record it again"
            )
        return True
    if manifest is not None and status == C.STATUS_COMPLETE:
        raise RunExistsError(
            f"{p} already holds a recording ({', '.join(present)}); choose another folder or pass "
            "overwrite=True to replace it"
        )
    where = f" (status {status!r}, valid up to step {stopped})" if manifest is not None else ""
    raise RunExistsError(
        f"{p} already holds an unfinished recording{where}; pass resume=True to continue it from "
        "its last checkpoint (after diffin.recording.restore_checkpoint), overwrite=True to "
        "replace it, or choose another folder"
    )


def write_checkpoint(path: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                     trainable: list[str]) -> dict[str, Any]:
    """Write the checkpoint of ``step`` into the run folder ``path`` (every parameter and buffer,
    and the optimizer's per-parameter state); returns its manifest entry."""
    tensors: dict[str, torch.Tensor] = {}
    for n, prm in model.named_parameters():
        tensors[C.PARAM_PREFIX + n] = prm.detach()
    for n, b in model.named_buffers():
        tensors[C.BUFFER_PREFIX + n] = b.detach()
    entry: dict[str, Any] = {"step": step, "has_momentum": False, "optimizer_step": step}
    if optimizer is not None:
        state, steps, missing = optimizer_state(optimizer, model, trainable)
        for name, per_param in state.items():
            for n, t in per_param.items():
                tensors[f"{C.OPTIM_PREFIX}{name}.{n}"] = t
        for n, k in steps.items():
            tensors[C.OPTIM_STEP_PREFIX + n] = torch.tensor(float(k), dtype=torch.float64)
        entry["has_momentum"] = "momentum_buffer" in state
        entry["optimizer_state"] = sorted(state)
        if steps:
            entry["optimizer_step"] = max(steps.values())
        if missing:
            entry["optimizer_state_missing"] = missing
    rel = f"{C.CHECKPOINT_DIR}/{C.CHECKPOINT_PATTERN.format(step=step)}"
    write_safetensors(path / rel, tensors, metadata={"step": str(step)})
    return {"file": rel, "bytes": (path / rel).stat().st_size, **entry}


def reopen(rec: Any) -> tuple[dict[str, Any], int]:
    """The manifest and step count S of the unfinished run a :class:`~diffin.Recorder` ``rec``
    resumes, checked against ``rec`` (its model, optimizer and settings those of the recording; the
    model's and optimizer's state exactly the last checkpoint's), with the files written after the
    last manifest removed. ``rec.seed`` / ``rec.n_train`` left None take the recorded values."""
    run = Run(rec.path)
    _check_resumable(rec, run)
    last = run.load_checkpoint(run.n_steps)
    differ = state_differences(rec.model, rec.optimizer, rec.trainable, last)
    if differ:
        raise ResumeError(
            f"the model/optimizer state differs from the last checkpoint of {rec.path} (step "
            f"{run.n_steps}): {', '.join(differ[:5])}{' …' if len(differ) > 5 else ''}. Load it "
            "first with diffin.recording.restore_checkpoint(path, model, optimizer), which returns "
            "the step to restart the training loop from, then create the Recorder with resume=True"
        )
    m, s = run.manifest, run.n_steps
    del run, last  # release the memory map of the ids log before it is cut
    listed = {c["file"] for c in m["checkpoints"]}
    for f in (rec.path / C.CHECKPOINT_DIR).iterdir():
        if f"{C.CHECKPOINT_DIR}/{f.name}" not in listed:
            f.unlink()  # written after the last manifest (the process died before listing it)
    for f in rec.path.glob(".*.tmp"):
        f.unlink()  # an atomic write cut short by the kill
    return m, s


def _check_resumable(rec: Any, run: Run) -> None:
    run.check_model(rec.model)
    problems = []
    mine, theirs = rec.opt_spec, run.optimizer
    if not mine.same_optimizer(theirs):
        if (mine.kind, mine.assumed) != (theirs.kind, theirs.assumed):
            problems.append(f"optimizer {_kind(mine)} vs recorded {_kind(theirs)}")
        else:
            problems.append(f"optimizer param groups {mine.groups} vs recorded {theirs.groups}")
    if rec.clip_grad_norm != run.clip_grad_norm:
        problems.append(f"clip_grad_norm={rec.clip_grad_norm} vs recorded {run.clip_grad_norm}")
    if rec.trainable != run.trainable:
        problems.append(f"trainable parameters {rec.trainable} vs recorded {run.trainable}")
    if rec.dtype != run.dtype:
        problems.append(f"dtype {rec.dtype} vs recorded {run.dtype}")
    m = run.manifest
    if rec.checkpoint_every != m.get("checkpoint_every"):
        problems.append(f"checkpoint_every={rec.checkpoint_every} vs recorded {m.get('checkpoint_every')}")
    for key in ("seed", "n_train"):
        mine, theirs = getattr(rec, key), m.get(key)
        if mine is None:
            setattr(rec, key, theirs)
        elif mine != theirs:
            problems.append(f"{key}={mine} vs recorded {theirs}")
    if problems:
        raise ResumeError(
            f"cannot resume {rec.path}: " + "; ".join(problems) + ". Resume with the model, "
            "optimizer and settings of the recording, or pass overwrite=True to record a new run"
        )


def _kind(spec: OptimizerSpec) -> str:
    return "none (plain SGD assumed)" if spec.assumed else spec.kind


def restore_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> int:
    """Load the last checkpoint of the run at ``path`` into ``model`` (parameters and buffers) and
    ``optimizer`` (its whole per-parameter state: SGD momentum buffers, Adam's ``exp_avg``,
    ``exp_avg_sq`` and ``step``, …; a state the checkpoint does not hold is cleared), so that a
    restarted training loop continues a killed run exactly. Returns the checkpoint's step S: the
    loop restarts at step S, i.e. with the batch it would have used for step S (seed the data
    order so that it repeats, skip the first S batches, and step a learning-rate scheduler S times).

    When ``path`` holds no recording yet, nothing is loaded and 0 is returned, so a restartable
    script can call it unconditionally before ``Recorder(path, ..., resume=True)``.
    Raises :class:`~diffin._errors.ResumeError` when the optimizer is not the recorded one or the
    checkpoint lacks part of its state (a run of an older format with another optimizer than SGD,
    or an optimizer keeping state that is not per-parameter), and the loading errors of
    :func:`diffin.load_run` for a damaged run.
    """
    p = Path(path)
    if not p.is_dir() or not any((p / n).exists() for n in OURS):
        return 0
    run = Run(p)
    run.check_model(model)
    last = run.load_checkpoint(run.n_steps)
    if optimizer is not None:
        _check_restorable(run, last, optimizer)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, prm in named.items():
            prm.copy_(last.params[n])
        for n, b in model.named_buffers():
            if n in last.buffers:
                b.copy_(last.buffers[n])
    if optimizer is not None:
        group_of = {id(prm): g for g in optimizer.param_groups for prm in g["params"]}
        for n in run.trainable:
            prm = named[n]
            state: dict[str, Any] = {}
            for name, per_param in last.optimizer_state.items():
                if n in per_param:
                    state[name] = per_param[n].to(device=prm.device).clone()
            if n in last.param_steps:
                g = group_of.get(id(prm), {})
                on_device = bool(g.get("capturable", False) or g.get("fused", False))
                state["step"] = torch.tensor(
                    float(last.param_steps[n]), dtype=step_dtype(bool(g.get("fused", False))),
                    device=prm.device if on_device else "cpu",
                )
            optimizer.state.pop(prm, None)
            if state:
                optimizer.state[prm] = state
    return run.n_steps


def _check_restorable(run: Run, last: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    kind = type(optimizer).__name__
    recorded = run.optimizer.kind if not run.optimizer.assumed else None
    if recorded is not None and kind != recorded:
        raise ResumeError(
            f"cannot restore {kind}: the run at {run.path} was recorded with {recorded}; pass the "
            "optimizer of the recording"
        )
    if last.optimizer_step is None:
        raise ResumeError(
            f"cannot restore the state of {kind}: the run at {run.path} was written in run format "
            f"{run.format_version}, whose checkpoints hold SGD momentum only; record it again to "
            "resume it"
        )
    missing = run._ckpt_entries[last.step].get("optimizer_state_missing")
    if missing:
        raise ResumeError(
            f"cannot restore the state of {kind}: its checkpoint at step {last.step} lacks state "
            f"that is not a tensor shaped like its parameter ({', '.join(missing[:5])}); such a run "
            "cannot be resumed exactly. Record it again (overwrite=True)"
        )


def state_differences(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, trainable: list[str], ck: Checkpoint
) -> list[str]:
    """Names of the parameters, buffers and optimizer states whose current values are not exactly
    the checkpoint's."""
    out = []
    named = dict(model.named_parameters())
    for n, prm in named.items():
        if not torch.equal(prm.detach().to("cpu"), ck.params[n]):
            out.append(f"parameter {n}")
    for n, b in model.named_buffers():
        if n in ck.buffers and not torch.equal(b.detach().to("cpu"), ck.buffers[n]):
            out.append(f"buffer {n}")
    if optimizer is not None:
        state, steps, _ = optimizer_state(optimizer, model, trainable)
        for name in sorted(set(state) | set(ck.optimizer_state)):
            have, want = state.get(name, {}), ck.optimizer_state.get(name, {})
            for n in trainable:
                a, b = have.get(n), want.get(n)
                if (a is None) != (b is None) or (
                    a is not None and b is not None and not torch.equal(a.to("cpu"), b)
                ):
                    out.append(f"optimizer state {name} of {n}")
        for n in trainable:
            if steps.get(n) != ck.param_steps.get(n):
                out.append(f"optimizer step count of {n}")
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    """The manifest as a dict, or None when it is missing or unreadable."""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None
