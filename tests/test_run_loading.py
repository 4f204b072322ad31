"""Reading a run back with :func:`diffin.load_run`: a named error for every missing, truncated or
damaged file and malformed manifest, model/data mismatches, non-finite checkpoints, and runs
written in the older run formats 1 and 2."""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import diffin
from _recording_loop import N_TRAIN, NAMES, ckpt_rel, make_data, make_model, read_manifest, record, write_manifest
from diffin import _constants as C
from diffin._errors import (
    CorruptManifestError,
    DataMismatchError,
    FormatVersionError,
    IncompleteRunError,
    InvalidIdsError,
    MissingFileError,
    NonFiniteCheckpointError,
    ParameterMismatchError,
    RunNotFoundError,
    TruncatedFileError,
)
from diffin._io import write_json, write_npy


# ---------------------------------------------------------------------- errors: folders
def test_run_not_found(tmp_path: Path) -> None:
    with pytest.raises(RunNotFoundError, match="diffin.Recorder"):
        diffin.load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFoundError, match="not a diffin run folder"):
        diffin.load_run(tmp_path / "empty")
    assert issubclass(RunNotFoundError, FileNotFoundError)


def test_checkpoints_without_manifest(run_dir: Path) -> None:
    """What a run killed before its first checkpoint (or a format-1 run killed) leaves."""
    (run_dir / C.MANIFEST).unlink()
    with pytest.raises(IncompleteRunError, match="no manifest") as ei:
        diffin.load_run(run_dir)
    assert "overwrite=True" in str(ei.value)


# ---------------------------------------------------------------------- errors: damaged files
LOGS = [C.GROUP_LRS_LOG, C.BATCH_IDS_LOG, C.BATCH_OFFSETS_LOG]


def _log_entry(m: dict[str, Any], key: str) -> dict[str, Any]:
    return {"lrs": m["lrs"], "ids": m["batch_ids"]["ids"], "offsets": m["batch_ids"]["offsets"]}[key]


def _rewrite_log(run_dir: Path, entry: dict[str, Any], data: bytes) -> None:
    """Replace a log and 'fix' its manifest entry (count and sha256) to match."""
    (run_dir / entry["file"]).write_bytes(data)
    entry["count"] = len(data) // 8
    entry["sha256"] = hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("rel", [ckpt_rel(3), ckpt_rel(0), *LOGS])
def test_missing_file(run_dir: Path, rel: str) -> None:
    (run_dir / rel).unlink()
    with pytest.raises(MissingFileError, match="copy the whole run folder"):
        diffin.load_run(run_dir)


def test_missing_checkpoint_step(run_dir: Path) -> None:
    run = diffin.load_run(run_dir)
    with pytest.raises(MissingFileError, match="no checkpoint at step 4"):
        run.load_checkpoint(4)


@pytest.mark.parametrize("rel", [ckpt_rel(3), ckpt_rel(7), *LOGS])
def test_truncated_file(run_dir: Path, rel: str) -> None:
    f = run_dir / rel
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(TruncatedFileError, match="truncated"):
        diffin.load_run(run_dir)


@pytest.mark.parametrize("key", ["checkpoint", "lrs", "ids", "offsets"])
def test_truncated_file_with_matching_byte_count(run_dir: Path, key: str) -> None:
    """A file cut short whose size (checkpoint) or entry count (log) in the manifest was 'fixed'
    too is still caught: by its header or by the log's sha256."""
    m = read_manifest(run_dir)
    entry = m["checkpoints"][1] if key == "checkpoint" else _log_entry(m, key)
    f = run_dir / entry["file"]
    data = f.read_bytes()[:-8]
    f.write_bytes(data)
    if key == "checkpoint":
        entry["bytes"] = len(data)
    else:
        entry["count"] -= 1
    write_manifest(run_dir, m)
    with pytest.raises(TruncatedFileError, match="cannot be read|not a readable|damaged"):
        diffin.load_run(run_dir)


@pytest.mark.parametrize("key", ["ids", "offsets"])
def test_log_cut_with_consistent_entry(run_dir: Path, key: str) -> None:
    """A log cut by one entry with count and sha256 both 'fixed': ids and offsets disagree."""
    m = read_manifest(run_dir)
    entry = _log_entry(m, key)
    _rewrite_log(run_dir, entry, (run_dir / entry["file"]).read_bytes()[:-8])
    write_manifest(run_dir, m)
    with pytest.raises(TruncatedFileError, match="do not agree with 7 steps"):
        diffin.load_run(run_dir)


