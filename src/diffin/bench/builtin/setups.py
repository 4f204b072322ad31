"""Named setups: data, model, training recipe and loss, for the demo, benchmarks and tasks."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import _constants as C
from ..._errors import ConfigError, CorruptManifestError
from ..._io import write_json
from . import synthetic_pairs as _pairs
from .captions import CLIP_LOSS, TwoTower, clip_scores, evaluate_captions, load_mnist_captions, mismatch_captions
from .data import (
    DataSplit,
    confusion_flip_labels,
    flip_labels,
    load_digits,
    load_mnist5k,
    make_synthetic,
    pair_flip_labels,
)
from .models import cross_entropy, logistic_regression, mlp, mlp_bn, small_cnn, small_resnet
from .spurious import load_mnist5k_spurious
from .synthetic_scale import default_folder, load_split
from .trainer import TrainConfig, evaluate


@dataclass
class Setup:
    """A reproducible experiment: ``data()`` → split, ``model()`` → fresh seeded module."""

    name: str
    description: str
    load: Callable[[torch.dtype], DataSplit]
    build: Callable[[DataSplit], nn.Module]
    train: TrainConfig
    dtype: torch.dtype = torch.float64
    noise: float = 0.0
    n_ground_truth: int = 100
    extra: dict[str, Any] = field(default_factory=dict)
    noise_seed: int | None = None
    """Seed of the flipped labels; ``None``: the training seed (runs of other seeds on the same
    noisy data, ``diffin train --seeds K``, keep the first run's seed here)."""
    loss_fn: Any = cross_entropy
    """The training loss: a per-sample ``loss(outputs, targets) -> (B,)`` or a :func:`diffin.batch_loss`."""
    corrupt: Callable[[DataSplit, float, int], DataSplit] = flip_labels
    """How ``noise`` corrupts the training data, in place, recording the corrupted ids in ``flipped``:
    ``corrupt(split, noise, seed)`` (default: flip labels)."""
    noise_kind: str = "training labels flipped"
    """What a corrupted sample is, for descriptions (e.g. "10% of training labels flipped")."""
    evaluate: Callable[..., dict[str, float]] = evaluate
    """``evaluate(model, x, y, loss_fn=, params=) -> {"loss", "accuracy"}``: the quality measure of
    retrained models (default :func:`diffin.bench.builtin.trainer.evaluate`, test accuracy)."""
    pair_scores: Callable[..., Any] | None = None
    """For image–text setups: ``pair_scores(model, inputs, params=None) -> (N,)`` the CLIP score
    (cosine of each pair; the usual data filter); ``None`` for other setups."""

    def data(self) -> DataSplit:
        split = self.load(self.dtype)
        if self.noise:
            self.corrupt(split, self.noise, self.train.seed if self.noise_seed is None else self.noise_seed)
        return split

    def model(self, split: DataSplit) -> nn.Module:
        torch.manual_seed(self.train.seed)
        return self.build(split).to(self.dtype)

    def with_changes(self, **kw: Any) -> Setup:
        return replace(self, **kw)


def _mnist(n_train: int, n_val: int, n_test: int) -> Callable[[torch.dtype], DataSplit]:
    return lambda dt: load_mnist5k(n_train, n_val, n_test, seed=0, dtype=dt)


def _mlp(hidden: int, act: str = "tanh") -> Callable[[DataSplit], nn.Module]:
    return lambda s: mlp(s.input_shape[0], s.n_classes, (hidden,), act)


SETUPS: dict[str, Setup] = {}


def _register(s: Setup) -> None:
    SETUPS[s.name] = s


_register(Setup(
    "demo", "MNIST-5k, 4,000 train / 500 val / 500 test, 10% labels flipped, MLP 784-64-10 tanh, "
    "float32, SGD lr 0.1, batch 64, 5 epochs",
    _mnist(4000, 500, 500), _mlp(64),
    TrainConfig(epochs=5, batch_size=64, lr=0.1, checkpoint_every=63, seed=0),
    dtype=torch.float32, noise=0.1,
))
_register(Setup(
    "mnist5k", "MNIST-5k for the data-centric tasks: 4,000 train / 500 val / 500 test, MLP "
    "784-64-10 tanh, float32, SGD lr 0.1, batch 64, 5 epochs (noise set per task)",
    _mnist(4000, 500, 500), _mlp(64),
    TrainConfig(epochs=5, batch_size=64, lr=0.1, checkpoint_every=63, seed=0),
    dtype=torch.float32,
))
# memorises its flipped labels: 100 epochs drive the training loss of the flipped samples near zero
# (measured in BENCHMARKS.md ("Tasks against their baselines")), so the loss at θ_T stops telling them apart
_register(Setup(
    "mnist5k-memorise", "MNIST-5k for cleaning where the model memorises its labels: 500 train / 500 val / "
    "500 test, 10% labels flipped (--noise to change), MLP 784-512-10 tanh, float32, SGD lr 0.3, batch 32, "
    "100 epochs (training loss near zero)",
    _mnist(500, 500, 500), _mlp(512),
    TrainConfig(epochs=100, batch_size=32, lr=0.3, checkpoint_every=80, seed=0),
    dtype=torch.float32, noise=0.1,
))
# the noise where cheap signals fail (issue 23), on mnist5k-memorise's data and memorising recipe; the noisy labels
# are fixed by the noise seed 0 (runs of other training seeds keep them)
_register(SETUPS["mnist5k-memorise"].with_changes(
    name="mnist5k-asym",
    description="MNIST-5k, class-conditional pair-flip noise where the model memorises: 500 train / 500 val / 500 "
    "test, 30% of every class's labels c set to c+1 (--noise to change), MLP 784-512-10 tanh, float32, SGD lr 0.3, "
    "batch 32, 100 epochs",
    noise=0.3, noise_seed=0, corrupt=pair_flip_labels, noise_kind="training labels pair-flipped (c → c+1)",
))
_register(SETUPS["mnist5k-memorise"].with_changes(
    name="mnist5k-human",
    description="MNIST-5k, instance-dependent noise where the model memorises: 500 train / 500 val / 500 test, 20% "
    "of the labels (--noise to change) set to the class a separately trained softmax regression confuses the "
    "digit with most, ambiguous digits likelier; MLP 784-512-10 tanh, float32, SGD lr 0.3, batch 32, 100 epochs",
    noise=0.2, noise_seed=0, corrupt=confusion_flip_labels,
    noise_kind="training labels set to their most confused class",
))
# a visual shortcut (docs/guides/debias_prune.md): label = digit >= 5, a corner patch that agrees with the label on
# 95% of the training samples and 50% of validation/test. One faint pixel: the ERM model leans on it (test worst-group
# accuracy 0.38); a 2×2 patch of 0.3 (-strong): it leans harder (0.25), and JTT's error set is the minority groups
# (measured in BENCHMARKS.md, "Debiasing by removal")
_SPURIOUS = ("MNIST-5k with a shortcut for debiasing: label digit >= 5, {patch} in the top-left corner that agrees "
             "with the label on 95% of the 4,000 training samples and 50% of the 500 val / 500 test (groups: label × "
             "patch), MLP 784-64-2 tanh, float32, SGD lr 0.1, batch 64, 5 epochs, a checkpoint per epoch")
_register(Setup(
    "mnist5k-spurious", _SPURIOUS.format(patch="one pixel of 0.5"),
    lambda dt: load_mnist5k_spurious(4000, 500, 500, patch=1, value=0.5, dtype=dt), _mlp(64),
    TrainConfig(epochs=5, batch_size=64, lr=0.1, checkpoint_every=63, seed=0),
    dtype=torch.float32,
))
_register(SETUPS["mnist5k-spurious"].with_changes(
    name="mnist5k-spurious-strong", description=_SPURIOUS.format(patch="a 2×2 patch of 0.3"),
    load=lambda dt: load_mnist5k_spurious(4000, 500, 500, patch=2, value=0.3, dtype=dt),
))
_register(Setup(
    "speed", "MNIST-5k 4,500 train / 500 val, MLP 784-128-10 tanh, float32, batch 128, 5 epochs, "
    "5 checkpoints (Diff-In speed benchmark)",
    _mnist(4500, 500, 0), _mlp(128),
    TrainConfig(epochs=5, batch_size=128, lr=0.1, checkpoint_every=36, seed=0),
    dtype=torch.float32,
))
_register(Setup(
    "mnist5k-mlp", "1,000 MNIST-5k train (10% flipped) / 500 val, MLP 784-32-10 tanh, float64, "
    "SGD lr 0.1, batch 32, 5 epochs, checkpoint every 31 steps",
    _mnist(1000, 500, 0), _mlp(32),
    TrainConfig(epochs=5, batch_size=32, lr=0.1, checkpoint_every=31, seed=0),
    noise=0.1, n_ground_truth=100,
))
# clean labels: no flipped sample dominates the removal effects, so predicting a fresh retraining is harder
# (the retrain bench's second setup, issue 23)
_register(SETUPS["mnist5k-mlp"].with_changes(
    name="mnist5k-mlp-clean",
    description="1,000 MNIST-5k train (clean labels) / 500 val, MLP 784-32-10 tanh, float32, SGD lr 0.1, "
                "batch 32, 5 epochs, checkpoint every 31 steps",
    dtype=torch.float32, noise=0.0,
))
_register(SETUPS["mnist5k-mlp"].with_changes(
    name="mnist5k-mlp-relu",
    description="as mnist5k-mlp with a ReLU MLP 784-64-10 (kinks: exact HVPs)",
    build=_mlp(64, "relu"),
))
_register(SETUPS["mnist5k-mlp"].with_changes(
    name="mnist5k-mlp-short",
    description="as mnist5k-mlp with lr 0.02 and 1 epoch",
    train=replace(SETUPS["mnist5k-mlp"].train, lr=0.02, epochs=1),
))
_register(SETUPS["mnist5k-mlp"].with_changes(
    name="mnist5k-mlp-momentum",
    description="as mnist5k-mlp with momentum 0.9 and lr 0.02",
    train=replace(SETUPS["mnist5k-mlp"].train, lr=0.02, momentum=0.9),
))
_register(SETUPS["mnist5k-mlp"].with_changes(
    name="mnist5k-mlp-adamw",
    description="1,000 MNIST-5k train (10% flipped) / 500 val, MLP 784-32-10 tanh, float64, AdamW lr 1e-3 "
                "(β 0.9, 0.999, ε 1e-8), weight decay 0.01 on every parameter, cosine schedule, batch 32, 5 epochs, "
                "checkpoint every 31 steps",
    train=replace(SETUPS["mnist5k-mlp"].train, optimizer="adamw", lr=1e-3, weight_decay=0.01, schedule="cosine"),
))
# 0.9 clips 102 of the 160 steps (64%; 1.0 would clip 37%, 1.5 only 3%): measured with the seed below
_register(SETUPS["mnist5k-mlp"].with_changes(
    name="mnist5k-mlp-clip",
    description="as mnist5k-mlp (SGD lr 0.1) with clip_grad_norm_ at 0.9 before each step (clips 64% of "
                "the 160 steps)",
    train=replace(SETUPS["mnist5k-mlp"].train, clip_grad_norm=0.9),
))
# the Hugging Face Trainer's defaults: decay on weights only, max_grad_norm 1.0 (clips 20 of 160 steps here)
_register(SETUPS["mnist5k-mlp"].with_changes(
    name="mnist5k-mlp-adamw-groups",
    description="the usual user recipe on mnist5k-mlp's data and model: AdamW lr 1e-3, two param groups "
                "(weight decay 0.01 on the weight matrices, none on the biases), cosine LambdaLR, "
                "clip_grad_norm_ at 1.0 (clips 12% of the 160 steps), batch 32, 5 epochs",
    train=replace(SETUPS["mnist5k-mlp"].train, optimizer="adamw", lr=1e-3, weight_decay=0.01, schedule="cosine",
                  weight_decay_on="weights", clip_grad_norm=1.0),
))
_register(Setup(
    "digits-logreg", "scikit-learn digits 1,197 train / 300 val, logistic regression, weight "
    "decay 1e-3, float64, SGD lr 0.5, batch 32, 20 epochs",
    lambda dt: load_digits(1197, 300, 300, seed=0, dtype=dt),
    lambda s: logistic_regression(s.input_shape[0], s.n_classes),
    TrainConfig(epochs=20, batch_size=32, lr=0.5, weight_decay=1e-3, checkpoint_every=38, seed=0),
    n_ground_truth=100,
))
_register(Setup(
    "mnist5k-cnn", "1,000 MNIST-5k train (10% flipped) / 500 val, small ReLU CNN, float64, SGD "
    "lr 0.05, batch 32, 3 epochs",
    _mnist(1000, 500, 0), lambda s: small_cnn(s.n_classes, 28, (4, 8)),
    TrainConfig(epochs=3, batch_size=32, lr=0.05, checkpoint_every=32, seed=0),
    noise=0.1, n_ground_truth=50,
))
# models that train differently than they predict (docs/method.md §4.8): BatchNorm (batch statistics in
# training, running statistics at the target) and dropout (masks replayed from the recorded RNG states)
_register(Setup(
    "mnist5k-mlp-bn", "MNIST-5k, 4,000 train / 500 val, MLP 784-32 → BatchNorm1d → tanh → 10, float64, SGD lr 0.1, "
    "batch 30, 3 epochs, a checkpoint per epoch",
    _mnist(4000, 500, 0), lambda s: mlp_bn(s.input_shape[0], s.n_classes, 32),
    TrainConfig(epochs=3, batch_size=30, lr=0.1, checkpoint_every=134, seed=0),
    n_ground_truth=100,
))
_register(Setup(
    "mnist5k-resnet", "1,000 MNIST-5k train (10% flipped) / 500 val, small residual CNN (stride-2 stem, one "
    "basic block, BatchNorm2d, 8 channels, ReLU, global pooling, dropout 0.2), float64, SGD lr 0.05, batch 32, "
    "3 epochs, checkpoint every 32 steps",
    _mnist(1000, 500, 0), lambda s: small_resnet(s.n_classes, 28, 8, 0.2),
    TrainConfig(epochs=3, batch_size=32, lr=0.05, checkpoint_every=32, seed=0),
    noise=0.1, n_ground_truth=50,
))
# the size at which a user runs `diffin clean` on their own CNN (issue 23, item 7): its default baselines must finish in
# minutes here (measured in BENCHMARKS.md, "diffin clean's default baselines on a 4,000-sample CNN")
_register(Setup(
    "mnist5k-cnn-4k", "MNIST-5k, 4,000 train / 500 val / 500 test, 10% labels flipped, small ReLU CNN (two 5×5 conv + "
    "max-pool blocks, 8 and 16 channels, linear head), float32, SGD lr 0.05, momentum 0.9, batch 64, 3 epochs, a "
    "checkpoint per epoch (validation accuracy 0.93)",
    _mnist(4000, 500, 500), lambda s: small_cnn(s.n_classes, 28, (8, 16)),
    TrainConfig(epochs=3, batch_size=64, lr=0.05, momentum=0.9, checkpoint_every=63, seed=0),
    dtype=torch.float32, noise=0.1,
))
_register(Setup(
    "synthetic", "Gaussian mixture, 1,000 train / 300 val / 300 test, 20 features, 4 classes, "
    "MLP 20-32-4 tanh, float64, SGD lr 0.1, batch 32, 5 epochs",
    lambda dt: make_synthetic(1000, 300, 300, 20, 4, seed=0, dtype=dt), _mlp(32),
    TrainConfig(epochs=5, batch_size=32, lr=0.1, checkpoint_every=32, seed=0),
))
_register(Setup(
    "tiny", "synthetic 120 train / 60 val / 60 test, 6 features, 3 classes, MLP 6-8-3 tanh, "
    "float64, SGD lr 0.1, batch 16, 3 epochs (tests and smoke runs)",
    lambda dt: make_synthetic(120, 60, 60, 6, 3, seed=0, dtype=dt), _mlp(8),
    TrainConfig(epochs=3, batch_size=16, lr=0.1, checkpoint_every=8, seed=0),
    noise=0.1, n_ground_truth=20,
))

# data on disk: generated once into $DIFFIN_SCALE_DATA (default ~/.cache/diffin/scale-1m), read memory-mapped;
# the benchmark (diffin bench --setup scale-1m) writes its own copy under its work folder
_register(Setup(
    "scale-1m", "synthetic scale set on disk (memory-mapped): 1,000,000 train / 2,000 val, 64 features, 10 "
    "Gaussian classes, 5% labels flipped, MLP 64-256-256-10 tanh, float32, SGD lr 0.1, batch 256, 1 epoch, "
    "checkpoint every 500 steps",
    lambda dt: load_split(default_folder(), dt),
    lambda s: mlp(s.input_shape[0], s.n_classes, (256, 256), "tanh"),
    TrainConfig(epochs=1, batch_size=256, lr=0.1, checkpoint_every=500, seed=0),
    dtype=torch.float32, n_ground_truth=20,
))

# image–text pairs with a contrastive loss (docs/method.md §4.7): 192 SGD steps, float64, under a second of
# training. Measured (diffin bench, 100 replayed single-pair removals): diffin Pearson 0.92, the float64
# metagradient through the unrolled run the same 0.92 (the linearisation's ceiling); batch 64 at lr 0.1 gave 0.87,
# batch 64 at lr 0.05 0.87 on 60 removals. With this short recipe the mismatched pairs barely hurt: replaying the
# run without all 100 lowers the zero-shot test accuracy (0.813 -> 0.786) and leaves the test loss as it was
_register(Setup(
    "mnist-captions", "MNIST-5k images with template captions: 1,000 train pairs (10% mismatched: the caption of "
    "another digit) / 500 val pairs / 2,000 test images (zero-shot accuracy from class prompts); two towers (linear "
    "image tower, bag-of-tokens text tower, 32-d, learned temperature), symmetric InfoNCE, float64, SGD lr 0.02, "
    "batch 32, 6 epochs",
    lambda dt: load_mnist_captions(1000, 500, 2000, seed=0, dtype=dt), lambda s: TwoTower(32),
    TrainConfig(epochs=6, batch_size=32, lr=0.02, checkpoint_every=32, seed=0),
    noise=0.1, n_ground_truth=100, loss_fn=CLIP_LOSS, corrupt=mismatch_captions,
    noise_kind="training pairs mismatched", evaluate=evaluate_captions, pair_scores=clip_scores,
))
# scale-1m-pairs: a million synthetic image–text-like pairs on disk (diffin.bench.pairs). The mismatched pairs are
# part of the generated data, so the setup adds no noise of its own (noise=0); CLIP score is the pair score
_register(Setup(
    "scale-1m-pairs", "synthetic image–text-like pairs on disk (memory-mapped): 1,000,000 train / 2,000 val "
    f"pairs, two 64-d views of a latent point of {_pairs.N_CLASSES} classes, 10% of training pairs mismatched; "
    f"two-tower MLP 64-256-64 tanh per view, learned temperature, symmetric InfoNCE, float32, SGD lr {_pairs.LR}, "
    "batch 256, 1 epoch, checkpoint every 500 steps",
    lambda dt: _pairs.load_split(_pairs.default_folder(), dt), lambda s: _pairs.PairTowers(), _pairs.PAIRS_TRAIN,
    dtype=torch.float32, n_ground_truth=20, loss_fn=CLIP_LOSS, noise_kind="training pairs mismatched",
    pair_scores=clip_scores,
))


def get_setup(name: str) -> Setup:
    try:
        return SETUPS[name]
    except KeyError:
        raise ConfigError(f"unknown setup {name!r}; available: {', '.join(sorted(SETUPS))}") from None


def setup_meta(setup: Setup) -> dict[str, Any]:
    """What identifies a built-in setup's recorded run: name, label noise and training recipe."""
    meta = {"setup": setup.name, "noise": setup.noise, "train": setup.train.to_json()}
    if setup.noise_seed is not None:
        meta["noise_seed"] = setup.noise_seed
    return meta


def write_setup_meta(run_dir: str | Path, setup: Setup) -> None:
    """Write ``diffin_setup.json`` beside a run recorded from a built-in setup (atomically)."""
    write_json(Path(run_dir) / C.SETUP_JSON, setup_meta(setup))


def read_setup_meta(run_dir: str | Path) -> Setup | None:
    """The built-in setup a run folder was recorded from, or ``None`` for a user's own run."""
    path = Path(run_dir) / C.SETUP_JSON
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        ns = meta.get("noise_seed")
        return get_setup(meta["setup"]).with_changes(noise=float(meta["noise"]), train=TrainConfig(**meta["train"]),
                                                     noise_seed=None if ns is None else int(ns))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CorruptManifestError(f"{path} is damaged ({e}); record the run again") from e
