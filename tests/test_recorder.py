"""Recording a run with :class:`diffin.Recorder`: round trips, what each checkpoint holds, the
recorder's named errors for misuse, atomic writes and the no-pickle guarantee."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import diffin
from _recording_loop import N_TRAIN, NAMES, batch_ids, make_data, make_model, record, snapshot
from diffin import _constants as C
from diffin._errors import (
    FrozenWeightsMismatchError,
    InvalidIdsError,
    RecordingError,
    RunExistsError,
    UnsupportedOptimizerError,
)
from diffin._io import atomic_write, write_json, write_npy
from diffin.recording.manifest import frozen_fingerprint


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
    assert run.complete and run.status == C.STATUS_COMPLETE and run.format_version == C.FORMAT_VERSION
    # a closed run's logs hold exactly the entries the manifest lists, nothing past them
    assert (path / C.GROUP_LRS_LOG).stat().st_size == 8 * steps
    if steps:
        assert (path / C.BATCH_OFFSETS_LOG).stat().st_size == 8 * (steps + 1)
        assert (path / C.BATCH_IDS_LOG).stat().st_size == 8 * sum(len(i) for i in out["ids"])


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
    assert not (tmp_path / "run" / C.BATCH_IDS_LOG).exists()
    assert not (tmp_path / "run" / C.BATCH_OFFSETS_LOG).exists()
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
        assert "0.bias" not in ck.params  # frozen: fingerprinted in the manifest, not saved (issue 20)
        for n in trainable:
            assert torch.equal(ck.params[n], out["params"][s][n])
        assert set(ck.buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
        for n, b in ck.buffers.items():
            assert torch.equal(b, out["buffers"][s][n]), (s, n)
    assert run.frozen_sha256 == frozen_fingerprint(model, trainable)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].bias.add_(1e-12)  # another frozen weight: refused by name at scoring
    with pytest.raises(FrozenWeightsMismatchError, match="frozen"):
        diffin.load_run(tmp_path / "run", other)
    assert torch.equal(model[0].bias, frozen)
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
    with pytest.raises(RunExistsError, match="unfinished recording") as ei:
        diffin.Recorder(path, make_model())
    assert "resume=True" in str(ei.value) and "overwrite=True" in str(ei.value)


def test_run_exists_not_a_folder(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunExistsError, match="not a folder"):
        diffin.Recorder(f, make_model())


# ---------------------------------------------------------------------- errors: ids while recording
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
    """Every group's rate is recorded at every step (read from the optimizer); lr= must agree."""
    model = make_model()
    x, y = make_data()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.2}]
    )
    with diffin.Recorder(tmp_path / "run", model, optimizer=opt) as rec:
        for t in range(3):
            opt.param_groups[1]["lr"] = 0.2 / (1 + t)
            ids = batch_ids(t)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            rec.step(ids)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:3]), y[:3]).backward()
        opt.step()
        with pytest.raises(RecordingError, match=r"lr=0\.3 was passed but the optimizer stepped with lr=0\.1"):
            rec.step([0, 1, 2], lr=0.3)
        rec.step([0, 1, 2], lr=0.1)
    run = diffin.load_run(tmp_path / "run", model)
    np.testing.assert_array_equal(run.group_lrs, [[0.1, 0.2], [0.1, 0.1], [0.1, 0.2 / 3], [0.1, 0.2 / 3]])
    np.testing.assert_array_equal(run.lrs, [0.1] * 4)
    assert [g["params"] for g in run.optimizer.groups] == [NAMES[:2], NAMES[2:]]
    assert not run.optimizer.uniform_groups


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
    assert not any(n.endswith(".tmp") or n.endswith(C.V1_PARTIAL_SUFFIX) for n in names), names
    assert {C.MANIFEST, C.GROUP_LRS_LOG, C.BATCH_IDS_LOG, C.BATCH_OFFSETS_LOG, C.CHECKPOINT_DIR} <= names


# ---------------------------------------------------------------------- no pickle
def test_no_pickle_anywhere(run_dir: Path) -> None:
    m = json.loads((run_dir / C.MANIFEST).read_text())
    logs = [m["lrs"], m["batch_ids"]["ids"], m["batch_ids"]["offsets"]]
    assert {e["dtype"] for e in logs} == {C.LRS_DTYPE, C.IDS_DTYPE}  # raw numbers, no object arrays
    for e in logs:
        assert (run_dir / e["file"]).stat().st_size == e["count"] * 8
    assert not list(run_dir.glob("*.npy")) and not list(run_dir.glob("*.pkl"))
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
