"""1-D ResNeXt with the "new connection" for per-beat ECG / PCG signals (MIT-BIH layout: (1, 187), 5 classes).

Each of the three stages sees, besides the previous stage's output, a projection of the raw input: a
conv maps the raw signal to the stage's input channels and the two are concatenated along time before
the stage's (strided) ResNeXt blocks. With stride 2 per stage a stage's output stays about L samples
long ((L + L) / 2); adaptive pooling at the end makes any L work.
"""

from __future__ import annotations

import torch
from torch import nn

from vascdist.models.registry import check_options, register_model, scaled


class Bottleneck1d(nn.Module):
    """ResNeXt block on (N, C, L): 1x1 -> grouped 3-tap conv (carrying the stride) -> 1x1, plus shortcut."""

    def __init__(self, in_ch: int, inner: int, out_ch: int, groups: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_ch, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(inner)
        self.conv2 = nn.Conv1d(inner, inner, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm1d(inner)
        self.conv3 = nn.Conv1d(inner, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm1d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv1d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm1d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class Stage1d(nn.Module):
    """The new connection plus `blocks` ResNeXt blocks, the first with stride 2."""

    def __init__(self, raw_ch: int, in_ch: int, inner: int, out_ch: int, groups: int, blocks: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Conv1d(raw_ch, in_ch, 3, padding=1, bias=False), nn.BatchNorm1d(in_ch))
        self.blocks = nn.Sequential(Bottleneck1d(in_ch, inner, out_ch, groups, stride=2),
                                    *[Bottleneck1d(out_ch, inner, out_ch, groups) for _ in range(blocks - 1)])

    def forward(self, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, self.project(raw)], dim=-1)  # (N, C_in, L_x + L)
        return self.blocks(x)  # (N, C_out, ceil((L_x + L) / 2))


class ResNeXt1d(nn.Module):
    """Stem (7-tap conv) -> 3 stages with the raw-input connection -> adaptive average pool -> linear.

    At width 1 the stem has 64 channels and the stages 128/256/512, each block's grouped conv having 32
    groups of 4/8/16 channels; the blocks keep their width (no 4x expansion) since a beat is short.
    """

    def __init__(self, num_classes: int, in_chans: int = 1, width: float = 1.0, cardinality: int = 32,
                 group_width: int = 4, blocks: tuple[int, ...] = (2, 2, 2), dropout: float = 0.0,
                 zero_init_residual: bool = True) -> None:
        super().__init__()
        stem_ch = scaled(64, width)
        # Cardinality follows the width and each group keeps `group_width` channels (doubling per stage),
        # so every stage's inner width is divisible by its groups at any multiplier.
        groups = scaled(cardinality, width)
        self.stem = nn.Sequential(nn.Conv1d(in_chans, stem_ch, 7, padding=3, bias=False),
                                  nn.BatchNorm1d(stem_ch), nn.ReLU(inplace=True))
        stages, in_ch = [], stem_ch
        for s, n in enumerate(blocks):
            inner = groups * group_width * 2 ** s
            stages.append(Stage1d(in_chans, in_ch, inner, inner, groups, n))
            in_ch = inner
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_ch, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, Bottleneck1d) and zero_init_residual:
                nn.init.zeros_(m.bn3.weight)  # each residual block starts as identity

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        x = self.stem(raw)  # (N, stem_ch, L)
        for stage in self.stages:
            x = stage(x, raw)
        x = torch.flatten(self.pool(x), 1)  # (N, C_last)
        return self.fc(self.drop(x))


@register_model(input_ranks=(2,))
def resnext1d(num_classes: int, input_shape: tuple[int, ...], width: float = 1.0, dropout: float = 0.0,
              zero_init_residual: bool = True) -> ResNeXt1d:
    """1-D ResNeXt (32 groups x 4 channels at width 1) with the raw-input connection; input (C, L)."""
    check_options("resnext1d", width, dropout)
    return ResNeXt1d(num_classes, in_chans=input_shape[0], width=width, dropout=dropout,
                     zero_init_residual=zero_init_residual)
