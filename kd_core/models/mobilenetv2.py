"""MobileNetV2 of the CRD/RepDistiller KD benchmark zoo (CIFAR variant, expansion T = 6).

The stem conv has stride 2 and the block strides are adapted to 32x32 inputs (16, 8, 4
and 2 pixels wide stages). The final 1x1 conv to 1280 channels is not a resolution group:
it lives in `neck`, so stages end where the zoo taps its features. Initialisation: the
reference's (convs N(0, 2/(k*k*out)); BN 1/0; Linear N(0, 0.01^2), bias 0) or `init="pytorch"`
(initialization.py).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_core.models.base import Head, StagedModel
from kd_core.models.initialization import Init, initialize
from kd_core.models.registry import MODELS

EXPANSION = 6
# (expansion, output channels, blocks, first stride) per block group
_SETTINGS = [
    (1, 16, 1, 1),
    (EXPANSION, 24, 2, 1),
    (EXPANSION, 32, 3, 2),
    (EXPANSION, 64, 4, 2),
    (EXPANSION, 96, 3, 1),
    (EXPANSION, 160, 3, 2),
    (EXPANSION, 320, 1, 1),
]
# block groups merged into each stage (one stage per resolution)
_STAGE_GROUPS = [(0, 1), (2,), (3, 4), (5, 6)]


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        # the zoo keeps the 1x1 expansion conv even when expansion == 1
        self.conv = nn.Sequential(
            *_conv_bn_relu(cin, hidden, 1),
            *_conv_bn_relu(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


@MODELS.register("mobilenetv2")
def mobilenetv2(
    num_classes: int, in_channels: int = 3, width_mult: float = 1.0, init: Init = "reference"
) -> StagedModel:
    """CIFAR MobileNetV2; `width_mult` scales every width but the final 1280 (unless > 1)."""
    if int(16 * width_mult) < 1:
        raise ValueError(f"width_mult must be at least 1/16, got {width_mult}")
    cin = int(32 * width_mult)
    stem = nn.Sequential(*_conv_bn_relu(in_channels, cin, 3, stride=2))
    groups = []
    for expansion, channels, blocks, stride in _SETTINGS:
        cout = int(channels * width_mult)
        layers = []
        for i in range(blocks):
            layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
            cin = cout
        groups.append(nn.Sequential(*layers))
    stages = [nn.Sequential(*(groups[i] for i in members)) for members in _STAGE_GROUPS]
    stage_channels = [int(_SETTINGS[members[-1]][1] * width_mult) for members in _STAGE_GROUPS]
    last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
    neck = nn.Sequential(*_conv_bn_relu(cin, last_channels, 1))
    model = StagedModel(stem, stages, Head(last_channels, num_classes), stage_channels, neck=neck)
    return initialize(model, init, linear="normal")


@MODELS.register("mobilenetv2_0_5")
def mobilenetv2_0_5(num_classes: int, in_channels: int = 3, init: Init = "reference") -> StagedModel:
    """The zoo's MobileNetV2 student: width 0.5."""
    return mobilenetv2(num_classes, in_channels, width_mult=0.5, init=init)
