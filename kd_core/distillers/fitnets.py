"""FitNets: hints for thin deep nets (Romero et al., ICLR 2015), in the single-stage form of the
CRD benchmark (official code HobbitLong/RepDistiller: distiller_zoo/FitNet.py `HintLoss`,
models/util.py `ConvReg`, train_student.py and helper/loops.py `--distill hint`; the same in
megvii-research/mdistiller, mdistiller/distillers/FitNet.py).

A regressor maps the student's hint-stage output f_s to the teacher's guided-stage output f_t;
the loss is w_ce * CE + w_hint * MSE(regressor(f_s), f_t) (mean over elements), trained in one
stage with the student, as RepDistiller's benchmark does (`-r 1 -a 0 -b 100`: no KD term). The
deployable is the student alone.

Stages are indices into the staged interface's `stages` (negative ones count from the end, as in
Python). RepDistiller's default `--hint_layer 2` reads feat[2], where feat[0] is the stem's
output: the second stage's output, i.e. `student_stage = teacher_stage = 1` here (for VGG, whose
feat[0] is its first block, our stages[0], the official feat[2] is stage 2).

Deviation: RepDistiller's ConvReg picks its conv from the spatial sizes (3x3 stride 2 when the
student map is twice the teacher's, a 4x4 transposed conv when half, a (1 + H_s - H_t) kernel
otherwise; a 1x1 conv when equal). Here the regressor is always that equal-size case, a 1x1
conv + BN + ReLU, and when the sizes differ the larger map is adaptive-average-pooled to the
smaller (the student map before the regressor, or the teacher map): one rule for any size
ratio, and the regressor is built from channel counts alone.
"""

from __future__ import annotations

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
class FitNetsParams(MethodParams):
    student_stage: int = 1  # the hint stage; RepDistiller --hint_layer 2 (feat[0] is the stem)
    teacher_stage: int = 1  # the guided stage
    w_ce: float = 1.0  # RepDistiller -r 1
    w_hint: float = 100.0  # RepDistiller -b 100

    def validate(self) -> None:
        super().validate()
        for name in ("student_stage", "teacher_stage"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer stage index, got {value!r}")


def stage_index(model: StagedModel, index: int, name: str) -> int:
    """`index` as a non-negative index into `model.stages` (negative counts from the end);
    ValueError naming `name` when the model has no such stage."""
    count = len(model.stages)
    if not -count <= index < count:
        raise ValueError(f"{name}={index} is out of range: the model has {count} stages "
                         f"(valid: {-count}..{count - 1})")
    return index % count


def pool_to_smaller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (N, C_a, H_a, W_a) and (N, C_b, H_b, W_b) at one spatial size: each dimension of the
    larger adaptive-average-pooled to the smaller's (min(H_a, H_b), min(W_a, W_b))."""
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    a = a if tuple(a.shape[-2:]) == size else F.adaptive_avg_pool2d(a, size)
    b = b if tuple(b.shape[-2:]) == size else F.adaptive_avg_pool2d(b, size)
    return a, b


def features_and_logits(model: StagedModel, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every stage's output (N, C_i, H_i, W_i) and the logits (N, num_classes), in one forward."""
    x = model.stem(images)
    outputs = []
    for stage in model.stages:
        x = stage(x)
        outputs.append(x)
    return outputs, model.head(model.neck(x))


def stage_output(model: StagedModel, images: torch.Tensor, index: int) -> torch.Tensor:
    """The output of `model.stages[index]` (index >= 0), running no later stage."""
    x = model.stem(images)
    for stage in model.stages[: index + 1]:
        x = stage(x)
    return x


def regressor(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """RepDistiller's ConvReg at equal sizes: 1x1 conv (with bias) C_s -> C_t, BN, ReLU."""
    return nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1), nn.BatchNorm2d(teacher_channels),
                         nn.ReLU(inplace=True))


@DISTILLERS.register("fitnets")
class FitNetsDistiller(TeacherDistiller):
    Params = FitNetsParams

    def __init__(self, student: StagedModel, sources: Sequence[StagedModel], params: FitNetsParams) -> None:
        super().__init__(student, sources, params)
        self.student_stage = stage_index(student, params.student_stage, "student_stage")
        self.teacher_stage = stage_index(self.sources[0], params.teacher_stage, "teacher_stage")
        self.regressor = regressor(student.stage_channels[self.student_stage],
                                   self.sources[0].stage_channels[self.teacher_stage])

    def trainable_modules(self) -> list[nn.Module]:
        return [self.student, self.regressor]

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            guided = stage_output(self.sources[0], images, self.teacher_stage)
        features, logits = features_and_logits(self.student, images)
        hint, guided = pool_to_smaller(features[self.student_stage], guided)
        return logits, {"ce": cross_entropy(logits, labels), "hint": F.mse_loss(self.regressor(hint), guided)}
