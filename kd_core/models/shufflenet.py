"""ShuffleNet V1 and V2 of the CRD/RepDistiller KD benchmark zoo (CIFAR variants, 32x32).

Three stages, each opening with a stride-2 block (16, 8 and 4 pixels wide), behind a 1x1
conv stem (24 channels, stride 1). V2's final 1x1 conv is not a resolution group: it lives in
`neck`, so stages end where the zoo taps features. The reference sets no initialisation for
either net (PyTorch's default), so they take no `init` argument (initialization.py).
"""

from __future__ import annotations

import torch
from torch import nn

from kd_core.models.base import Head, StagedModel
from kd_core.models.registry import MODELS


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` groups so grouped convs see every group."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _bn_conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1; stride 2 concatenates an avg-pooled input."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        # with stride 2 the pooled input is concatenated, so the branch makes only the rest
        branch = cout - cin if stride == 2 else cout
        mid = branch // 4
        self.first_groups = 1 if cin == 24 else groups  # the 24-channel stem output is not grouped
        self.conv1 = _bn_conv(cin, mid, 1, groups=self.first_groups)
        self.conv2 = _bn_conv(mid, mid, 3, stride=stride, groups=mid)
        self.conv3 = _bn_conv(mid, branch, 1, groups=groups)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(torch.relu(self.conv1(x)), self.first_groups)
        out = self.conv3(torch.relu(self.conv2(out)))
        if self.pool is not None:
            return torch.relu(torch.cat([out, self.pool(x)], 1))
        return torch.relu(out + x)


@MODELS.register("shufflenetv1")
def shufflenetv1(num_classes: int, in_channels: int = 3) -> StagedModel:
    """The zoo's ShuffleV1: groups 3, stage widths 240/480/960 with 4/8/4 blocks."""
    groups = 3
    stem = nn.Sequential(_bn_conv(in_channels, 24, 1), nn.ReLU(inplace=True))
    channels = [240, 480, 960]
    stages = []
    cin = 24
    for cout, blocks in zip(channels, (4, 8, 4), strict=True):
        layers = []
        for i in range(blocks):
            layers.append(ShuffleV1Block(cin, cout, 2 if i == 0 else 1, groups))
            cin = cout
        stages.append(nn.Sequential(*layers))
    return StagedModel(stem, stages, Head(channels[-1], num_classes), channels)


class ShuffleV2Block(nn.Module):
    """Split the channels in half, transform one half, concatenate and shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            _bn_conv(half, half, 1),
            nn.ReLU(inplace=True),
            _bn_conv(half, half, 3, groups=half),
            _bn_conv(half, half, 1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, transformed = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([kept, self.branch(transformed)], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Two stride-2 branches over the whole input, each making half the output channels."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        half = cout // 2
        self.left = nn.Sequential(
            _bn_conv(cin, cin, 3, stride=2, groups=cin),
            _bn_conv(cin, half, 1),
            nn.ReLU(inplace=True),
        )
        self.right = nn.Sequential(
            _bn_conv(cin, half, 1),
            nn.ReLU(inplace=True),
            _bn_conv(half, half, 3, stride=2, groups=half),
            _bn_conv(half, half, 1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


# net size -> (stage widths, final conv width, basic blocks per stage), as the reference's
# `configs` (its 2.0 opens with 224 channels where the ShuffleNetV2 paper has 244: kept as is)
_V2_SIZES: dict[float, tuple[tuple[int, int, int], int, tuple[int, int, int]]] = {
    0.2: ((40, 80, 160), 512, (3, 3, 3)),
    0.3: ((40, 80, 160), 512, (3, 7, 3)),
    0.5: ((48, 96, 192), 1024, (3, 7, 3)),
    1.0: ((116, 232, 464), 1024, (3, 7, 3)),
    1.5: ((176, 352, 704), 1024, (3, 7, 3)),
    2.0: ((224, 488, 976), 2048, (3, 7, 3)),
}


@MODELS.register("shufflenetv2")
def shufflenetv2(num_classes: int, in_channels: int = 3, net_size: float = 1.0) -> StagedModel:
    """The zoo's ShuffleV2: a 1x1 stem, 3 stages of 1 down + 3/7/3 basic blocks, a 1x1 conv neck."""
    if net_size not in _V2_SIZES:
        raise ValueError(f"net_size must be one of {sorted(_V2_SIZES)}, got {net_size}")
    channels, last_channels, block_counts = _V2_SIZES[net_size]
    stem = nn.Sequential(_bn_conv(in_channels, 24, 1), nn.ReLU(inplace=True))
    stages = []
    cin = 24
    for cout, blocks in zip(channels, block_counts, strict=True):
        stages.append(nn.Sequential(ShuffleV2DownBlock(cin, cout), *(ShuffleV2Block(cout) for _ in range(blocks))))
        cin = cout
    neck = nn.Sequential(_bn_conv(cin, last_channels, 1), nn.ReLU(inplace=True))
    return StagedModel(stem, stages, Head(last_channels, num_classes), list(channels), neck=neck)


@MODELS.register("shufflenetv2_1_5")
def shufflenetv2_1_5(num_classes: int, in_channels: int = 3) -> StagedModel:
    """ShuffleV2 with net size 1.5."""
    return shufflenetv2(num_classes, in_channels, net_size=1.5)
