"""SOKD: semi-online KD (Liu et al., BMVC 2021).

A knowledge bridge module (a copy of the teacher's last stages and head) is fed the detached
output of the frozen teacher trunk and trained online with the student. The student learns
from the bridge, never directly from the teacher; the bridge learns from the labels, the
teacher and the student.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kd_core.distillers.base import START, SoftTargetParams, TeacherDistiller, TrainingPosition
from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import cross_entropy, kd_loss
from kd_core.models.base import StagedModel


@dataclasses.dataclass
class SOKDParams(SoftTargetParams):
    w_ce: float = 1.0  # student CE
    w_kd: float = 1.0  # student from the bridge
    w_bridge_ce: float = 1.0
    w_bridge_t: float = 1.0  # bridge from the teacher
    w_bridge_s: float = 1.0  # bridge from the student
    bridge_init: str = "random"  # random | teacher_copy
    teacher_bn: str = "train"  # official code: teacher BN buffers keep updating
    attach_stage: int = -1  # the bridge replaces teacher stages from here on (-1: the last)
    bridge_lr_scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.bridge_init not in ("random", "teacher_copy"):
            raise ValueError(f"bridge_init must be random or teacher_copy, got {self.bridge_init!r}")
        if self.teacher_bn not in ("train", "eval"):
            raise ValueError(f"teacher_bn must be train or eval, got {self.teacher_bn!r}")
        if self.bridge_lr_scale <= 0:
            raise ValueError(f"bridge_lr_scale must be > 0, got {self.bridge_lr_scale}")


class Bridge(nn.Module):
    """Teacher stages [attach:] + neck + head, owned by the bridge."""

    def __init__(self, teacher: StagedModel, attach: int, reinitialise: bool) -> None:
        super().__init__()
        self.stages = copy.deepcopy(teacher.stages[attach:])
        self.neck, self.head = copy.deepcopy(teacher.neck), copy.deepcopy(teacher.head)
        self.requires_grad_(True)
        if reinitialise:
            for module in self.modules():
                if module is not self and hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            features = stage(features)
        return self.head(self.neck(features))


@DISTILLERS.register("sokd")
class SOKDDistiller(TeacherDistiller):
    Params = SOKDParams
    frozen_sources = False  # the bridge changes, and teacher BN buffers may too

    def __init__(self, student: StagedModel, sources: Sequence[StagedModel], params: SOKDParams) -> None:
        if params.teacher_bn == "train":
            # Its BN buffers will change: work on a private copy, never a shared cached teacher.
            sources = [copy.deepcopy(sources[0]), *sources[1:]]
        super().__init__(student, sources, params)
        teacher = self.sources[0]
        self.attach = params.attach_stage % len(teacher.stages)
        if self.attach == 0:
            raise ValueError("attach_stage must leave at least one teacher stage before the bridge")
        self.bridge = Bridge(teacher, self.attach, reinitialise=params.bridge_init == "random")

    def trainable_modules(self) -> list[nn.Module]:
        return [self.student, self.bridge]

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.student.parameters())},
                {"params": list(self.bridge.parameters()), "lr_scale": self.params.bridge_lr_scale}]

    def train(self, mode: bool = True) -> SOKDDistiller:
        super().train(mode)
        if mode and self.params.teacher_bn == "train":
            self.sources[0].train()  # BN statistics update; weights stay frozen (no grad)
        return self

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p, teacher = self.params, self.sources[0]
        with torch.no_grad():
            x = teacher.stem(images)
            for stage in teacher.stages[: self.attach]:
                x = stage(x)
            trunk = x
            for stage in teacher.stages[self.attach:]:
                x = stage(x)
            teacher_logits = teacher.head(teacher.neck(x))
        bridge_logits = self.bridge(trunk)
        logits = self.student(images)
        kd = functools.partial(kd_loss, temperature=p.T, reduction=p.kl_reduction,
                               logit_standardization=p.logit_standardization)
        return logits, {
            "ce": cross_entropy(logits, labels),
            "kd": kd(logits, bridge_logits),  # bridge side detached
            "bridge_ce": cross_entropy(bridge_logits, labels),
            "bridge_t": kd(bridge_logits, teacher_logits),
            "bridge_s": kd(bridge_logits, logits),  # student side detached
        }
