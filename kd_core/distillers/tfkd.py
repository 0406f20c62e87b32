"""Teacher-free KD (Yuan et al., CVPR 2020), the baseline LW-KD is compared with (docs/methods.md, tfkd and lwkd).

A virtual teacher replaces the trained one: for a sample of class y it is the fixed
distribution q with mass a on y and (1 - a) / (C - 1) on every other class. Its log serves as
teacher logits in the canonical KD_T, so the temperature softens it as it would a teacher's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from kd_core.distillers.base import START, Distiller, TrainingPosition
from kd_core.distillers.kd import KDParams
from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import cross_entropy, kd_loss
from kd_core.models.base import StagedModel

# log 0 for a = 1: finite, so KL's 0 * log 0 stays 0, and exp(LOG_ZERO / T) is 0 in float32 for T < ~96.
LOG_ZERO = -1e4


@dataclasses.dataclass
class TFKDParams(KDParams):
    correct_mass: float = 0.9  # a: the virtual teacher's probability of the true class

    def validate(self) -> None:
        super().validate()
        if not 0 < self.correct_mass <= 1:
            raise ValueError(f"correct_mass must lie in (0, 1], got {self.correct_mass}")


def virtual_teacher_logits(num_classes: int, correct_mass: float) -> torch.Tensor:
    """Row y: the log of the virtual teacher's distribution for class y, (C, C)."""
    off_mass = (1 - correct_mass) / (num_classes - 1)
    probs = torch.full((num_classes, num_classes), off_mass)
    probs.fill_diagonal_(correct_mass)
    return probs.log().clamp_min(LOG_ZERO)


@DISTILLERS.register("tfkd")
class TFKDDistiller(Distiller):
    Params = TFKDParams

    def __init__(self, student: StagedModel, sources: Sequence[StagedModel], params: TFKDParams) -> None:
        super().__init__(student, sources, params)
        self.expect_sources(0)
        # Derived from the params alone: no need to checkpoint it.
        self.register_buffer(
            "teacher_logits", virtual_teacher_logits(student.num_classes, params.correct_mass), persistent=False
        )

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        p = self.params
        return logits, {
            "ce": cross_entropy(logits, labels),
            "kd": kd_loss(logits, self.teacher_logits[labels], p.T, p.kl_reduction,
                          logit_standardization=p.logit_standardization),
        }
