"""CE-only training: the no-KD baseline, and how teachers are trained."""

from __future__ import annotations

import dataclasses

import torch

from kd_core.distillers.base import START, Distiller, MethodParams, TrainingPosition
from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import cross_entropy


@dataclasses.dataclass
class CEParams(MethodParams):
    w_ce: float = 1.0


@DISTILLERS.register("ce")
class CEDistiller(Distiller):
    Params = CEParams

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        return logits, {"ce": cross_entropy(logits, labels)}
