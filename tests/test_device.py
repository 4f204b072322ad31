"""``ScoreConfig.device``: scoring on another device than the model's (a copy of the model is moved,
never the caller's module), the error on a machine without that device, and the agreement of
CPU and CUDA scores where CUDA exists (docs/method.md §4.6)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import diffin
from _tiny import assert_close, tolerance
from diffin._api import scoring_model
from diffin.cli import main

HAS_CUDA = torch.cuda.is_available()


def test_device_cpu_equals_the_default(tiny_run):
    """On a CPU model, device='cpu' is the model's own device: the same scores, bit for bit."""
    for method in ("diffin-exact", "tracin"):
        default = tiny_run.score(method).scores
        on_cpu = tiny_run.score(method, device="cpu")
        assert isinstance(on_cpu.scores, np.ndarray) and on_cpu.scores.dtype == np.float64
        np.testing.assert_array_equal(on_cpu.scores, default)
        assert on_cpu.config.device == "cpu"


def test_scoring_model_leaves_the_module_alone_when_it_is_already_there():
    model = torch.nn.Linear(3, 2).double()
    assert scoring_model(model, None) is model
    assert scoring_model(model, "cpu") is model


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", 3])
def test_malformed_device_is_a_config_error(bad):
    with pytest.raises(diffin.ConfigError, match="device must be"):
        diffin.ScoreConfig(device=bad)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_config_error(tiny_run, device):
    with pytest.raises(diffin.ConfigError, match="no CUDA device"):
        tiny_run.score("tracin", device=device)


