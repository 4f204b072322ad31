"""Recording a run with :class:`diffin.Recorder` and reading it back with :func:`diffin.load_run`:
round trips, every named error, atomic writes and the no-pickle guarantee."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import diffin
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
    RecordingError,
    RunExistsError,
    RunNotFoundError,
    TruncatedFileError,
    UnsupportedOptimizerError,
)
from diffin._io import atomic_write, write_json, write_npy

N_TRAIN = 20
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


# ---------------------------------------------------------------------- helpers
def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (N_TRAIN,), generator=g)


def batch_ids(t: int) -> np.ndarray:
    """Deterministic batches of varying size (3 or 4) over 0..N_TRAIN-1."""
    rng = np.random.default_rng(100 + t)
    return rng.choice(N_TRAIN, size=3 + t % 2, replace=False).astype(np.int64)


def lr_at(t: int) -> float:
    return 0.1 / (1 + t)


def as_kind(ids: np.ndarray, kind: str) -> Any:
    if kind == "list":
        return ids.tolist()
    if kind == "numpy":
        return ids
    if kind == "long":
        return torch.as_tensor(ids, dtype=torch.long)
    if kind == "int32":
        return torch.as_tensor(ids, dtype=torch.int32)
    raise AssertionError(kind)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def record(
    path: Path,
    *,
    steps: int = 7,
    every: int = 3,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    ids_kind: str = "numpy",
    model: nn.Module | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """The exact user loop. Returns the model, the passed ids/lrs and the parameters (and
    momentum buffers) captured at every step."""
    model = make_model() if model is None else model
    x, y = make_data()
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=lr_at(0), momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
    )
    rec = diffin.Recorder(path, model, optimizer=opt, checkpoint_every=every, **kw)
    params = {0: snapshot(model)}
    buffers = {0: {n: b.detach().clone() for n, b in model.named_buffers()}}
    moms: dict[int, dict[str, torch.Tensor]] = {}
    ids_given, lrs = [], []
    for t in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(t)
        ids = batch_ids(t)
        loss = nn.functional.cross_entropy(model(x[ids]), y[ids])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(as_kind(ids, ids_kind), lr=opt.param_groups[0]["lr"])
        ids_given.append(ids)
        lrs.append(opt.param_groups[0]["lr"])
        params[t + 1] = snapshot(model)
        buffers[t + 1] = {n: b.detach().clone() for n, b in model.named_buffers()}
        named = dict(model.named_parameters())
        moms[t + 1] = {
            n: opt.state[p]["momentum_buffer"].clone()
            for n, p in named.items()
            if p.requires_grad and opt.state[p].get("momentum_buffer") is not None
        }
    assert rec.close() == Path(path)
    return {"model": model, "opt": opt, "ids": ids_given, "lrs": lrs, "params": params,
            "buffers": buffers, "moms": moms}


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / C.MANIFEST).read_text())


def write_manifest(path: Path, m: dict[str, Any]) -> None:
    (path / C.MANIFEST).write_text(json.dumps(m))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    record(tmp_path / "run", n_train=N_TRAIN)
    return tmp_path / "run"


# ---------------------------------------------------------------------- round trip
@pytest.mark.parametrize(
    ("steps", "every", "expected"),
    [(7, 3, [0, 3, 6, 7]), (6, 3, [0, 3, 6]), (2, 5, [0, 2]), (4, 1, [0, 1, 2, 3, 4]), (0, 3, [0])],
)
def test_round_trip(tmp_path: Path, steps: int, every: int, expected: list[int]) -> None:
    path = tmp_path / "run"
    out = record(path, steps=steps, every=every)
    run = diffin.load_run(path, out["model"], n_train=N_TRAIN)

    assert run.n_steps == steps
    assert run.checkpoint_steps == expected
    assert run.segments == list(zip(expected[:-1], expected[1:]))
    # θ_T is saved once even when T is a multiple of checkpoint_every
    files = sorted(os.listdir(path / C.CHECKPOINT_DIR))
    assert files == [C.CHECKPOINT_PATTERN.format(step=s) for s in expected]
    np.testing.assert_array_equal(run.lrs, np.asarray(out["lrs"], dtype=np.float64))
    assert run.lrs.dtype == np.float64
    assert run.has_batch_ids == (steps > 0)
    for t in range(steps):
        b = run.batch(t)
        assert b.dtype == np.int64
        np.testing.assert_array_equal(b, out["ids"][t])
    if steps:
        assert run.max_id == max(int(i.max()) for i in out["ids"])
        assert run.batch_size_hint() in (3, 4)
    for s in expected:
        ck = run.load_checkpoint(s)
        assert ck.step == s
        assert sorted(ck.params) == sorted(NAMES)
        for n in NAMES:
            assert ck.params[n].dtype == torch.float64
            assert torch.equal(ck.params[n], out["params"][s][n]), (s, n)
        assert ck.momentum is None  # plain SGD: no momentum buffers
    run.verify()
    assert run.dtype == torch.float64
    assert run.manifest["model"]["dtype"] == "float64"
    assert run.trainable == NAMES
    assert run.optimizer.kind == "SGD" and run.optimizer.is_sgd and not run.optimizer.assumed
    # the partial ids file is gone once the run is closed
    assert not (path / (C.BATCH_IDS + C.PARTIAL_SUFFIX)).exists()


def test_checkpoints_hold_recorded_not_current_values(tmp_path: Path) -> None:
    """Changing the model after close() does not change what load_checkpoint returns."""
    out = record(tmp_path / "run", steps=3, every=1)
    with torch.no_grad():
        for p in out["model"].parameters():
            p.add_(1.0)
    run = diffin.load_run(tmp_path / "run", out["model"])
    assert torch.equal(run.load_checkpoint(3).params["0.weight"], out["params"][3]["0.weight"])
    assert not torch.equal(run.load_checkpoint(3).params["0.weight"], out["model"][0].weight)


@pytest.mark.parametrize("nesterov", [False, True])
def test_optimizer_spec_and_momentum_buffers(tmp_path: Path, nesterov: bool) -> None:
    path = tmp_path / "run"
    out = record(path, steps=5, every=2, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    run = diffin.load_run(path, out["model"])
    spec = run.optimizer
    assert (spec.kind, spec.momentum, spec.weight_decay, spec.nesterov) == ("SGD", 0.9, 1e-3, nesterov)
    assert spec.dampening == 0.0 and not spec.maximize and spec.uniform_groups
    assert run.checkpoint_steps == [0, 2, 4, 5]
    assert run.load_checkpoint(0).momentum is None  # no optimizer step yet
    for s in (2, 4, 5):
        ck = run.load_checkpoint(s)
        assert ck.momentum is not None
        assert sorted(ck.momentum) == sorted(NAMES)
        for n in NAMES:
            assert torch.equal(ck.momentum[n], out["moms"][s][n]), (s, n)
            assert not torch.equal(ck.momentum[n], torch.zeros_like(ck.momentum[n]))
    assert [c["has_momentum"] for c in run.manifest["checkpoints"]] == [False, True, True, True]


def test_context_manager(tmp_path: Path) -> None:
    path = tmp_path / "run"
    model = make_model()
    x, y = make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with diffin.Recorder(path, model, optimizer=opt, checkpoint_every=2, seed=7) as rec:
        for t in range(3):
            ids = batch_ids(t)
            loss = nn.functional.cross_entropy(model(x[ids]), y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(ids)  # lr defaults to the optimizer's
        assert rec.steps == 3
    final = snapshot(model)
    run = diffin.load_run(path, model, n_train=N_TRAIN)
    assert run.n_steps == 3 and run.checkpoint_steps == [0, 2, 3]
    np.testing.assert_array_equal(run.lrs, [0.05, 0.05, 0.05])
    assert run.manifest["seed"] == 7
    assert run.manifest["status"] == "complete"
    assert run.manifest["format_version"] == C.FORMAT_VERSION
    for n in NAMES:
        assert torch.equal(run.load_checkpoint(3).params[n], final[n])


@pytest.mark.parametrize("kind", ["list", "numpy", "long", "int32"])
def test_ids_kinds(tmp_path: Path, kind: str) -> None:
    out = record(tmp_path / "run", steps=4, every=2, ids_kind=kind)
    run = diffin.load_run(tmp_path / "run", out["model"], n_train=N_TRAIN)
    for t in range(4):
        b = run.batch(t)
        assert b.dtype == np.int64
        np.testing.assert_array_equal(b, out["ids"][t])


def test_uint_ids_accepted(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with diffin.Recorder(tmp_path / "run", model, optimizer=opt) as rec:
        rec.step(np.array([3, 1, 2], dtype=np.uint8))
    np.testing.assert_array_equal(diffin.load_run(tmp_path / "run").batch(0), [3, 1, 2])


def test_no_ids_recorded(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with diffin.Recorder(tmp_path / "run", model, optimizer=opt, checkpoint_every=2) as rec:
        for _ in range(3):
            rec.step(None, lr=0.1)
    run = diffin.load_run(tmp_path / "run", model, n_train=5)
    assert not run.has_batch_ids
    assert not (tmp_path / "run" / C.BATCH_IDS).exists()
    assert run.batch_size_hint() is None
    with pytest.raises(InvalidIdsError, match="no batch ids"):
        run.batch(0)


def test_frozen_parameter_and_buffers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.detach().clone()
    out = record(tmp_path / "run", steps=4, every=2, model=model)
    run = diffin.load_run(tmp_path / "run", model)
    trainable = ["0.weight", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert run.trainable == trainable
    flags = {p["name"]: p["trainable"] for p in run.manifest["model"]["parameters"]}
    assert flags == {"0.weight": True, "0.bias": False, "1.weight": True, "1.bias": True,
                     "3.weight": True, "3.bias": True}
    assert {b["name"] for b in run.manifest["model"]["buffers"]} == {
        "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    for s in run.checkpoint_steps:
        ck = run.load_checkpoint(s)
        assert torch.equal(ck.params["0.bias"], frozen)  # frozen parameter saved, unchanged
        for n in trainable:
            assert torch.equal(ck.params[n], out["params"][s][n])
        assert set(ck.buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
        for n, b in ck.buffers.items():
            assert torch.equal(b, out["buffers"][s][n]), (s, n)
    assert int(run.load_checkpoint(4).buffers["1.num_batches_tracked"]) == 4
    assert not torch.equal(run.load_checkpoint(4).buffers["1.running_mean"],
                           run.load_checkpoint(0).buffers["1.running_mean"])


def test_without_optimizer_uses_requires_grad(tmp_path: Path) -> None:
    model = make_model()
    model[2].bias.requires_grad_(False)
    with diffin.Recorder(tmp_path / "run", model, checkpoint_every=1) as rec:
        rec.step([0, 1], lr=0.3)
    run = diffin.load_run(tmp_path / "run", model)
    assert run.trainable == ["0.weight", "0.bias", "2.weight"]
    assert run.optimizer.assumed and run.optimizer.is_sgd
    np.testing.assert_array_equal(run.lrs, [0.3])


# ---------------------------------------------------------------------- errors: folders
def test_run_exists_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "run"
    record(path, steps=6, every=1)
    with pytest.raises(RunExistsError, match="overwrite=True"):
        diffin.Recorder(path, make_model(), checkpoint_every=1)
    # the refused attempt left the old run intact
    assert diffin.load_run(path).n_steps == 6
    out = record(path, steps=2, every=5, overwrite=True, ids_kind="list")
    run = diffin.load_run(path, out["model"])
    assert run.n_steps == 2 and run.checkpoint_steps == [0, 2]
    assert len(os.listdir(path / C.CHECKPOINT_DIR)) == 2  # no stale checkpoints left over


def test_run_exists_unfinished(tmp_path: Path) -> None:
    path = tmp_path / "run"
    diffin.Recorder(path, make_model())  # never closed
    with pytest.raises(RunExistsError, match="unfinished recording"):
        diffin.Recorder(path, make_model())


def test_run_exists_not_a_folder(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunExistsError, match="not a folder"):
        diffin.Recorder(f, make_model())


def test_incomplete_run_not_closed(tmp_path: Path) -> None:
    path = tmp_path / "run"
    model = make_model()
    rec = diffin.Recorder(path, model, checkpoint_every=1)
    rec.step([0, 1], lr=0.1)
    with pytest.raises(IncompleteRunError, match=r"Recorder\.close\(\)"):
        diffin.load_run(path, model)


def test_incomplete_run_when_with_block_raises(tmp_path: Path) -> None:
    path = tmp_path / "run"
    model = make_model()
    with pytest.raises(RuntimeError, match="boom"), diffin.Recorder(path, model) as rec:
        rec.step([0, 1], lr=0.1)
        raise RuntimeError("boom")
    assert not (path / C.MANIFEST).exists()
    with pytest.raises(IncompleteRunError, match="not closed"):
        diffin.load_run(path, model)


def test_run_not_found(tmp_path: Path) -> None:
    with pytest.raises(RunNotFoundError, match="diffin.Recorder"):
        diffin.load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFoundError, match="not a diffin run folder"):
        diffin.load_run(tmp_path / "empty")
    assert issubclass(RunNotFoundError, FileNotFoundError)


# ---------------------------------------------------------------------- errors: damaged files
def _ckpt(path: Path, step: int) -> str:
    return f"{C.CHECKPOINT_DIR}/{C.CHECKPOINT_PATTERN.format(step=step)}"


@pytest.mark.parametrize("rel", [_ckpt(Path(), 3), _ckpt(Path(), 0), C.LRS, C.BATCH_IDS, C.BATCH_OFFSETS])
def test_missing_file(run_dir: Path, rel: str) -> None:
    (run_dir / rel).unlink()
    with pytest.raises(MissingFileError, match="copy the whole run folder"):
        diffin.load_run(run_dir)


def test_missing_checkpoint_step(run_dir: Path) -> None:
    run = diffin.load_run(run_dir)
    with pytest.raises(MissingFileError, match="no checkpoint at step 4"):
        run.load_checkpoint(4)


@pytest.mark.parametrize("rel", [_ckpt(Path(), 3), _ckpt(Path(), 7), C.LRS, C.BATCH_IDS, C.BATCH_OFFSETS])
def test_truncated_file(run_dir: Path, rel: str) -> None:
    f = run_dir / rel
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(TruncatedFileError, match="truncated"):
        diffin.load_run(run_dir)


@pytest.mark.parametrize("key", ["checkpoint", "lrs", "ids", "offsets"])
def test_truncated_file_with_matching_byte_count(run_dir: Path, key: str) -> None:
    """A file cut short whose byte count in the manifest was 'fixed' too is still caught."""
    m = read_manifest(run_dir)
    entry = {"checkpoint": m["checkpoints"][1], "lrs": m["lrs"], "ids": m["batch_ids"]["ids"],
             "offsets": m["batch_ids"]["offsets"]}[key]
    f = run_dir / entry["file"]
    data = f.read_bytes()[:-8]
    f.write_bytes(data)
    entry["bytes"] = len(data)
    write_manifest(run_dir, m)
    with pytest.raises(TruncatedFileError, match="cannot be read|not a readable|do not agree"):
        diffin.load_run(run_dir)


@pytest.mark.parametrize("rel", [C.LRS, C.BATCH_IDS, C.BATCH_OFFSETS, _ckpt(Path(), 3)])
def test_garbage_file_same_size(run_dir: Path, rel: str) -> None:
    f = run_dir / rel
    f.write_bytes(b"\x07" * f.stat().st_size)
    with pytest.raises(TruncatedFileError, match="cannot be read|not a readable"):
        diffin.load_run(run_dir)


def test_lrs_wrong_length(run_dir: Path) -> None:
    m = read_manifest(run_dir)
    write_npy(run_dir / C.LRS, np.ones(3))
    m["lrs"]["bytes"] = (run_dir / C.LRS).stat().st_size
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
        lambda m: m["lrs"].pop("bytes"),
        lambda m: m.__setitem__("checkpoints", m["checkpoints"][1:]),  # no step 0
        lambda m: m.__setitem__("n_steps", 9),  # last checkpoint is not T
    ],
    ids=["trainable", "dtype", "optimizer", "ckpt-file", "lrs-bytes", "no-step-0", "n-steps"],
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


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([0, N_TRAIN], "out of range"),
        ([0, -1], ">= 0"),
        ([0.0, 1.0], "integers"),
        (np.array([0.0, 1.0]), "integers"),
        (torch.tensor([0.0, 1.0]), "integers"),
        (torch.tensor([True, False]), "integers"),
        (np.array([True, False]), "integers"),
        (np.array([[0, 1], [2, 3]]), "1-D"),
        (torch.tensor([[0, 1]]), "1-D"),
    ],
    ids=["range", "negative", "float-list", "float-np", "float-tensor", "bool-tensor", "bool-np",
         "2d-np", "2d-tensor"],
)
def test_invalid_ids_while_recording(tmp_path: Path, ids: Any, match: str) -> None:
    rec = diffin.Recorder(tmp_path / "run", make_model(), n_train=N_TRAIN)
    with pytest.raises(InvalidIdsError, match=match):
        rec.step(ids, lr=0.1)
    # nothing was recorded by the refused step; the recording goes on
    assert rec.steps == 0
    rec.step([1, 2], lr=0.1)
    rec.close()
    run = diffin.load_run(tmp_path / "run")
    assert run.n_steps == 1
    np.testing.assert_array_equal(run.batch(0), [1, 2])


def test_empty_list_of_ids(tmp_path: Path) -> None:
    rec = diffin.Recorder(tmp_path / "run", make_model())
    rec.step([], lr=0.1)
    rec.close()
    assert diffin.load_run(tmp_path / "run").batch(0).size == 0


def test_empty_integer_batch(tmp_path: Path) -> None:
    rec = diffin.Recorder(tmp_path / "run", make_model())
    rec.step(np.zeros(0, dtype=np.int64), lr=0.1)
    rec.step([2], lr=0.1)
    rec.close()
    run = diffin.load_run(tmp_path / "run")
    assert run.batch(0).size == 0
    np.testing.assert_array_equal(run.batch(1), [2])


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
    step = _poison_checkpoint(tmp_path / "run", 1, C.MOMENTUM_PREFIX + "0.bias", math.nan)
    run = diffin.load_run(tmp_path / "run")
    with pytest.raises(NonFiniteCheckpointError, match="0.bias"):
        run.load_checkpoint(step)


# ---------------------------------------------------------------------- errors: recorder misuse
def test_ids_on_some_steps_only(tmp_path: Path) -> None:
    rec = diffin.Recorder(tmp_path / "a", make_model())
    rec.step([0, 1], lr=0.1)
    with pytest.raises(RecordingError, match="pass them on every step"):
        rec.step(None, lr=0.1)
    rec2 = diffin.Recorder(tmp_path / "b", make_model())
    rec2.step(None, lr=0.1)
    with pytest.raises(RecordingError, match="pass them on every step"):
        rec2.step([0], lr=0.1)


@pytest.mark.parametrize("hyper", ["momentum", "weight_decay", "nesterov", "dampening"])
def test_optimizer_hyper_changes_mid_run(tmp_path: Path, hyper: str) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    rec = diffin.Recorder(tmp_path / "run", model, optimizer=opt)
    rec.step([0], lr=0.1)
    new = {"momentum": 0.9, "weight_decay": 1e-2, "nesterov": True, "dampening": 0.1}[hyper]
    opt.param_groups[0][hyper] = new
    with pytest.raises(RecordingError, match="Keep them constant or start a new recording"):
        rec.step([1], lr=0.1)


def test_step_after_close(tmp_path: Path) -> None:
    rec = diffin.Recorder(tmp_path / "run", make_model())
    rec.step([0], lr=0.1)
    rec.close()
    assert rec.close() == tmp_path / "run"  # closing twice is harmless
    with pytest.raises(RecordingError, match=r"after close\(\)"):
        rec.step([1], lr=0.1)


@pytest.mark.parametrize("lr", [-0.1, math.nan, math.inf])
def test_bad_learning_rate(tmp_path: Path, lr: float) -> None:
    rec = diffin.Recorder(tmp_path / "run", make_model())
    with pytest.raises(RecordingError, match="finite and >= 0"):
        rec.step([0], lr=lr)


def test_lr_required_without_optimizer(tmp_path: Path) -> None:
    rec = diffin.Recorder(tmp_path / "run", make_model())
    with pytest.raises(RecordingError, match="pass lr="):
        rec.step([0])


@pytest.mark.parametrize("every", [0, -3, 2.5])
def test_bad_checkpoint_every(tmp_path: Path, every: Any) -> None:
    with pytest.raises(RecordingError, match="checkpoint_every"):
        diffin.Recorder(tmp_path / "run", make_model(), checkpoint_every=every)


def test_param_groups_with_different_lrs(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.2}]
    )
    rec = diffin.Recorder(tmp_path / "run", model, optimizer=opt)
    with pytest.raises(UnsupportedOptimizerError, match="one η_t per step"):
        rec.step([0])


def test_param_groups_with_equal_lrs(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.1}]
    )
    with diffin.Recorder(tmp_path / "run", model, optimizer=opt) as rec:
        rec.step([0])
    run = diffin.load_run(tmp_path / "run", model)
    assert run.optimizer.is_sgd and run.trainable == NAMES


def test_optimizer_of_another_model(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(make_model(1).parameters(), lr=0.1)
    with pytest.raises(UnsupportedOptimizerError, match="pass the model whose parameters"):
        diffin.Recorder(tmp_path / "run", model, optimizer=opt)


def test_model_without_trainable_parameters(tmp_path: Path) -> None:
    model = make_model().requires_grad_(False)
    with pytest.raises(RecordingError, match="no trainable parameters"):
        diffin.Recorder(tmp_path / "run", model)


# ---------------------------------------------------------------------- atomic writes
def test_atomic_writes_leave_no_temp_files(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"x": np.int64(3), "y": np.arange(2), "d": torch.float64})
    write_npy(tmp_path / "a.npy", np.arange(5, dtype=np.int64))
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.npy"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 3, "y": [0, 1], "d": "float64"}
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy", allow_pickle=False), np.arange(5))


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"old": True})
    write_npy(tmp_path / "a.npy", np.arange(3))
    with pytest.raises(TypeError, match="cannot serialise"):
        write_json(tmp_path / "a.json", {"new": object()})
    with pytest.raises(ValueError):
        write_npy(tmp_path / "a.npy", np.array([{"a": 1}], dtype=object))  # would need pickle

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a.json", half_then_fail)
    assert json.loads((tmp_path / "a.json").read_text()) == {"old": True}
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy", allow_pickle=False), np.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.npy"]


def test_recording_folder_has_no_temp_files(run_dir: Path) -> None:
    names = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")}
    assert not any(n.endswith(".tmp") or n.endswith(C.PARTIAL_SUFFIX) for n in names), names
    assert {C.MANIFEST, C.LRS, C.BATCH_IDS, C.BATCH_OFFSETS, C.CHECKPOINT_DIR} <= names


# ---------------------------------------------------------------------- no pickle
def test_no_pickle_anywhere(run_dir: Path) -> None:
    for f in run_dir.glob("*.npy"):
        arr = np.load(f, allow_pickle=False)
        assert arr.dtype != object
        assert arr.dtype.kind in "iuf"
    run = diffin.load_run(run_dir)
    ckpts = sorted((run_dir / C.CHECKPOINT_DIR).iterdir())
    assert len(ckpts) == len(run.checkpoint_steps)
    for f in ckpts:
        assert f.suffix == ".safetensors"
        with safe_open(str(f), framework="pt") as fh:
            keys = list(fh.keys())
            assert fh.metadata()["step"] == str(int(f.stem.split("_")[1]))
        assert {C.PARAM_PREFIX + n for n in NAMES} <= set(keys)
        # safetensors starts with an 8-byte little-endian header length, never a pickle opcode
        head = f.read_bytes()[:9]
        assert head[0] != 0x80 and head[8:9] == b"{"


def test_issue_code_blocks_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recording loop and the scoring call of the README, character for character."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    X, Y = torch.randn(96, 5, dtype=torch.float64), torch.randint(0, 3, (96,))
    Xv, Yv = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(96), X, Y),
                                         batch_size=16, shuffle=True)
    criterion = nn.CrossEntropyLoss()

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y, reduction="none")

    for _epoch in range(10):  # 60 steps: checkpoints at 0, 50 and 60
        if _epoch == 0:
            rec = diffin.Recorder("runs/mnist", model, optimizer=opt, checkpoint_every=50)  # saves θ_0
        for ids, x, y in loader:            # ids: LongTensor of dataset indices of the batch
            loss = criterion(model(x), y)   # mean over the batch
            opt.zero_grad(); loss.backward(); opt.step()  # noqa: E702
            rec.step(ids, lr=opt.param_groups[0]["lr"])   # after opt.step()
    rec.close()                         # saves the final θ and the manifest

    scores = diffin.influence("runs/mnist", model, loss_fn, train=(X, Y), target=(Xv, Yv),
                              method="tracin")
    assert isinstance(scores, np.ndarray) and scores.shape == (96,) and np.isfinite(scores).all()
    run = diffin.load_run("runs/mnist")
    assert run.checkpoint_steps == [0, 50, 60]
    assert np.any(scores != 0)
