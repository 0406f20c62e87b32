"""Pre-activation wide ResNets (WRN-depth-k) of the CRD/RepDistiller KD benchmark zoo.

Each block computes BN-ReLU-conv twice, so the last stage's output is a raw sum; the final
BN + ReLU the classifier reads lives in `neck`. Depth = 6n + 4, widths 16k, 32k, 64k.
Initialisation: the reference's (convs N(0, 2/(k*k*out)); BN 1/0; Linear bias 0) or
`init="pytorch"` (initialization.py).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_core.models.base import Head, StagedModel
from kd_core.models.initialization import Init, initialize
from kd_core.models.registry import MODELS


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        # a plain 1x1 conv (no BN) on the activated input when the shape changes, as in the zoo
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = torch.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(activated))


def wide_resnet(
    depth: int, widen: int, num_classes: int, in_channels: int = 3, init: Init = "reference"
) -> StagedModel:
    if (depth - 4) % 6 != 0 or depth < 10:
        raise ValueError(f"a WRN depth must be 6n + 4 with n >= 1, got {depth}")
    if widen < 1:
        raise ValueError(f"the widen factor must be at least 1, got {widen}")
    blocks_per_stage = (depth - 4) // 6
    channels = [16 * widen, 32 * widen, 64 * widen]
    stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
    stages = []
    cin = 16
    for index, cout in enumerate(channels):
        stride = 1 if index == 0 else 2
        blocks = []
        for i in range(blocks_per_stage):
            blocks.append(PreActBlock(cin, cout, stride if i == 0 else 1))
            cin = cout
        stages.append(nn.Sequential(*blocks))
    neck = nn.Sequential(nn.BatchNorm2d(channels[-1]), nn.ReLU(inplace=True))
    model = StagedModel(stem, stages, Head(channels[-1], num_classes), channels, neck=neck)
    return initialize(model, init, linear="zero_bias")


def _register_wrn(depth: int, widen: int) -> None:
    # a real function (not a partial) per name, so the spec validator can read its type hints
    def factory(num_classes: int, in_channels: int = 3, init: Init = "reference") -> StagedModel:
        return wide_resnet(depth, widen, num_classes, in_channels, init)

    name = f"wrn_{depth}_{widen}"
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"Pre-activation wide ResNet WRN-{depth}-{widen}."
    MODELS.register(name)(factory)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register_wrn(_depth, _widen)
