"""Fixed per-call work cached by the identity of unchanged data: hashes, the NaN/Inf scan and the
HVP probe run once for the same objects, and again as soon as the data changes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import diffin
from _tiny import record
from diffin import _data
from diffin.estimators import base as est_base


def _count(monkeypatch, owner, name):
    calls = {"n": 0}
    real = getattr(owner, name)

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, counting)
    return calls


def test_hash_and_scan_once_per_unchanged_data_and_again_after_an_in_place_change(tmp_path, monkeypatch):
    tiny = record(tmp_path / "r")
    hashed = _count(monkeypatch, _data, "_fingerprint")
    scanned = _count(monkeypatch, _data.DataSource, "_check_finite")
    first = tiny.score("tracin").scores
    h, s = hashed["n"], scanned["n"]
    assert h >= 2 and s >= 2  # training and target data
    again = tiny.score("tracin").scores
    assert (hashed["n"], scanned["n"]) == (h, s)  # nothing read again
    np.testing.assert_array_equal(first, again)
    assert _data.fingerprint((tiny.X, tiny.Y)) == _data._fingerprint((tiny.X, tiny.Y))  # the same value
    tiny.X[3, 0] = float("nan")  # an in-place write bumps the version counter
    with pytest.raises(diffin.NonFiniteDataError, match="3"):
        tiny.score("tracin")
    assert hashed["n"] > h and scanned["n"] > s


def test_a_new_tensor_at_a_recycled_address_is_not_taken_for_the_old_one():
    a, ya = torch.arange(6.0).reshape(3, 2), torch.arange(3)
    key = _data.data_identity((a, ya))
    b, yb = a.clone(), ya.clone()
    assert _data.data_identity((b, yb)) != key
    assert _data.data_identity((a, ya)) == key
    del b, yb
    a2 = a.clone()
    del a
    assert _data.data_identity((a2, ya)) != key  # whatever address a2 got


def test_memmaps_are_identified_by_file_and_writable_arrays_not_at_all(tmp_path):
    np.save(tmp_path / "x_train.npy", np.ones((4, 3), dtype=np.float32))
    np.save(tmp_path / "y_train.npy", np.zeros(4, dtype=np.int64))
    x, y = diffin.memmap_arrays(tmp_path)
    key = _data.data_identity((x, y))
    assert key is not None and _data.data_identity(diffin.memmap_arrays(tmp_path)) == key
    np.save(tmp_path / "x_train.npy", np.full((4, 3), 2.0, dtype=np.float32))  # rewritten: a new mtime
    st = os.stat(tmp_path / "x_train.npy")
    os.utime(tmp_path / "x_train.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _data.data_identity(diffin.memmap_arrays(tmp_path)) != key
    assert _data.data_identity((np.ones((4, 3)), np.zeros(4))) is None


def test_the_hvp_probe_runs_once_per_run_and_data(tmp_path, monkeypatch):
    tiny = record(tmp_path / "r", kind="cnn")  # a convolution: `auto` probes (dense models take exact HVPs)
    probed = _count(monkeypatch, est_base.ScoringContext, "_probe_hvp")
    a = tiny.score("diffin-frozen")
    b = tiny.score("diffin-frozen")
    assert probed["n"] == 1 and a.diagnostics["hvp"] == b.diagnostics["hvp"]
    np.testing.assert_array_equal(a.scores, b.scores)
