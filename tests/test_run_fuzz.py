"""A run folder from someone else is data, never a key to the disk.

Property-based (hypothesis): a small recorded run (SGD with momentum, dropout so that RNG states are
logged, batch ids) is damaged one way or several (a manifest value replaced by anything JSON can
hold, a key dropped, the manifest's bytes cut or flipped, a log or checkpoint cut, grown or flipped,
a checkpoint's safetensors header length or JSON damaged, a listed file replaced by a link to a file
outside the folder, a file entry pointing outside by ``..`` or an absolute path), then loaded and
read through (:func:`diffin.load_run`, every checkpoint, every batch and RNG state). Whatever the
damage, the loader either reads the run or raises a named :class:`~diffin.DiffinError`, never
another exception from inside diffin; and it never opens a file outside the run folder (planted
next to it: valid copies of the run's own files, so a read would succeed unnoticed).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

import diffin
from diffin import _constants as C
from diffin._errors import DiffinError, UnsafePathError
from diffin.recording import run as run_module

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("DIFFIN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="DIFFIN_FUZZ_RANDOM" not in os.environ, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run of 6 steps (checkpoints at 0, 2, 4, 6) with ids, momentum and RNG states."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.25), nn.Linear(5, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    path = tmp_path_factory.mktemp("fuzz") / "run"
    with diffin.Recorder(path, model, opt, checkpoint_every=2, n_train=12) as rec:
        for t in range(6):
            ids = torch.arange(2 * t, 2 * t + 2)
            model.train()
            loss = nn.functional.cross_entropy(model(x[ids]), y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(ids)
    run = diffin.load_run(path)
    assert run.has_rng and run.has_batch_ids and run.n_steps == 6
    return path


def _files(run: Path) -> list[str]:
    """The run's files, relative to it, sorted (manifest, logs, checkpoints)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def _json_paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path (keys / indices) into a JSON document, the root excluded."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield (*prefix, k)
        yield from _json_paths(v, (*prefix, k))


# ---------------------------------------------------------------------------------------- damage
EVIL = ["../outside/secret.safetensors", "checkpoints/../../outside/secret.safetensors", "..", "../",
        "/etc/passwd", "C:\\Windows\\win.ini", "\\\\server\\share\\x", "checkpoints\\..\\..\\x", "",
        "link_out", "checkpoints/link_out", "manifest.json", "checkpoints", "group_lrs.f64\x00", "a" * 300]
"""File entries a crafted manifest may hold ("link_out": a link this test plants to the outside)."""

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.sampled_from(EVIL),
)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


