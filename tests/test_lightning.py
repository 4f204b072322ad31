"""The Lightning callback: a ``lightning.Trainer`` run recorded by ``DiffinCallback`` is the run a
plain loop records (same learning rates, batches, checkpoints, scores), and its scores track
replayed removal in float64."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import diffin
from diffin._errors import RecordingError, UnsupportedOptimizerError
from diffin.groundtruth import replay_removal

pl = pytest.importorskip("lightning.pytorch", reason="needs the lightning extra: pip install 'diffin[lightning]'")
from diffin.integrations.lightning import DiffinCallback, unwrap_optimizer  # noqa: E402

N, BATCH, ACC, EPOCHS, CLIP = 24, 4, 2, 2, 0.5
MANUAL_CLIP: float | None = None  # the manual loop does not clip: its removals stay close to linear


def _data() -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N + 10, 5, generator=g, dtype=torch.float64)
    Y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
    return TensorDataset(X[:N], Y[:N]), (X[N:], Y[N:])


def _warmup(t: int) -> float:
    return min(1.0, (t + 1) / 3) * 0.5 * (1 + math.cos(math.pi * t / 12))


class Lit(pl.LightningModule):
    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        self.automatic_optimization = not manual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor | None:
        x, y = batch[-2], batch[-1]
        loss = F.cross_entropy(self(x), y)
        if self.automatic_optimization:
            return loss
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad()
        self.manual_backward(loss)
        if MANUAL_CLIP is not None:
            self.clip_gradients(opt, gradient_clip_val=MANUAL_CLIP, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()
        return None

    def configure_optimizers(self) -> dict:
        opt = _optimizer(self)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    if not model.automatic_optimization:  # the manual loop trains with SGD and momentum
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                             lr=0.01)


def _loader(ds: torch.utils.data.Dataset) -> DataLoader:
    return DataLoader(ds, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(3))


def _trainer(cb: DiffinCallback, manual: bool = False, **kw: object) -> pl.Trainer:
    auto = {} if manual else {"gradient_clip_val": CLIP, "accumulate_grad_batches": ACC}
    return pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], **{**auto, **kw})


def _plain_run(path: Path, train: TensorDataset, steps: list[np.ndarray], acc: int, manual: bool = False) -> None:
    """The Trainer's run as a hand-written loop over the same batches: mean loss / acc per
    micro-batch, clip, step, schedule."""
    model = Lit(manual)
    opt = _optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
    X, Y = train.tensors
    clip = MANUAL_CLIP if manual else CLIP
    with diffin.Recorder(path, model, opt, checkpoint_every=2, clip_grad_norm=clip) as rec:
        for ids in steps:
            micro = np.split(ids, acc)
            for m in micro:
                (F.cross_entropy(model(X[m]), Y[m]) / acc).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
            rec.step(micro)
            sched.step()


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _scores(run: Path, train: TensorDataset, val: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    return diffin.influence(run, Lit(), _loss, train=train, target=val, progress=False)


def _tracks_replayed_removal(run: Path, scores: np.ndarray, train: TensorDataset,
                             val: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """Pearson of the scores with replayed removal, and their largest gap relative to the largest effect."""
    real = replay_removal(run, Lit(), _loss, train=train, target=val, remove=list(range(N)), progress=False)
    return float(np.corrcoef(scores, real)[0, 1]), float(np.abs(scores - real).max() / np.abs(real).max())


def test_lightning_run_equals_the_plain_loop_and_tracks_replayed_removal(tmp_path: Path) -> None:
    train, val = _data()
    _trainer(DiffinCallback(tmp_path / "pl", checkpoint_every=2)).fit(Lit(), _loader(diffin.with_ids(train)))
    lit = diffin.load_run(tmp_path / "pl")
    assert lit.n_steps == EPOCHS * N // (BATCH * ACC)
    assert lit.clip_grad_norm == CLIP
    steps = [lit.batch(t) for t in range(lit.n_steps)]
    # the ids read from the sampler are those the batches carry
    _trainer(DiffinCallback(tmp_path / "sampler", checkpoint_every=2)).fit(Lit(), _loader(train))
    from_sampler = diffin.load_run(tmp_path / "sampler")
    for t in range(lit.n_steps):
        np.testing.assert_array_equal(from_sampler.batch(t), steps[t])
    assert sorted(np.concatenate(steps[: len(steps) // EPOCHS]).tolist()) == list(range(N))  # one epoch: each once
    _plain_run(tmp_path / "plain", train, steps, ACC)
    plain = diffin.load_run(tmp_path / "plain")
    np.testing.assert_array_equal(lit.group_lrs, plain.group_lrs)
    for c in lit.checkpoint_steps:
        a, b = lit.load_checkpoint(c), plain.load_checkpoint(c)
        for n in a.params:
            torch.testing.assert_close(a.params[n], b.params[n], rtol=1e-12, atol=1e-14)
    s_lit, s_plain = _scores(tmp_path / "pl", train, val), _scores(tmp_path / "plain", train, val)
    np.testing.assert_allclose(s_lit, s_plain, rtol=1e-9, atol=1e-12 * np.abs(s_plain).max())
    # six clipped AdamW steps, the first ones sign-like: removing 1 of 8 is far from infinitesimal
    # there (the scores are the exact derivative; the manual test below tracks a near-linear run)
    pearson, _ = _tracks_replayed_removal(tmp_path / "pl", s_lit, train, val)
    assert pearson > 0.9


def test_manual_optimization_records_the_same_run(tmp_path: Path) -> None:
    train, val = _data()
    cb = DiffinCallback(tmp_path / "pl", checkpoint_every=2, clip_grad_norm=MANUAL_CLIP)
    _trainer(cb, manual=True).fit(Lit(manual=True), _loader(diffin.with_ids(train)))
    lit = diffin.load_run(tmp_path / "pl")
    _plain_run(tmp_path / "plain", train, [lit.batch(t) for t in range(lit.n_steps)], 1, manual=True)
    s_lit, s_plain = _scores(tmp_path / "pl", train, val), _scores(tmp_path / "plain", train, val)
    assert lit.n_steps == EPOCHS * N // BATCH
    np.testing.assert_allclose(s_lit, s_plain, rtol=1e-9, atol=1e-12 * np.abs(s_plain).max())
    pearson, gap = _tracks_replayed_removal(tmp_path / "pl", s_lit, train, val)  # SGD: close to linear
    assert pearson > 0.99 and gap < 0.1


def test_a_short_accumulation_window_is_refused(tmp_path: Path) -> None:
    train, _ = _data()
    cb = DiffinCallback(tmp_path / "pl", checkpoint_every=2)
    with pytest.raises(RecordingError, match="accumulate_grad_batches"):
        _trainer(cb, accumulate_grad_batches=4).fit(Lit(), _loader(diffin.with_ids(train)))  # 6 batches / 4


def test_value_clipping_is_refused(tmp_path: Path) -> None:
    train, _ = _data()
    cb = DiffinCallback(tmp_path / "pl")
    with pytest.raises(RecordingError, match="gradient_clip_algorithm='norm'"):
        _trainer(cb, gradient_clip_algorithm="value").fit(Lit(), _loader(diffin.with_ids(train)))


def test_lightning_optimizer_is_unwrapped() -> None:
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    assert unwrap_optimizer(pl.core.optimizer.LightningOptimizer(opt)) is opt
    with pytest.raises(UnsupportedOptimizerError):
        unwrap_optimizer(object())


@pytest.mark.parametrize("script", ["lightning_trainer.py", "lightning_manual.py"])
def test_lightning_examples_run(script: str) -> None:
    import subprocess
    import sys

    path = Path(__file__).resolve().parents[1] / "examples" / script
    res = subprocess.run([sys.executable, str(path), "--epochs", "1"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "most harmful" in res.stdout and "flipped label" in res.stdout
