"""SimKD: KD with the reused teacher classifier (Chen et al., CVPR 2022).

A projector maps the student's pre-head map to the teacher's; the only default loss is the
MSE between them, and predictions come from the frozen teacher head applied to the
projection. The deployable is encoder + projector + teacher head (the student's own head
is never used).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.distillers.base import START, Distiller, MethodParams, TrainingPosition
from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import cross_entropy
from kd_core.models.base import StagedModel
from kd_core.stages import SourcePlan, StageSpec


@dataclasses.dataclass
class SimKDParams(MethodParams):
    r: int = 2  # projector bottleneck factor: C_t / r hidden channels
    w_feat: float = 1.0
    w_ce: float = 0.0  # optional CE on the predictions

    def validate(self) -> None:
        super().validate()
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def projector(student_channels: int, teacher_channels: int, r: int) -> nn.Sequential:
    hidden = max(1, teacher_channels // r)
    return nn.Sequential(
        *_conv_bn_relu(student_channels, hidden, 1),
        *_conv_bn_relu(hidden, hidden, 3),
        *_conv_bn_relu(hidden, teacher_channels, 1),
    )


def align(student_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Average-pool the student map down to `size` when it is larger."""
    if tuple(student_map.shape[-2:]) != size and student_map.shape[-1] > size[-1]:
        return F.adaptive_avg_pool2d(student_map, size)
    return student_map


class Encoder(nn.Module):
    """A staged model without its head: the map its classifier would read."""

    def __init__(self, model: StagedModel) -> None:
        super().__init__()
        self.stem, self.stages, self.neck = model.stem, model.stages, model.neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.neck(x)


class SimKDStudent(nn.Module):
    """The deployable: student encoder -> (aligned) projector -> teacher head."""

    def __init__(self, encoder: Encoder, projector: nn.Module, teacher_head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.projector, self.head = encoder, projector, teacher_head
        # The teacher map's spatial size, found on the first training batch; kept in the
        # state dict so the deployed model aligns exactly as in training.
        self.register_buffer("aligned_size", torch.zeros(2, dtype=torch.long))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        if int(self.aligned_size[0]) > 0:
            features = align(features, (int(self.aligned_size[0]), int(self.aligned_size[1])))
        return self.projector(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.project(x))


@DISTILLERS.register("simkd")
class SimKDDistiller(Distiller):
    Params = SimKDParams

    def __init__(self, student: StagedModel, sources: Sequence[StagedModel], params: SimKDParams) -> None:
        super().__init__(student, sources, params)
        self.expect_sources(1)
        teacher = self.sources[0]
        self.projector = projector(student.stage_channels[-1], teacher.stage_channels[-1], params.r)
        self.deploy = SimKDStudent(Encoder(student), self.projector, teacher.head)

    @classmethod
    def source_stages(cls, params: MethodParams, plan: SourcePlan) -> list[StageSpec]:
        return [plan.require_teacher()]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.deploy.encoder, self.projector]  # the student's own head stays unused

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        teacher = self.sources[0]
        with torch.no_grad():
            teacher_map = teacher.prehead(images)  # exactly what the teacher's head reads
        if int(self.deploy.aligned_size[0]) == 0:
            student_map = self.deploy.encoder(images[:1])
            size = tuple(min(a, b) for a, b in zip(student_map.shape[-2:], teacher_map.shape[-2:], strict=True))
            self.deploy.aligned_size.copy_(torch.tensor(size))
        projected = self.deploy.project(images)
        if projected.shape[-2:] != teacher_map.shape[-2:]:  # the teacher map is the larger one
            teacher_map = F.adaptive_avg_pool2d(teacher_map, projected.shape[-2:])
        logits = self.deploy.head(projected)
        return logits, {"feat": F.mse_loss(projected, teacher_map), "ce": cross_entropy(logits, labels)}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.deploy(images)

    def deployable(self) -> nn.Module:
        return self.deploy