@pytest.mark.parametrize("rel", [*LOGS, ckpt_rel(3)])
def test_garbage_file_same_size(run_dir: Path, rel: str) -> None:
    f = run_dir / rel
    f.write_bytes(b"\x07" * f.stat().st_size)
    with pytest.raises(TruncatedFileError, match="damaged|not a readable"):
        diffin.load_run(run_dir)


def test_log_longer_than_manifest_in_complete_run(run_dir: Path) -> None:
    """A closed run's log holds exactly its listed entries; more means it was replaced."""
    with open(run_dir / C.GROUP_LRS_LOG, "ab") as fh:
        fh.write(np.ones(1).tobytes())
    with pytest.raises(TruncatedFileError, match="truncated or was replaced"):
        diffin.load_run(run_dir)


def test_lrs_wrong_length(run_dir: Path) -> None:
    m = read_manifest(run_dir)
    _rewrite_log(run_dir, m["lrs"], np.ones(3).astype("<f8").tobytes())
    write_manifest(run_dir, m)
    with pytest.raises(TruncatedFileError, match="expected 7 finite learning rates"):
        diffin.load_run(run_dir)


def test_checkpoint_missing_a_parameter(run_dir: Path) -> None:
    m = read_manifest(run_dir)
    entry = m["checkpoints"][1]
    f = run_dir / entry["file"]
    tensors = load_file(str(f))
    del tensors[C.PARAM_PREFIX + "2.bias"]
    save_file(tensors, str(f))
    entry["bytes"] = f.stat().st_size
    write_manifest(run_dir, m)
    run = diffin.load_run(run_dir)
    with pytest.raises(TruncatedFileError, match="2.bias"):
        run.load_checkpoint(entry["step"])


# ---------------------------------------------------------------------- errors: manifest
def test_manifest_invalid_json(run_dir: Path) -> None:
    (run_dir / C.MANIFEST).write_text('{"format_version": 1, "n_steps": ')
    with pytest.raises(CorruptManifestError, match="not valid JSON"):
        diffin.load_run(run_dir)


def test_manifest_not_an_object(run_dir: Path) -> None:
    (run_dir / C.MANIFEST).write_text("[1, 2]")
    with pytest.raises(CorruptManifestError, match="JSON object"):
        diffin.load_run(run_dir)


@pytest.mark.parametrize("key", ["format_version", "n_steps", "checkpoints", "model", "optimizer", "lrs"])
def test_manifest_missing_key(run_dir: Path, key: str) -> None:
    m = read_manifest(run_dir)
    del m[key]
    write_manifest(run_dir, m)
    with pytest.raises(CorruptManifestError, match=key):
        diffin.load_run(run_dir)


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: m["model"].pop("trainable"),
        lambda m: m["model"].__setitem__("dtype", "not_a_dtype"),
        lambda m: m["optimizer"].__setitem__("bogus", 1),
        lambda m: m["checkpoints"][1].pop("file"),
        lambda m: m["lrs"].pop("count"),
        lambda m: m["lrs"].pop("sha256"),
        lambda m: m["lrs"].__setitem__("dtype", "<f4"),
        lambda m: m["batch_ids"]["ids"].__setitem__("count", -1),
        lambda m: m.__setitem__("status", "paused"),
        lambda m: m.__setitem__("checkpoints", m["checkpoints"][1:]),  # no step 0
        lambda m: m.__setitem__("n_steps", 9),  # last checkpoint is not T
    ],
    ids=["trainable", "dtype", "optimizer", "ckpt-file", "lrs-count", "lrs-sha", "lrs-dtype", "ids-count",
         "status", "no-step-0", "n-steps"],
)
def test_manifest_malformed_entries(run_dir: Path, damage: Any) -> None:
    m = read_manifest(run_dir)
    damage(m)
    write_manifest(run_dir, m)
    with pytest.raises(CorruptManifestError):
        diffin.load_run(run_dir)


