"""2-D ResNets on log-mel spectrograms, built from torchvision's ResNet, BasicBlock and Bottleneck.

What differs from torchvision: any number of input channels (1 for spectrograms), a choice of stem
('imagenet': 7x7/2 conv + 3x3/2 max-pool; 'small': 3x3/1 conv, no pool, which keeps the resolution of a
40 x 100 input), a width multiplier on every stage's channel count, and dropout before the classifier.
Weights are randomly initialised (nothing is downloaded).
"""

from __future__ import annotations

import torch
from torch import nn

from vascdist.compat import import_torchvision_resnet
from vascdist.errors import ConfigError
from vascdist.model_names import NORMS, STEMS
from vascdist.models.registry import check_options, register_model, scaled

_tv = import_torchvision_resnet()
BasicBlock, Bottleneck, ResNet = _tv.BasicBlock, _tv.Bottleneck, _tv.ResNet



def norm_layer(norm: str):
    """BatchNorm2d, or GroupNorm (groups of up to 32 channels' worth; no batch statistics, so results do not
    depend on how the batch is split over ranks: SyncBatchNorm's alternative where SyncBatchNorm cannot run,
    e.g. on CPU/gloo)."""
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda channels: nn.GroupNorm(max(1, min(32, channels // 4)), channels)
    raise ConfigError(f"model.norm must be one of {', '.join(NORMS)}, got '{norm}'")


def _stem(stem: str, in_chans: int, planes: int) -> tuple[nn.Conv2d, nn.Module]:
    """The stem's convolution and its pooling (Identity for 'small')."""
    if stem == "imagenet":
        return nn.Conv2d(in_chans, planes, kernel_size=7, stride=2, padding=3, bias=False), \
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    if stem == "small":
        return nn.Conv2d(in_chans, planes, kernel_size=3, stride=1, padding=1, bias=False), nn.Identity()
    raise ConfigError(f"model.stem must be one of {', '.join(STEMS)}, got '{stem}'")


class ScaledResNet(ResNet):
    """torchvision's ResNet with `in_chans` inputs, a chosen stem, stage planes (p, 2p, 4p, 8p) and dropout.

    ResNet.__init__ hard-codes 3 input channels and 64..512 planes, so this sets the attributes that
    `ResNet._make_layer` reads and reuses it (and torchvision's blocks) to build the stages.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int, *,
                 in_chans: int = 1, stem: str = "small", base_planes: int = 64, groups: int = 1,
                 width_per_group: float = 64, dropout: float = 0.0, zero_init_residual: bool = True,
                 norm: str = "batch") -> None:
        nn.Module.__init__(self)
        self._norm_layer = norm_layer(norm)
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group
        self.inplanes = base_planes
        self.conv1, self.maxpool = _stem(stem, in_chans, base_planes)
        self.bn1 = self._norm_layer(base_planes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, base_planes, layers[0])
        self.layer2 = self._make_layer(block, base_planes * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base_planes * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base_planes * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(base_planes * 8 * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's initialisation; zero_init_residual makes every residual block start as identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, F, T) -> (N, p, F', T'): F' = F, T' = T for 'small'; about F/4, T/4 for 'imagenet'."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)  # (N, 8p * expansion)
        return self.fc(self.drop(x))


def _resnext_group_width(base_planes: int, group_width: int) -> float:
    """The `width_per_group` that makes torchvision's Bottleneck give `group_width` channels per group.

    Bottleneck's inner width is ``int(planes * width_per_group / 64) * groups``; stage s has
    planes = base_planes * 2**s, so width_per_group = 64 * group_width / base_planes gives
    group_width * 2**s per group. The factor 1 + 1e-9 keeps int() from flooring 3.9999... to 3.
    """
    return 64.0 * group_width / base_planes * (1 + 1e-9)


def _resnet(block, layers, num_classes, input_shape, *, stem, width, dropout, zero_init_residual, norm,
            name, cardinality: int = 0, group_width: int = 0) -> ScaledResNet:
    check_options(name, width, dropout)
    base_planes = scaled(64, width)
    groups, width_per_group = 1, 64.0
    if cardinality:
        # ResNeXt: cardinality scales with the width and each group keeps its width, so the inner width
        # (groups * group_width) follows the multiplier and is always divisible by the groups.
        groups = scaled(cardinality, width)
        width_per_group = _resnext_group_width(base_planes, group_width)
    return ScaledResNet(block, layers, num_classes, in_chans=input_shape[0], stem=stem, base_planes=base_planes,
                        groups=groups, width_per_group=width_per_group, dropout=dropout,
                        zero_init_residual=zero_init_residual, norm=norm)


@register_model
def resnet18(num_classes: int, input_shape: tuple[int, ...], stem: str = "small", width: float = 1.0,
             dropout: float = 0.0, zero_init_residual: bool = True, norm: str = "batch") -> ScaledResNet:
    """ResNet-18: BasicBlock x [2, 2, 2, 2]; planes 64/128/256/512 times `width`."""
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, input_shape, stem=stem, width=width, dropout=dropout,
                   zero_init_residual=zero_init_residual, norm=norm, name="resnet18")


@register_model
def resnet34(num_classes: int, input_shape: tuple[int, ...], stem: str = "small", width: float = 1.0,
             dropout: float = 0.0, zero_init_residual: bool = True, norm: str = "batch") -> ScaledResNet:
    """ResNet-34: BasicBlock x [3, 4, 6, 3]; planes 64/128/256/512 times `width`."""
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes, input_shape, stem=stem, width=width, dropout=dropout,
                   zero_init_residual=zero_init_residual, norm=norm, name="resnet34")


@register_model
def resnet50(num_classes: int, input_shape: tuple[int, ...], stem: str = "small", width: float = 1.0,
             dropout: float = 0.0, zero_init_residual: bool = True, norm: str = "batch") -> ScaledResNet:
    """ResNet-50: Bottleneck x [3, 4, 6, 3]; planes 64/128/256/512 (outputs x4) times `width`."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, input_shape, stem=stem, width=width, dropout=dropout,
                   zero_init_residual=zero_init_residual, norm=norm, name="resnet50")


@register_model
def resnext50_32x4d(num_classes: int, input_shape: tuple[int, ...], stem: str = "small", width: float = 1.0,
                    dropout: float = 0.0, zero_init_residual: bool = True, norm: str = "batch") -> ScaledResNet:
    """ResNeXt-50 32x4d: Bottleneck x [3, 4, 6, 3], 32 groups of 4 channels in stage 1 (both times `width`
    for the groups: width 0.25 gives 8 groups of 4)."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, input_shape, stem=stem, width=width, dropout=dropout,
                   zero_init_residual=zero_init_residual, norm=norm, name="resnext50_32x4d", cardinality=32, group_width=4)
