"""Vanilla KD (Hinton et al. 2015): w_ce * CE + w_kd * KD_T from one frozen teacher."""

from __future__ import annotations

import dataclasses

import torch

from kd_core.distillers.base import START, SoftTargetParams, TeacherDistiller, TrainingPosition
from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import cross_entropy, kd_loss


@dataclasses.dataclass
class KDParams(SoftTargetParams):
    w_ce: float = 0.1
    w_kd: float = 0.9


@DISTILLERS.register("kd")
class KDDistiller(TeacherDistiller):
    Params = KDParams
    logit_sources = True

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (teacher_logits,) = self.source_logits(images)
        logits = self.student(images)
        p = self.params
        return logits, {
            "ce": cross_entropy(logits, labels),
            "kd": kd_loss(logits, teacher_logits, p.T, p.kl_reduction, logit_standardization=p.logit_standardization),
        }