def test_cli_has_device(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    assert "--device" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize(("method", "hvp", "computation"), [
    ("diffin-exact", "exact", "exact"),
    ("diffin-exact", "auto", "fd"),
    ("tracin", "auto", "exact"),
])
def test_cuda_agrees_with_cpu_in_float64(tiny_run, method, hvp, computation):
    """float64 scores on CUDA equal the CPU ones up to rounding (another summation order): within
    1e-8 relative with exact HVPs, within the finite-difference tolerance with central ones."""
    cpu = tiny_run.score(method, hvp=hvp).scores
    model = tiny_run.make()
    was_training = model.training
    res = diffin.score(tiny_run.run, model, tiny_run.loss, train=(tiny_run.X, tiny_run.Y),
                       target=(tiny_run.Xv, tiny_run.Yv), method=method, hvp=hvp, device="cuda", progress=False)
    assert isinstance(res.scores, np.ndarray) and res.scores.dtype == np.float64
    rtol, floor = tolerance(torch.float64, computation)
    assert_close(res.scores, cpu, rtol=max(rtol, 1e-8) if computation == "exact" else rtol, floor=floor)
    assert all(p.device.type == "cpu" for p in model.parameters()), "the caller's module was moved"
    assert model.training == was_training


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_self_influence_and_groups(tiny_run):
    """The self-influence target and removal groups also run on CUDA and agree with the CPU."""
    groups = [[0, 1, 2], [5, 7]]
    cpu = tiny_run.score("diffin-exact", hvp="exact", target="self")
    gpu = tiny_run.score("diffin-exact", hvp="exact", target="self", device="cuda")
    assert_close(gpu.scores, cpu.scores, rtol=1e-8)
    cpu_g = tiny_run.score("diffin-exact", hvp="exact", groups=groups)
    gpu_g = tiny_run.score("diffin-exact", hvp="exact", groups=groups, device="cuda")
    assert_close(gpu_g.group_scores, cpu_g.group_scores, rtol=1e-8)


def _gpu_check() -> ModuleType:
    """benchmarks/gpu_check.py as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_script_runs_on_cpu(tmp_path, monkeypatch):
    """benchmarks/gpu_check.py end to end with --device cpu (CPU against itself: differences 0)."""
    mod = _gpu_check()
    out = tmp_path / "check.json"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--setup", "tiny", "--methods",
                                      "diffin-exact,tracin", "--workdir", str(tmp_path), "--json", str(out)])
    assert mod.main() == 0
    res = json.loads(out.read_text())
    assert [(r["dtype"], r["method"]) for r in res["rows"]] == [
        (d, m) for d in ("float64", "float32") for m in ("diffin-exact", "tracin")]
    assert all(r["max_rel_diff"] == 0.0 and r["ok"] for r in res["rows"]) and res["failed"] == []


def test_gpu_check_speed_section_runs_on_cpu(tmp_path, monkeypatch, capsys):
    """The speed section at a tiny size: every method a ratio of the same device's epoch, with
    samples/s and peak memory; a setup this diffin lacks is skipped, not failed."""
    mod = _gpu_check()
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--speed-only", "--speed-setups",
                                      "scale-1m,no-such-setup", "--speed-n", "1024", "--speed-methods",
                                      "diffin,tracin", "--workdir", str(tmp_path), "--json", str(out)])
    assert mod.main() == 0
    res = json.loads(out.read_text())
    scale, missing = res["speed"]
    assert missing["setup"] == "no-such-setup" and "skipped" in missing
    assert scale["n_train"] == 1024 and scale["epoch_seconds"] > 0 and scale["steps"] == 4
    assert [r["method"] for r in scale["rows"]] == ["diffin", "tracin"]
    for r in scale["rows"]:
        assert r["x_epoch"] == pytest.approx(r["seconds"] / scale["epoch_seconds"])
        assert r["samples_per_second"] == pytest.approx(1024 / r["seconds"])
    assert "x epoch" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_batch_loss_two_tower_agrees_with_cpu(tmp_path):
    """A batch-coupled loss on tuple inputs (docs/method.md §4.7) scores the same on CUDA."""
    from test_batch_loss import CLIP, record_clip

    make, train, val = record_clip(tmp_path / "run")
    kw = dict(train=train, target=val, method="diffin-exact", hvp="exact", progress=False)
    cpu = diffin.score(tmp_path / "run", make(), CLIP, **kw).scores
    gpu = diffin.score(tmp_path / "run", make(), CLIP, device="cuda", **kw).scores
    assert_close(gpu, cpu, rtol=1e-8)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["bn1d-dropout", "bn2d-dropout2d"])
def test_cuda_scores_a_cpu_trained_batchnorm_dropout_run(tmp_path, kind):
    """A run trained on the CPU with BatchNorm and dropout scores the same on CUDA: the masks are drawn
    again from the CPU generator the loop used (docs/method.md §4.8)."""
    from test_train_mode_sweep import record_bn

    make, train, val = record_bn(tmp_path / "run", kind)
    kw = dict(train=train, target=val, method="diffin-exact", hvp="exact", progress=False)
    cpu = diffin.score(tmp_path / "run", make(), _ce, **kw)
    gpu = diffin.score(tmp_path / "run", make(), _ce, device="cuda", **kw)
    assert gpu.diagnostics["replay_drift"] < 1e-10
    assert_close(gpu.scores, cpu.scores, rtol=1e-8)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_a_cuda_trained_dropout_run_replays_on_cuda(tmp_path):
    """A dropout run trained on CUDA replays there with its recorded CUDA generator states."""
    from torch import nn

    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 6, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (24,), generator=g)
    Xv, Yv = X[:8], Y[:8]

    def make() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).double()

    model = make().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    Xc, Yc = X.cuda(), Y.cuda()
    with diffin.Recorder(tmp_path / "run", model, optimizer=opt, checkpoint_every=2, n_train=24) as rec:
        for t in range(8):
            b = torch.arange(t % 4 * 6, t % 4 * 6 + 6)
            loss = _ce(model(Xc[b]), Yc[b]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(b)
    res = diffin.score(tmp_path / "run", make(), _ce, train=(X, Y), target=(Xv, Yv), method="diffin-exact",
                       hvp="exact", device="cuda", progress=False)
    assert res.diagnostics["replay_drift"] < 1e-10
    assert np.all(np.isfinite(res.scores))


def _ce(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(o, y, reduction="none")


def test_gpu_check_speed_section_times_text_bert_against_the_trainer(tmp_path, monkeypatch):
    """text-bert in the speed section: its epoch is the Hugging Face Trainer's own run on the device
    (recorded by DiffinCallback for the scores), every method a ratio of it."""
    pytest.importorskip("transformers")
    mod = _gpu_check()
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--speed-only", "--speed-setups",
                                      "text-bert", "--speed-rows", "64", "--speed-methods", "diffin,tracin",
                                      "--workdir", str(tmp_path), "--json", str(out)])
    assert mod.main() == 0
    (bert,) = json.loads(out.read_text())["speed"]
    assert bert["setup"] == "text-bert" and bert["n_train"] == 64 and bert["epochs"] == 3
    assert bert["steps"] == 6 and bert["epoch_seconds"] == pytest.approx(bert["train_seconds_plain"] / 3)
    assert [(r["method"], r.get("variant")) for r in bert["rows"]] == [("diffin", "diffin-exact"), ("tracin", "tracin")]
    for r in bert["rows"]:
        assert r["x_training"] == pytest.approx(r["seconds"] / bert["train_seconds_plain"])
