"""`diffin bench --peers` on the tiny setup: peer rows carry diffin's metrics, and a peer that is
missing, skipped or failing gets an ``error`` row while the table still prints.

The first test needs the peer packages (``pip install 'diffin[peers]'``) and skips without
captum; the others replace the peers by stand-ins and run anywhere.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffin
from diffin import peers
from diffin._errors import ConfigError
from diffin.bench import PEER_OPTIONS, BenchConfig, peer_options, run_bench
from diffin.cli import main

METRICS = {"pearson", "spearman", "kendall", "jaccard_top10", "mae", "lds", "seconds", "peak_rss_mb",
           "peak_rss_rise_mb", "notes", "options"}
U = float(np.finfo(np.float64).eps)  # the tiny setup runs in float64
CFG = BenchConfig(methods="diffin,tracin", n_removed=10, lds_subsets=4, lds_examples=0)


def _check_metrics(r: dict, units: str) -> None:
    assert set(r) >= METRICS and "error" not in r
    for k in ("pearson", "spearman", "kendall"):
        assert -1 - 1e4 * U <= r[k] <= 1 + 1e4 * U  # a correlation, up to rounding
    assert 0 <= r["jaccard_top10"] <= 1 and -1 <= r["lds"] <= 1
    assert r["seconds"] > 0 and r["peak_rss_mb"] > 0
    assert np.isnan(r["mae"]) if units == "rank-only" else r["mae"] >= 0
    assert isinstance(r["notes"], str) and r["notes"]


def test_peer_rows_have_the_metrics(tmp_path):
    pytest.importorskip("captum")
    out = tmp_path / "b.json"
    doc = run_bench(["tiny"], CFG, str(out), workdir=str(tmp_path / "work"), peers=True, quiet=True)
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(doc["results"]))
    rows = {r["method"]: r for r in doc["results"]}
    status, units = peers.available_peers(), peers.peer_units()
    assert list(rows) == ["diffin", "tracin", *status]
    for name, st in status.items():
        r = rows[name]
        assert r["peer"] is True
        if st == "ok":
            _check_metrics(r, units[name])
        else:
            assert r["error"].startswith("not installed")
    # captum's TracIn-CP is diffin's tracin computed by captum (the scores agree to rounding):
    # the same metrics, to √u relative with a 1e4·u floor (correlations are O(1); mae in loss units)
    for k in ("pearson", "spearman", "mae", "lds"):
        ref = rows["tracin"][k]
        assert rows["captum-tracincp"][k] == pytest.approx(ref, rel=U**0.5, abs=1e4 * U * max(1.0, abs(ref)))


def _fake_run_peer(fail: str):
    """A stand-in for peers.run_peer: scores from a fixed seed, or an error for ``fail``."""

    def run_peer(name, *, run, model_factory, loss_fn, train, target, pairwise=False, **options):
        if name == fail:
            raise RuntimeError(f"{name} broke on purpose")
        n, q = int(train[0].shape[0]), int(target[0].shape[0])
        rng = np.random.default_rng(len(name))
        s = rng.normal(size=(n, q)) if pairwise else rng.normal(size=n)
        return peers.PeerResult(name, s, 0.01, None, f"fake {name} {options}", dict(options), [])

    return run_peer


def test_missing_and_failing_peers_give_error_rows(tmp_path, monkeypatch, capsys):
    names = list(peers.available_peers())
    status = {n: "ok" for n in names}
    status["trak"] = "ModuleNotFoundError: No module named 'trak'"
    monkeypatch.setattr(peers, "available_peers", lambda: status)
    monkeypatch.setattr(peers, "run_peer", _fake_run_peer("captum-tracincp"))
    cfg = BenchConfig(methods="diffin", n_removed=10, lds_subsets=4, lds_examples=2)
    out = tmp_path / "b.json"
    run_bench(["tiny"], cfg, str(out), workdir=str(tmp_path / "work"), peers=True)
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["captum-tracincp"]["error"] == "RuntimeError: captum-tracincp broke on purpose"
    assert rows["trak"]["error"] == "not installed: ModuleNotFoundError: No module named 'trak'"
    for name in set(names) - {"captum-tracincp", "trak"}:
        assert "error" not in rows[name] and -1 <= rows[name]["lds_per_example"] <= 1
    table = capsys.readouterr().out
    assert "error: RuntimeError: captum-tracincp broke on purpose" in table
    assert "error: not installed: ModuleNotFoundError: No module named 'trak'" in table


def test_cli_peer_methods_and_options(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peers, "available_peers", lambda: {n: "ok" for n in peers.peer_units()})
    monkeypatch.setattr(peers, "run_peer", _fake_run_peer(""))
    out = tmp_path / "b.json"
    code = main(["bench", "--setup", "tiny", "--json", str(out), "--methods", "diffin", "--n-removed", "8",
                 "--lds-subsets", "0", "--quiet", "--peers", "--peer-methods", "trak,dattri-if-cg",
                 "--peer-options", '{"trak": {"proj_dim": 16}, "dattri-if-cg": {"skip": "too slow"}}'])
    assert code == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["diffin", "trak", "dattri-if-cg"]
    assert rows["trak"]["options"] == {"proj_dim": 16} and "fake trak" in rows["trak"]["notes"]
    assert rows["dattri-if-cg"]["error"] == "skipped: too slow"
    assert main(["bench", "--setup", "tiny", "--methods", "diffin", "--n-removed", "8", "--lds-subsets",
                 "0", "--quiet", "--peers", "--peer-methods", "no-such-peer"]) == 2
    assert "unknown peers ['no-such-peer']" in capsys.readouterr().err
    assert main(["bench", "--setup", "tiny", "--peers", "--peer-options", "{not json"]) == 2
    assert "--peer-options is not valid JSON" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="must be a JSON object"):
        peer_options("tiny", {"trak": 16})


def test_peer_options_merge_by_layer():
    opts = peer_options("speed", {"trak": {"proj_dim": 64}, "dattri-if-cg": {"max_iter": 2}})
    assert opts["trak"] == {"proj_dim": 64}
    cg = {**PEER_OPTIONS["*"]["dattri-if-cg"], **PEER_OPTIONS["speed"]["dattri-if-cg"], "max_iter": 2}
    assert opts["dattri-if-cg"] == cg
    assert opts["kronfluence-ekfac"] == {"damping_factor": None}
    assert set(PEER_OPTIONS["*"]) <= set(peers.peer_units())



def test_runs_give_a_trak_row_over_every_run(tmp_path, monkeypatch):
    """``--runs 2 --peers``: a row ``trak ×2 runs`` whose TRAK call got option ``runs`` = the bench's
    run and the second recorded run (other seed, same data), the rest of TRAK's options as in its
    own row; its LDS columns and paired difference to TracIn come from its own scores."""
    calls = []
    fake = _fake_run_peer("")

    def run_peer(name, **kw):
        calls.append(kw)
        res = fake(name, **kw)
        if "runs" in kw:  # the negated scores of the single-run row: every rank statistic flips sign
            res.scores = -res.scores
        return res

    monkeypatch.setattr(peers, "available_peers", lambda: {n: "ok" for n in peers.peer_units()})
    monkeypatch.setattr(peers, "run_peer", run_peer)
    work = tmp_path / "work"
    out = tmp_path / "b.json"
    assert main(["bench", "--setup", "tiny", "--json", str(out), "--workdir", str(work), "--methods", "tracin",
                 "--n-removed", "8", "--lds-subsets", "6", "--truth", "replay,reseed", "--truth-seeds", "2",
                 "--runs", "2", "--ensemble", "tracin", "--quiet", "--peers", "--peer-methods", "trak",
                 "--peer-options", '{"trak": {"proj_dim": 16}}']) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["tracin", "tracin ×2 runs", "trak ×2 runs", "trak"]
    dirs = [str(work / "tiny"), str(work / "tiny-seed1")]
    ens, single = [c for c in calls if not c.get("pairwise")]
    assert ens["runs"] == dirs and ens["proj_dim"] == 16 and ens["n_checkpoints"] > 1
    assert ens["run"].path == work / "tiny"
    assert "runs" not in single and single["proj_dim"] == 16 and single["run"].path == work / "tiny"
    # the two folders are complete runs of the same data with different initialisations
    runs = [diffin.load_run(d, n_train=120) for d in dirs]
    assert all(r.complete for r in runs) and runs[0].n_steps == runs[1].n_steps
    theta = [torch.cat([t.reshape(-1) for t in r.load_checkpoint(0).params.values()]) for r in runs]
    assert not torch.equal(theta[0], theta[1])
    row, one = rows["trak ×2 runs"], rows["trak"]
    n_seg = len(diffin.load_run(work / "tiny").segments)  # every run's segment ends, as for one run
    assert row["runs"] == 2 and row["peer"] is True
    assert row["options"] == {"proj_dim": 16, "runs": dirs, "n_checkpoints": n_seg}
    _check_metrics(row, "rank-only")
    assert row["spearman"] == pytest.approx(-one["spearman"], abs=1e4 * U)
    for mode in ("replay", "reseed"):
        assert row[f"lds_{mode}"] == pytest.approx(-one[f"lds_{mode}"], abs=1e4 * U)
        lo, hi = row[f"lds_{mode}_ci"]
        assert lo <= row[f"lds_{mode}"] <= hi
        vs = row[f"lds_{mode}_vs_tracin"]
        assert vs["diff"] == pytest.approx(row[f"lds_{mode}"] - rows["tracin"][f"lds_{mode}"], abs=1e4 * U)


def test_no_trak_runs_row_without_trak_or_peers(tmp_path, monkeypatch):
    """The ``trak ×M runs`` row needs ``--peers`` with trak among the peer methods."""
    monkeypatch.setattr(peers, "available_peers", lambda: {n: "ok" for n in peers.peer_units()})
    monkeypatch.setattr(peers, "run_peer", _fake_run_peer(""))
    args = ["bench", "--setup", "tiny", "--methods", "tracin", "--n-removed", "8", "--lds-subsets", "0",
            "--runs", "2", "--ensemble", "tracin", "--quiet", "--workdir", str(tmp_path / "work")]
    for extra, want in ((["--peers", "--peer-methods", "dattri-tracin"], ["tracin", "tracin ×2 runs", "dattri-tracin"]),
                        ([], ["tracin", "tracin ×2 runs"])):
        out = tmp_path / f"b{len(extra)}.json"
        assert main([*args, "--json", str(out), *extra]) == 0
        assert [r["method"] for r in json.loads(out.read_text())["results"]] == want