@st.composite
def damages(draw: st.DrawFn, files: list[str], manifest: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One to three damages, each a tuple (kind, ...) that :func:`_apply` carries out."""
    paths = list(_json_paths(manifest))
    file_keys = [p for p in paths if p[-1] == "file"]
    one = st.one_of(
        st.tuples(st.just("set"), st.sampled_from(paths), json_value),
        st.tuples(st.just("set"), st.sampled_from(file_keys), st.sampled_from(EVIL)),
        st.tuples(st.just("drop"), st.sampled_from(paths)),
        st.tuples(st.just("outside"), st.sampled_from(file_keys)),
        st.tuples(st.just("cut"), st.sampled_from(files), st.floats(0, 1)),
        st.tuples(st.just("grow"), st.sampled_from(files), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("flip"), st.sampled_from(files), st.floats(0, 1), st.integers(1, 255)),
        st.tuples(st.just("header_len"), st.sampled_from([f for f in files if f.endswith(".safetensors")]),
                  st.integers(0, 2**64 - 1)),
        st.tuples(st.just("header_json"), st.sampled_from([f for f in files if f.endswith(".safetensors")]),
                  st.integers(0, 200), st.integers(0, 255)),
        st.tuples(st.just("link"), st.sampled_from(files)),
    )
    return draw(st.lists(one, min_size=1, max_size=3))


def _set(doc: Any, path: tuple[Any, ...], value: Any, drop: bool = False) -> None:
    node = doc
    for k in path[:-1]:
        if not isinstance(node, (dict, list)):
            return
        try:
            node = node[k]
        except (KeyError, IndexError, TypeError):
            return
    key = path[-1]
    if isinstance(node, dict) and (key in node or not drop) or (
        isinstance(node, list) and isinstance(key, int) and key < len(node)
    ):
        if drop:
            del node[key]
        else:
            node[key] = value


def _apply(run: Path, outside: Path, damage: list[tuple[Any, ...]]) -> None:
    mpath = run / "manifest.json"
    for kind, target, *args in damage:
        if kind in ("set", "drop", "outside"):
            try:
                doc = json.loads(mpath.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # damaged already
            value = str(outside / "secret.safetensors") if kind == "outside" else (args[0] if args else None)
            _set(doc, target, value, drop=kind == "drop")
            mpath.write_text(json.dumps(doc), encoding="utf-8")
            continue
        p = run / target
        if not p.is_file() or p.is_symlink():
            continue
        data = bytearray(p.read_bytes())
        if kind == "cut":
            data = data[: int(args[0] * len(data))]
        elif kind == "grow":
            data += args[0]
        elif kind == "flip" and data:
            data[min(int(args[0] * len(data)), len(data) - 1)] ^= args[1]
        elif kind == "header_len" and len(data) >= 8:
            data[:8] = int(args[0]).to_bytes(8, "little")
        elif kind == "header_json" and len(data) > 8:
            data[min(8 + args[0], len(data) - 1)] = args[1]
        elif kind == "link":
            p.unlink()
            p.symlink_to(outside / ("secret.safetensors" if target.endswith(".safetensors") else "secret.bin"))
            continue
        p.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------- reading
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


@contextmanager
def _opened_files() -> Iterator[list[str]]:
    """The paths opened by Python code (``open`` audit events) and by safetensors (its
    ``safe_open``, which opens in Rust) while the block runs."""
    global _OPENED
    if not getattr(_audit, "installed", False):
        sys.addaudithook(_audit)
        _audit.installed = True  # type: ignore[attr-defined]
    seen: list[str] = []
    real = run_module.safe_open

    def spying(path: Any, *a: Any, **k: Any) -> Any:
        seen.append(os.fsdecode(path))
        return real(path, *a, **k)

    _OPENED = seen
    try:
        with mock.patch.object(run_module, "safe_open", spying):
            yield seen
    finally:
        _OPENED = None


def _read_through(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = diffin.load_run(path)
        run.verify()
        for t in range(run.n_steps):
            if run.has_batch_ids:
                run.batch(t)
            if run.has_rng:
                run.rng_state(t)
                run.cuda_rng_state(t)
        _ = run.steps_logged, run.partial_note(), run.fingerprint, run.batch_size_hint()


def _outside_reads(opened: list[str], run: Path) -> list[str]:
    root = run.resolve()
    bad = []
    for p in opened:
        real = Path(p).resolve()
        if real != root and root not in real.parents and real.suffix not in (".py", ".pyc", ".so"):
            bad.append(p)
    return bad


def _box(pristine: Path) -> tuple[Path, Path, Path]:
    """A fresh copy of the run, with valid copies of its files planted beside it (outside)."""
    box = Path(tempfile.mkdtemp(prefix="diffin-fuzz-"))
    run, outside = box / "run", box / "outside"
    shutil.copytree(pristine, run)
    outside.mkdir()
    shutil.copy(next((pristine / "checkpoints").iterdir()), outside / "secret.safetensors")
    shutil.copy(pristine / C.GROUP_LRS_LOG, outside / "secret.bin")
    (run / "link_out").symlink_to(outside / "secret.bin")
    (run / "checkpoints" / "link_out").symlink_to(outside / "secret.safetensors")
    return box, run, outside


def test_the_pristine_run_reads_through(pristine: Path) -> None:
    box, run, _ = _box(pristine)
    try:
        with _opened_files() as opened:
            _read_through(run)
        assert opened and _outside_reads(opened, run) == []
    finally:
        shutil.rmtree(box)


@pytest.mark.parametrize("entry", ["../outside/secret.safetensors", "ABS", "checkpoints/link_out"])
def test_a_checkpoint_outside_the_folder_is_refused_by_name(pristine: Path, entry: str) -> None:
    box, run, outside = _box(pristine)
    try:
        doc = json.loads((run / "manifest.json").read_text())
        doc["checkpoints"][1]["file"] = str(outside / "secret.safetensors") if entry == "ABS" else entry
        doc["checkpoints"][1]["bytes"] = (outside / "secret.safetensors").stat().st_size
        (run / "manifest.json").write_text(json.dumps(doc))
        with _opened_files() as opened, pytest.raises(UnsafePathError, match="outside the run folder"):
            diffin.load_run(run)
        assert _outside_reads(opened, run) == []
    finally:
        shutil.rmtree(box)


def test_a_manifest_that_links_out_is_refused_by_name(pristine: Path) -> None:
    box, run, outside = _box(pristine)
    try:
        shutil.copy(run / "manifest.json", outside / "manifest.json")
        (run / "manifest.json").unlink()
        (run / "manifest.json").symlink_to(outside / "manifest.json")
        with _opened_files() as opened, pytest.raises(UnsafePathError, match="symbolic link"):
            diffin.load_run(run)
        assert _outside_reads(opened, run) == []
    finally:
        shutil.rmtree(box)


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_damaged_runs_raise_named_errors_and_read_nothing_outside(pristine: Path, data: st.DataObject) -> None:
    files = [f for f in _files(pristine)]
    manifest = json.loads((pristine / "manifest.json").read_text())
    damage = data.draw(damages(files, manifest), label="damage")
    box, run, outside = _box(pristine)
    try:
        _apply(run, outside, damage)
        with _opened_files() as opened, suppress(DiffinError):
            _read_through(run)
        assert _outside_reads(opened, run) == [], f"read outside the run folder after {damage!r}"
    finally:
        shutil.rmtree(box)


def test_a_resume_state_naming_a_file_outside_its_folder_is_refused(tmp_path: Path) -> None:
    """A scoring's resume state (``out/.resume/state.json``) names its tensor file: a name that
    leaves the folder is refused by name before anything is read; a good one loads."""
    from diffin._resume import STATE_JSON, SweepResume, SweepState

    folder = tmp_path / "out" / ".resume"
    folder.mkdir(parents=True)
    SweepResume(folder, {"k": 1}).save(SweepState({"A": torch.ones(2)}, {"where": "here"}))
    assert SweepResume(folder, {"k": 1}, load_saved=True).load() is not None
    secret = tmp_path / "secret.safetensors"
    shutil.copy(next(folder.glob("tensors-*.safetensors")), secret)
    state = json.loads((folder / STATE_JSON).read_text())
    for evil in ("../../secret.safetensors", str(secret)):
        (folder / STATE_JSON).write_text(json.dumps({**state, "tensors": evil}))
        with _opened_files() as opened, pytest.raises(UnsafePathError):
            SweepResume(folder, {"k": 1}, load_saved=True).load()
        assert str(secret) not in opened
