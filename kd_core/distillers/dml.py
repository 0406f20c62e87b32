"""DML: deep mutual learning (Zhang et al., CVPR 2018), the online baseline SOKD builds on.

The student and a peer train together, each from the labels and from the other's
(detached) predictions. No frozen sources; the student is deployed.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from kd_core.distillers.base import START, Distiller, SoftTargetParams, TrainingPosition
from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import cross_entropy, kd_loss
from kd_core.models.base import StagedModel


@dataclasses.dataclass
class DMLParams(SoftTargetParams):
    T: float = 1.0
    w_ce: float = 1.0
    w_kd: float = 1.0  # student from the peer
    w_peer_ce: float = 1.0
    w_peer_kd: float = 1.0  # peer from the student


@DISTILLERS.register("dml")
class DMLDistiller(Distiller):
    Params = DMLParams
    frozen_sources = False

    def __init__(self, student: StagedModel, sources: Sequence[StagedModel], params: DMLParams) -> None:
        super().__init__(student, sources, params)
        self.expect_sources(0)
        # A peer of the same architecture with its own initialisation.
        self.peer = copy.deepcopy(student)
        for module in self.peer.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def trainable_modules(self) -> list[nn.Module]:
        return [self.student, self.peer]

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p = self.params
        logits, peer_logits = self.student(images), self.peer(images)
        return logits, {
            "ce": cross_entropy(logits, labels),
            "kd": kd_loss(logits, peer_logits, p.T, p.kl_reduction, logit_standardization=p.logit_standardization),
            "peer_ce": cross_entropy(peer_logits, labels),
            "peer_kd": kd_loss(peer_logits, logits, p.T, p.kl_reduction, logit_standardization=p.logit_standardization),
        }