@pytest.mark.parametrize("key", ["ids", "offsets"])
def test_manifest_missing_batch_ids_entry(run_dir: Path, key: str) -> None:
    m = read_manifest(run_dir)
    del m["batch_ids"][key]
    write_manifest(run_dir, m)
    with pytest.raises(CorruptManifestError):
        diffin.load_run(run_dir)


def test_format_version_newer(run_dir: Path) -> None:
    m = read_manifest(run_dir)
    m["format_version"] = C.FORMAT_VERSION + 1
    write_manifest(run_dir, m)
    with pytest.raises(FormatVersionError, match="Upgrade diffin"):
        diffin.load_run(run_dir)


def test_format_version_not_int(run_dir: Path) -> None:
    m = read_manifest(run_dir)
    m["format_version"] = "1"
    write_manifest(run_dir, m)
    with pytest.raises(CorruptManifestError, match="format_version"):
        diffin.load_run(run_dir)


# ---------------------------------------------------------------------- errors: model / data
def test_parameter_mismatch_shape(run_dir: Path) -> None:
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with pytest.raises(ParameterMismatchError, match="shape differs") as ei:
        diffin.load_run(run_dir, other)
    msg = str(ei.value)
    assert "0.weight" in msg and "2.weight" in msg and "(5, 4)" in msg and "(6, 4)" in msg
    assert "pass a model built like the one that was trained" in msg


def test_parameter_mismatch_names(run_dir: Path) -> None:
    other = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)).double()  # names 0.*, 1.*
    with pytest.raises(ParameterMismatchError) as ei:
        diffin.load_run(run_dir, other)
    msg = str(ei.value)
    assert "missing in the model" in msg and "2.weight" in msg
    assert "not in the recording" in msg and "1.weight" in msg


def test_invalid_ids_at_load(tmp_path: Path) -> None:
    record(tmp_path / "run")  # n_train not given while recording
    with pytest.raises(InvalidIdsError, match="pass the full training set"):
        diffin.load_run(tmp_path / "run", n_train=5)
    diffin.load_run(tmp_path / "run", n_train=N_TRAIN)  # fits


def test_data_mismatch_n_train(run_dir: Path) -> None:
    with pytest.raises(DataMismatchError, match=f"n_train={N_TRAIN}"):
        diffin.load_run(run_dir, n_train=N_TRAIN + 1)
    assert diffin.load_run(run_dir, n_train=N_TRAIN).n_train_recorded == N_TRAIN


# ---------------------------------------------------------------------- errors: non-finite
def _poison_checkpoint(run_dir: Path, index: int, key: str, value: float) -> int:
    m = read_manifest(run_dir)
    entry = m["checkpoints"][index]
    f = run_dir / entry["file"]
    tensors = load_file(str(f))
    t = tensors[key].clone()
    t.view(-1)[0] = value
    tensors[key] = t
    save_file(tensors, str(f), metadata={"step": str(entry["step"])})
    entry["bytes"] = f.stat().st_size
    write_manifest(run_dir, m)
    return int(entry["step"])


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_checkpoint(run_dir: Path, value: float) -> None:
    step = _poison_checkpoint(run_dir, 2, C.PARAM_PREFIX + "2.weight", value)
    run = diffin.load_run(run_dir)  # headers are fine; values are read lazily
    run.load_checkpoint(0)
    with pytest.raises(NonFiniteCheckpointError, match="'2.weight' holds NaN or Inf") as ei:
        run.load_checkpoint(step)
    assert "score a run that stayed finite" in str(ei.value)
    with pytest.raises(NonFiniteCheckpointError):
        run.verify()


def test_non_finite_momentum(tmp_path: Path) -> None:
    record(tmp_path / "run", steps=4, every=2, momentum=0.5)
    step = _poison_checkpoint(tmp_path / "run", 1, C.OPTIM_PREFIX + "momentum_buffer.0.bias", math.nan)
    run = diffin.load_run(tmp_path / "run")
    with pytest.raises(NonFiniteCheckpointError, match="0.bias"):
        run.load_checkpoint(step)




