"""CRNN: a small conv front end over (F, T), a bidirectional GRU over time frames, attention pooling."""

from __future__ import annotations

import torch
from torch import nn

from vascdist.models.registry import check_options, register_model, scaled


def _conv_block(in_ch: int, out_ch: int, pool: tuple[int, int]) -> nn.Sequential:
    # ceil_mode keeps at least one bin, so even a very short or narrow input survives the pooling.
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True), nn.MaxPool2d(pool, ceil_mode=True))


def _pooled(size: int, factor: int) -> int:
    return -(-size // factor)  # ceil division, as MaxPool2d(ceil_mode=True) with stride == kernel


class AttentionPool(nn.Module):
    """Learned score per time step -> softmax over time -> weighted sum: (N, T, D) -> (N, D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.score(h), dim=1)  # (N, T, 1)
        return (weights * h).sum(dim=1)


class CRNN(nn.Module):
    """(N, C, F, T) -> conv blocks (F / 8, T / 4) -> frames (N, T', C' F') -> BiGRU -> attention -> logits."""

    POOLS = ((2, 2), (2, 2), (2, 1))  # (F, T) pooling of each conv block; time keeps a quarter of its frames

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        in_ch, n_freq, _ = input_shape
        chans = [scaled(32, width, 4), scaled(64, width, 4), scaled(64, width, 4)]
        blocks, prev = [], in_ch
        for ch, pool in zip(chans, self.POOLS):
            blocks.append(_conv_block(prev, ch, pool))
            prev, n_freq = ch, _pooled(n_freq, pool[0])
        self.features = nn.Sequential(*blocks)
        hidden = scaled(64, width, 4)
        self.gru = nn.GRU(chans[-1] * n_freq, hidden, batch_first=True, bidirectional=True)
        self.attend = AttentionPool(2 * hidden, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, C', F', T')
        x = x.flatten(1, 2).transpose(1, 2)  # (N, T', C' F'); flatten copies if x is channels_last
        h, _ = self.gru(x)  # (N, T', 2H)
        return self.fc(self.drop(self.attend(h)))


@register_model
def crnn(num_classes: int, input_shape: tuple[int, ...], width: float = 1.0, dropout: float = 0.0) -> CRNN:
    """Conv front end (32/64/64 channels x `width`) + BiGRU (64 x `width` per direction) + attention pool."""
    check_options("crnn", width, dropout)
    return CRNN(num_classes, input_shape, width=width, dropout=dropout)
