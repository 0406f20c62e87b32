"""CIFAR ResNets of the CRD/RepDistiller KD benchmark zoo, for 32x32 inputs.

resnet8..resnet110 and the x4 variants: a 3x3 conv stem and three groups of basic blocks
(depth = 6n + 2); resnet50: bottleneck blocks [3, 4, 6, 3] behind a 3x3 stride-1 stem and
no max-pool. Stages are the block groups. Initialisation: the reference's (convs Kaiming
normal, fan-out; BN 1/0; Linear PyTorch's default) or `init="pytorch"` (initialization.py).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_core.models.base import Head, StagedModel
from kd_core.models.initialization import Init, initialize
from kd_core.models.registry import MODELS


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _stem(in_channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
    )


def cifar_resnet(
    depth: int, widths: tuple[int, ...], num_classes: int, in_channels: int = 3, init: Init = "reference"
) -> StagedModel:
    """Basic-block CIFAR ResNet: `widths` = (stem, stage 1, stage 2, stage 3) channels."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"a CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    blocks_per_stage = (depth - 2) // 6
    stages = []
    cin = widths[0]
    for index, cout in enumerate(widths[1:]):
        stride = 1 if index == 0 else 2
        blocks = []
        for i in range(blocks_per_stage):
            blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
            cin = cout
        stages.append(nn.Sequential(*blocks))
    model = StagedModel(_stem(in_channels, widths[0]), stages, Head(widths[-1], num_classes), list(widths[1:]))
    return initialize(model, init)


# name -> (depth, (stem, stage widths)), as in the zoo
_CIFAR_RESNETS: dict[str, tuple[int, tuple[int, ...]]] = {
    **{f"resnet{d}": (d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}


def _register_cifar_resnet(name: str, depth: int, widths: tuple[int, ...]) -> None:
    # a real function (not a partial) per name, so the spec validator can read its type hints
    def factory(num_classes: int, in_channels: int = 3, init: Init = "reference") -> StagedModel:
        return cifar_resnet(depth, widths, num_classes, in_channels, init)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"CIFAR ResNet-{depth}, stem {widths[0]} and stage widths {widths[1:]}."
    MODELS.register(name)(factory)


for _name, (_depth, _widths) in _CIFAR_RESNETS.items():
    _register_cifar_resnet(_name, _depth, _widths)


@MODELS.register("resnet50")
def resnet50(num_classes: int, in_channels: int = 3, init: Init = "reference") -> StagedModel:
    """Bottleneck ResNet-50 for CIFAR: 3x3 stride-1 stem, no max-pool, 4 stages."""
    stages = []
    cin = 64
    for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
        stride = 1 if index == 0 else 2
        layers = []
        for i in range(blocks):
            layers.append(Bottleneck(cin, planes, stride if i == 0 else 1))
            cin = planes * Bottleneck.expansion
        stages.append(nn.Sequential(*layers))
    channels = [p * Bottleneck.expansion for p in (64, 128, 256, 512)]
    return initialize(StagedModel(_stem(in_channels, 64), stages, Head(channels[-1], num_classes), channels), init)
