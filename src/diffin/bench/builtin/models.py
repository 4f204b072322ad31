"""Built-in models: logistic regression, an MLP (also with BatchNorm), a small CNN, a small residual CNN with
BatchNorm2d and dropout; and the matching losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..._errors import ConfigError

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "softplus": nn.Softplus}


def logistic_regression(n_features: int, n_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer (use weight decay for a strictly
    convex loss)."""
    return nn.Sequential(nn.Linear(n_features, n_classes))


def mlp(
    n_features: int, n_classes: int, hidden: Sequence[int] = (128,), activation: str = "tanh"
) -> nn.Module:
    """Fully connected network ``n_features → hidden… → n_classes``."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    d = n_features
    for h in hidden:
        layers += [nn.Linear(d, h), ACTIVATIONS[activation]()]
        d = h
    layers.append(nn.Linear(d, n_classes))
    return nn.Sequential(*layers)


def small_cnn(n_classes: int = 10, side: int = 28, channels: tuple[int, int] = (8, 16)) -> nn.Module:
    """Two 5×5 conv + ReLU + 2×2 max-pool blocks and a linear head, on flattened square images
    (inputs of shape (B, side·side))."""
    c1, c2 = channels
    s = ((side - 4) // 2 - 4) // 2
    if s < 1:
        raise ConfigError(f"images of side {side} are too small for two 5x5 conv blocks")
    return nn.Sequential(
        nn.Unflatten(1, (1, side, side)),
        nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * s * s, n_classes),
    )


def mlp_bn(n_features: int, n_classes: int, hidden: int = 32, activation: str = "tanh") -> nn.Module:
    """``n_features → hidden → BatchNorm1d → activation → n_classes``: a model that trains on batch
    statistics and predicts with running statistics (docs/method.md §4.8)."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return nn.Sequential(nn.Linear(n_features, hidden), nn.BatchNorm1d(hidden), ACTIVATIONS[activation](),
                         nn.Linear(hidden, n_classes))


class _Residual(nn.Module):
    """x + conv-BN-act-conv-BN(x), then the activation (a basic ResNet block, same width)."""

    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            ACTIVATIONS[activation](),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


def small_resnet(n_classes: int = 10, side: int = 28, channels: int = 8, dropout: float = 0.2,
                 activation: str = "relu") -> nn.Module:
    """A small residual CNN in the spirit of ResNet-18, sized for a CPU: a stride-2 3×3 stem conv +
    BatchNorm2d + activation, one basic residual block (two 3×3 convs with BatchNorm2d and a skip),
    global average pooling, dropout, a linear head; on flattened square images (B, side·side)."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return nn.Sequential(
        nn.Unflatten(1, (1, side, side)),
        nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels), ACTIVATIONS[activation](),
        _Residual(channels, activation),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, n_classes),
    )


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy (B,): the loss_fn diffin expects for classifiers."""
    return F.cross_entropy(outputs, targets, reduction="none")
