"""The benchmark scripts run end to end on the tiny setup (their numbers are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lds_tails_on_tiny_setup(tmp_path, monkeypatch, capsys):
    mod = _load("lds_tails")
    out = tmp_path / "tails.json"
    monkeypatch.setattr(sys, "argv", ["lds_tails.py", "--setup", "tiny", "--json", str(out)])
    mod.main()
    res = json.loads(out.read_text())
    assert res["setup"] == "tiny" and res["n_subsets"] == 50
    assert [r["method"] for r in res["rows"]] == list(mod.METHODS)
    for r in res["rows"]:
        for k in ("lds", "lds_clipped_1pct", "lds_ranks"):
            assert -1.0 <= r[k] <= 1.0
        assert r["top3_abs"] == sorted(r["top3_abs"], reverse=True)
        assert r["top3_abs"][0] >= r["median_abs"] >= 0
    assert -1.0 <= res["spearman_exact_vs_expected"] <= 1.0
    assert np.isfinite(res["actual_change_std"]) and res["actual_change_std"] > 0
    assert "diffin-exact" in capsys.readouterr().out