# ---------------------------------------------------------------------- run formats 1 and 2
def to_format_2(run_dir: Path) -> None:
    """Rewrite a closed one-group run of the current format in the layout run format 2 wrote: one
    learning rate per step in ``lrs.f64``, SGD momentum under ``momentum.`` in the checkpoints and
    no other optimizer state, no param groups or clipping threshold in the manifest."""
    m = read_manifest(run_dir)
    assert m["format_version"] == 3 and len(m["optimizer"]["groups"]) == 1
    (run_dir / C.GROUP_LRS_LOG).rename(run_dir / C.LRS_LOG)
    m["lrs"]["file"] = C.LRS_LOG
    for c in m["checkpoints"]:
        path = run_dir / c["file"]
        old = load_file(path)
        new = {k: v for k, v in old.items() if k.startswith((C.PARAM_PREFIX, C.BUFFER_PREFIX))}
        prefix = C.OPTIM_PREFIX + "momentum_buffer."
        if m["optimizer"]["kind"] == "SGD":
            new.update({C.MOMENTUM_PREFIX + k[len(prefix):]: v for k, v in old.items() if k.startswith(prefix)})
        save_file(new, path, metadata={"step": str(c["step"])})
        c["bytes"] = path.stat().st_size
        for key in ("optimizer_state", "optimizer_step", "optimizer_state_missing"):
            c.pop(key, None)
    del m["optimizer"]["groups"], m["clip_grad_norm"]
    m["format_version"] = 2
    write_manifest(run_dir, m)


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.rglob("*"):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir()
        else:
            target.write_bytes(f.read_bytes())
    return dst


