"""The staged model interface: stem -> stages[0..N-1] -> head (pool + classifier).

Feature-based methods read stage outputs, the pre-head map and the head through this
interface, so no model is edited to expose features.
"""

from __future__ import annotations

import torch
from torch import nn


class Head(nn.Module):
    """Global average pool + flatten + linear classifier."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(feature_map), 1))


class StagedModel(nn.Module):
    """A classifier split into `stem`, `stages` and `head`.

    `prehead` is the tensor the classifier actually reads. Families whose last stage
    output needs a final transform before pooling (pre-activation nets) put it in
    `neck`, which is part of the pre-head path.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: list[nn.Module],
        head: Head,
        stage_channels: list[int],
        neck: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if len(stages) != len(stage_channels):
            raise ValueError("one channel count per stage is required")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.neck = neck if neck is not None else nn.Identity()
        self.head = head
        self.stage_channels = list(stage_channels)

    @property
    def num_classes(self) -> int:
        return self.head.fc.out_features

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of every stage, in order."""
        outputs = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def prehead(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map the head pools and classifies."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.neck(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.prehead(x))
