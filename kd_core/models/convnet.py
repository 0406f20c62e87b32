"""A small residual CNN family for small images (the embedded 8x8 digits).

Width and depth are free, so teacher, assistants and student come from one family:
three stages with `width`, `2*width`, `4*width` channels; stages 2 and 3 halve the
resolution; each stage holds `depth` residual blocks. `convnet_gn` swaps BatchNorm for
GroupNorm, which normalises each image alone: training on several workers
(`sweep.workers_per_trial`) then equals one process's up to rounding (SyncBatchNorm needs CUDA).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from kd_core.models.base import Head, StagedModel
from kd_core.models.registry import MODELS

Norm = Literal["batch", "group"]


def _norm(channels: int, norm: Norm) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(math.gcd(channels, 8), channels)


def _conv_bn(cin: int, cout: int, stride: int = 1, norm: Norm = "batch") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), _norm(cout, norm)
    )


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: Norm = "batch") -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride, norm)
        self.conv2 = _conv_bn(cout, cout, norm=norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(cout, norm)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.conv1(x))
        return torch.relu(self.conv2(out) + self.shortcut(x))


def _convnet(num_classes: int, in_channels: int, width: int, depth: int, norm: Norm) -> StagedModel:
    if width < 1 or depth < 1:
        raise ValueError("width and depth must be at least 1")
    channels = [width, 2 * width, 4 * width]
    stem = nn.Sequential(_conv_bn(in_channels, width, norm=norm), nn.ReLU(inplace=True))
    stages = []
    cin = width
    for index, cout in enumerate(channels):
        blocks = [ResidualBlock(cin, cout, stride=1 if index == 0 else 2, norm=norm)]
        blocks += [ResidualBlock(cout, cout, stride=1, norm=norm) for _ in range(depth - 1)]
        stages.append(nn.Sequential(*blocks))
        cin = cout
    return StagedModel(stem, stages, Head(channels[-1], num_classes), channels)


@MODELS.register("convnet")
def convnet(num_classes: int, in_channels: int = 1, width: int = 16, depth: int = 1) -> StagedModel:
    """Residual CNN: `width` channels in the first stage, `depth` blocks per stage, BatchNorm."""
    return _convnet(num_classes, in_channels, width, depth, "batch")


@MODELS.register("convnet_gn")
def convnet_gn(num_classes: int, in_channels: int = 1, width: int = 16, depth: int = 1) -> StagedModel:
    """`convnet` with GroupNorm (gcd(channels, 8) groups) in place of BatchNorm."""
    return _convnet(num_classes, in_channels, width, depth, "group")
