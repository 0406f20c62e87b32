"""A small residual CNN family for small images (the embedded 8x8 digits).

Width and depth are free, so teacher, assistants and student come from one family:
three stages with `width`, `2*width`, `4*width` channels; stages 2 and 3 halve the
resolution; each stage holds `depth` residual blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_core.models.base import Head, StagedModel
from kd_core.models.registry import MODELS


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)
    )


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride)
        self.conv2 = _conv_bn(cout, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.conv1(x))
        return torch.relu(self.conv2(out) + self.shortcut(x))


@MODELS.register("convnet")
def convnet(
    num_classes: int, in_channels: int = 1, width: int = 16, depth: int = 1
) -> StagedModel:
    """Residual CNN: `width` channels in the first stage, `depth` blocks per stage."""
    if width < 1 or depth < 1:
        raise ValueError("width and depth must be at least 1")
    channels = [width, 2 * width, 4 * width]
    stem = nn.Sequential(_conv_bn(in_channels, width), nn.ReLU(inplace=True))
    stages = []
    cin = width
    for index, cout in enumerate(channels):
        blocks = [ResidualBlock(cin, cout, stride=1 if index == 0 else 2)]
        blocks += [ResidualBlock(cout, cout, stride=1) for _ in range(depth - 1)]
        stages.append(nn.Sequential(*blocks))
        cin = cout
    return StagedModel(stem, stages, Head(channels[-1], num_classes), channels)
