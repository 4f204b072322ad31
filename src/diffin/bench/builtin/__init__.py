"""Built-in data, models, trainer and named setups for the demo, benchmarks and tests."""

from .data import DataSplit, flip_labels, load_digits, load_mnist5k, load_npz, make_synthetic
from .models import cross_entropy, logistic_regression, mlp, small_cnn
from .setups import SETUPS, Setup, get_setup
from .trainer import TrainConfig, TrainResult, evaluate, train

__all__ = [
    "SETUPS", "DataSplit", "Setup", "TrainConfig", "TrainResult", "cross_entropy", "evaluate",
    "flip_labels", "get_setup", "load_digits", "load_mnist5k", "load_npz", "logistic_regression",
    "make_synthetic", "mlp", "small_cnn", "train",
]
