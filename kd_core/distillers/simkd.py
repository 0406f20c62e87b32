"""SimKD: KD with the reused teacher classifier (Chen et al., CVPR 2022; official code
DefangChen/SimKD, models/util.py `SimKD` and train_student.py).

f_s and f_t are each network's last-stage output (the official `feat[-2]`), (N, C, H, W):
after a neck that keeps the channel count (WRN's final BN + ReLU, what its classifier reads)
and before one that changes it (MobileNetV2's and ShuffleNetV2's final 1x1 conv + BN + ReLU).
A projector P (1x1, 3x3, 1x1 bias-free convs, each BN + ReLU; C_s -> C_t/r -> C_t/r -> C_t) maps
f_s to f_t's channels; if the spatial sizes differ, the larger map is average-pooled to the
smaller. The only default loss is MSE(P(f_s), f_t); predictions come from the reused teacher
classifier (the teacher's channel-changing neck if it has one, then pool + FC, frozen) applied
to P(f_s). The deployable is encoder + projector + reused classifier (the student's own head,
and its channel-changing neck, are never used).

Deviations from the official code: it reads RepDistiller's WRN feat[-2] before the final
BN + ReLU (we read what the classifier reads, docs/methods.md), and its reused classifier is
the teacher's FC alone (its teachers have no channel-changing neck; ours may).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.distillers.base import START, MethodParams, TeacherDistiller, TrainingPosition
from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import cross_entropy
from kd_core.models.base import StagedModel


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


def neck_changes_channels(model: StagedModel) -> bool:
    """Whether `model.neck` changes the channel count of the last stage's output (MobileNetV2's
    and ShuffleNetV2's final 1x1 conv + BN + ReLU) rather than only transforming it (WRN's final
    BN + ReLU, an identity). Found by running a meta-device copy of the neck: no memory, no
    compute, and no family has to declare it."""
    channels = model.stage_channels[-1]
    neck = copy.deepcopy(model.neck).to("meta").eval()
    with torch.no_grad():
        return neck(torch.empty(2, channels, 2, 2, device="meta")).shape[1] != channels


def feature_map(model: StagedModel, with_neck: bool, images: torch.Tensor) -> torch.Tensor:
    """SimKD's f of `model`, (N, C_last, H, W): stem and stages, then the neck if `with_neck`."""
    x = model.stem(images)
    for stage in model.stages:
        x = stage(x)
    return model.neck(x) if with_neck else x


class Encoder(nn.Module):
    """A staged model up to SimKD's feature map: stem and stages, plus its neck only when the
    neck keeps the channel count (a channel-changing neck is dropped with the student's head)."""

    def __init__(self, model: StagedModel, with_neck: bool) -> None:
        super().__init__()
        self.stem, self.stages = model.stem, model.stages
        self.neck = model.neck if with_neck else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.neck(x)


class SimKDStudent(nn.Module):
    """The deployable: student encoder -> (aligned) projector -> reused teacher classifier.

    The reused classifier is everything of the teacher after f_t: `teacher_neck` (the teacher's
    channel-changing neck, or an identity) and `head` (pool + FC). It is frozen and stays in eval
    mode whatever mode the deployable is put in.
    """

    def __init__(
        self, encoder: Encoder, projector: nn.Module, teacher_neck: nn.Module, teacher_head: nn.Module
    ) -> None:
        super().__init__()
        self.encoder, self.projector = encoder, projector
        self.teacher_neck, self.head = teacher_neck, teacher_head
        # The teacher map's spatial size, found on the first training batch; kept in the
        # state dict so the deployed model aligns exactly as in training.
        self.register_buffer("aligned_size", torch.zeros(2, dtype=torch.long))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """P(f_s), (N, C_t, H, W) for images (N, C_in, H_in, W_in)."""
        return self.project_features(self.encoder(x))

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """P of an encoder map f_s (N, C_s, H_s, W_s), pooled to the aligned size first if larger."""
        if int(self.aligned_size[0]) > 0:
            features = align(features, (int(self.aligned_size[0]), int(self.aligned_size[1])))
        return self.projector(features)

    def classify(self, projected: torch.Tensor) -> torch.Tensor:
        """The reused teacher classifier on a projected map: logits (N, num_classes)."""
        return self.head(self.teacher_neck(projected))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.project(x))

    def train(self, mode: bool = True) -> SimKDStudent:
        super().train(mode)
        self.teacher_neck.eval()  # frozen teacher modules: their BN statistics never move
        self.head.eval()
        return self


@DISTILLERS.register("simkd")
class SimKDDistiller(TeacherDistiller):
    Params = SimKDParams

    def __init__(self, student: StagedModel, sources: Sequence[StagedModel], params: SimKDParams) -> None:
        super().__init__(student, sources, params)
        teacher = self.sources[0]
        # f is read after a neck that keeps the channels (what the classifier reads) and before
        # one that changes them (the official code's feat[-2]).
        self.student_neck_in_f = not neck_changes_channels(student)
        self.teacher_neck_in_f = not neck_changes_channels(teacher)
        self.projector = projector(student.stage_channels[-1], teacher.stage_channels[-1], params.r)
        teacher_neck = nn.Identity() if self.teacher_neck_in_f else teacher.neck
        self.deploy = SimKDStudent(Encoder(student, self.student_neck_in_f), self.projector, teacher_neck, teacher.head)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.deploy.encoder, self.projector]  # the student's own head stays unused

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        teacher = self.sources[0]
        with torch.no_grad():
            teacher_map = feature_map(teacher, self.teacher_neck_in_f, images)
        student_map = self.deploy.encoder(images)
        if int(self.deploy.aligned_size[0]) == 0:  # the first batch fixes the alignment
            size = tuple(min(a, b) for a, b in zip(student_map.shape[-2:], teacher_map.shape[-2:], strict=True))
            self.deploy.aligned_size.copy_(torch.tensor(size))
        projected = self.deploy.project_features(student_map)
        if projected.shape[-2:] != teacher_map.shape[-2:]:  # the teacher map is the larger one
            teacher_map = F.adaptive_avg_pool2d(teacher_map, projected.shape[-2:])
        logits = self.deploy.classify(projected)
        return logits, {"feat": F.mse_loss(projected, teacher_map), "ce": cross_entropy(logits, labels)}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.deploy(images)

    def deployable(self) -> nn.Module:
        return self.deploy
