"""Baselines that take any input: a small CNN (1-D or 2-D to match the data) and an MLP on the flat sample."""

from __future__ import annotations

import math

import torch
from torch import nn

from vascdist.models.registry import check_options, register_model, scaled

# Per-sample rank -> (conv, batch norm, max-pool, adaptive average pool) of that dimensionality.
_LAYERS = {
    2: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d),
    3: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d),
}


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-max-pool blocks (16/32/64 channels x width) -> global average pool -> linear."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        conv, norm, pool, global_pool = _LAYERS[len(input_shape)]
        blocks, prev = [], input_shape[0]
        for ch in (scaled(16, width, 4), scaled(32, width, 4), scaled(64, width, 4)):
            # ceil_mode keeps at least one bin, so inputs of any size (even 1 wide) pass.
            blocks += [conv(prev, ch, 3, padding=1, bias=False), norm(ch), nn.ReLU(inplace=True),
                       pool(2, ceil_mode=True)]
            prev = ch
        self.features = nn.Sequential(*blocks)
        self.pool = global_pool(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)  # (N, 64 * width)
        return self.fc(self.drop(x))


class MLP(nn.Module):
    """Flattened sample -> two hidden layers (256 x width, ReLU, dropout) -> linear."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        hidden = scaled(256, width, 4)
        self.net = nn.Sequential(
            nn.Flatten(),  # (N, prod(input_shape)); copies a channels_last input into the logical order
            nn.Linear(math.prod(input_shape), hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model(input_ranks=(2, 3))
def cnn_small(num_classes: int, input_shape: tuple[int, ...], width: float = 1.0,
              dropout: float = 0.0) -> SmallCNN:
    """Small CNN baseline; 1-D convolutions for (C, L) data, 2-D for (C, F, T)."""
    check_options("cnn_small", width, dropout)
    return SmallCNN(num_classes, input_shape, width=width, dropout=dropout)


@register_model(input_ranks=(1, 2, 3, 4))
def mlp(num_classes: int, input_shape: tuple[int, ...], width: float = 1.0, dropout: float = 0.0) -> MLP:
    """MLP baseline on the flattened sample."""
    check_options("mlp", width, dropout)
    return MLP(num_classes, input_shape, width=width, dropout=dropout)