def test_format_2_sgd_run_still_loads(tmp_path: Path) -> None:
    out = record(tmp_path / "v3", steps=5, every=2, momentum=0.5, weight_decay=1e-3, n_train=N_TRAIN)
    to_format_2(copy_run(tmp_path / "v3", tmp_path / "v2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v2 = diffin.load_run(tmp_path / "v2", out["model"], n_train=N_TRAIN)
    v3 = diffin.load_run(tmp_path / "v3")
    assert v2.format_version == 2 and v2.complete and v2.clip_grad_norm is None
    assert not any(k.startswith(C.OPTIM_PREFIX) for k in load_file(tmp_path / "v2" / ckpt_rel(2)))
    assert v2.optimizer.groups == v3.optimizer.groups == [{
        "params": NAMES,
        "hyper": {"momentum": 0.5, "dampening": 0.0, "nesterov": False, "weight_decay": 1e-3, "maximize": False},
    }]
    np.testing.assert_array_equal(v2.group_lrs, np.asarray(out["lrs"])[:, None])
    np.testing.assert_array_equal(v2.lrs, out["lrs"])
    for s in v2.checkpoint_steps:
        a, b = v2.load_checkpoint(s), v3.load_checkpoint(s)
        assert a.optimizer_step == b.optimizer_step == s
        assert sorted(a.optimizer_state) == sorted(b.optimizer_state) == (["momentum_buffer"] if s else [])
        for n in NAMES:
            assert torch.equal(a.params[n], b.params[n])
            if s:
                assert torch.equal(a.momentum[n], out["moms"][s][n])
                assert torch.equal(a.optimizer_state["momentum_buffer"][n], b.optimizer_state["momentum_buffer"][n])


def test_format_2_adam_run_loads_without_optimizer_state(tmp_path: Path) -> None:
    model = make_model()
    x, y = make_data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9), weight_decay=1e-2)
    with diffin.Recorder(tmp_path / "v3", model, opt, checkpoint_every=2) as rec:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            rec.step(None)
    to_format_2(copy_run(tmp_path / "v3", tmp_path / "v2"))
    run = diffin.load_run(tmp_path / "v2", model)
    [group] = run.optimizer.groups
    assert group["params"] == NAMES
    assert {k: group["hyper"][k] for k in ("beta1", "beta2", "eps", "weight_decay", "amsgrad")} == {
        "beta1": 0.8, "beta2": 0.9, "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False}
    assert "lr" not in group["hyper"]
    ck = run.load_checkpoint(2)
    assert ck.optimizer_state == {} and ck.optimizer_step is None and ck.momentum is None
    with pytest.raises(diffin.recording.ResumeError, match="run format 2, whose checkpoints hold SGD momentum only"):
        diffin.recording.restore_checkpoint(tmp_path / "v2", make_model(), torch.optim.Adam(make_model().parameters()))


def test_format_2_run_with_unequal_groups_has_no_groups(tmp_path: Path) -> None:
    """A format-2 run whose groups differed (e.g. weight decay on weights only) did not save them."""
    record(tmp_path / "v3", steps=2, every=2)
    to_format_2(tmp_path / "v3")
    m = read_manifest(tmp_path / "v3")
    m["optimizer"]["uniform_groups"] = False
    write_manifest(tmp_path / "v3", m)
    run = diffin.load_run(tmp_path / "v3")
    assert run.optimizer.groups == [] and run.group_lrs.shape == (2, 1)


def to_format_1(run_dir: Path) -> None:
    """Rewrite a closed run in the layout run format 1 wrote at ``close()``: ``.npy``
    logs listed by byte count, no status other than complete, no log counts or hashes."""
    to_format_2(run_dir)
    m = read_manifest(run_dir)
    lrs = np.fromfile(run_dir / C.LRS_LOG, dtype="<f8").astype(np.float64)
    ids = np.fromfile(run_dir / C.BATCH_IDS_LOG, dtype="<i8").astype(np.int64)
    offsets = np.fromfile(run_dir / C.BATCH_OFFSETS_LOG, dtype="<i8").astype(np.int64)
    for name in (C.LRS_LOG, C.BATCH_IDS_LOG, C.BATCH_OFFSETS_LOG):
        (run_dir / name).unlink()
    write_npy(run_dir / C.V1_LRS, lrs)
    write_npy(run_dir / C.V1_BATCH_IDS, ids)
    write_npy(run_dir / C.V1_BATCH_OFFSETS, offsets)

    def entry(name: str) -> dict[str, Any]:
        return {"file": name, "bytes": (run_dir / name).stat().st_size}

    m["format_version"] = 1
    m["lrs"] = entry(C.V1_LRS)
    m["batch_ids"]["ids"] = entry(C.V1_BATCH_IDS)
    m["batch_ids"]["offsets"] = entry(C.V1_BATCH_OFFSETS)
    write_json(run_dir / C.MANIFEST, m)


@pytest.mark.filterwarnings("ignore::diffin._errors.UntrainedRowsWarning")
def test_format_1_run_still_loads_and_scores(tmp_path: Path) -> None:
    out = record(tmp_path / "v2", steps=7, every=3, momentum=0.5, n_train=N_TRAIN)
    to_format_1(copy_run(tmp_path / "v2", tmp_path / "v1"))
    assert sorted(p.name for p in (tmp_path / "v1").glob("*.npy")) == sorted(
        [C.V1_LRS, C.V1_BATCH_IDS, C.V1_BATCH_OFFSETS])

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a closed format-1 run loads without a warning
        run = diffin.load_run(tmp_path / "v1", out["model"], n_train=N_TRAIN)
    assert run.format_version == 1 and run.complete and run.steps_logged == 7
    assert run.n_steps == 7 and run.checkpoint_steps == [0, 3, 6, 7]
    np.testing.assert_array_equal(run.lrs, out["lrs"])
    for t in range(7):
        np.testing.assert_array_equal(run.batch(t), out["ids"][t])
    for s in run.checkpoint_steps:
        ck = run.load_checkpoint(s)
        for n in NAMES:
            assert torch.equal(ck.params[n], out["params"][s][n])
            if s:
                assert torch.equal(ck.momentum[n], out["moms"][s][n])

    x, y = make_data()

    def ce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(o, t, reduction="none")

    s1, s2 = (diffin.influence(tmp_path / name, make_model(), ce, train=(x, y), target=(x[:6], y[:6]),
                               method="diffin-exact", progress=False) for name in ("v1", "v2"))
    assert np.any(s2 != 0)
    np.testing.assert_allclose(s1, s2, rtol=1e-12, atol=1e-14 * np.abs(s2).max())

    # the format-1 reader keeps its named errors
    ids_file = tmp_path / "v1" / C.V1_BATCH_IDS
    saved = ids_file.read_bytes()
    ids_file.unlink()
    with pytest.raises(MissingFileError, match="copy the whole run folder"):
        diffin.load_run(tmp_path / "v1")
    ids_file.write_bytes(saved[:-3])
    with pytest.raises(TruncatedFileError, match="truncated"):
        diffin.load_run(tmp_path / "v1")
