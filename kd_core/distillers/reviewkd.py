"""ReviewKD: Distilling Knowledge via Knowledge Review (Chen et al., CVPR 2021; official code
dvlab-research/ReviewKD, CIFAR-100/model/reviewkd.py and train.py; mdistiller's
mdistiller/distillers/ReviewKD.py and engine/cfg.py, whose defaults are used here).

Features, read through the staged interface: the outputs of each network's deepest L stages
plus its pooled pre-head feature as a 1x1 map (mdistiller's `feats` + `pooled_feat`), shallow to
deep; L = `num_stages`, by default the smaller of the two stage counts (our zoo models have 3,
4 or 5 stages; with different counts the deeper-staged network's earliest stages are unused).
Review: attention-based fusion (ABF) modules run from the deepest feature to the shallowest.
Each maps its student feature with a 1x1 conv + BN to `mid` channels; every ABF but the deepest
fuses it with the residual from the deeper level (nearest-upsampled to its size) using two
sigmoid attention maps from a 1x1 conv on both (x * a0 + r * a1); the result is
nearest-resized to the teacher feature's size, passed on as the next residual and mapped by a
3x3 conv + BN to the teacher feature's channels. The loss, hierarchical context loss (HCL), sums
over levels: MSE of the full maps (weight 1) plus MSE after adaptive average pooling to 4x4,
2x2 and 1x1 (weights 0.5, 0.25, 0.125; a size not smaller than the map is skipped without
halving), divided by the sum of the weights used. The term `review` is HCL times the warm-up
factor min(epoch / warmup_epochs, 1) (1-based epochs, as mdistiller's trainer passes them).
The ABFs train with the student; the deployable is the student alone.

Defaults (mdistiller cfg REVIEWKD): CE_WEIGHT 1.0 (`w_ce`), REVIEWKD_WEIGHT 1.0 (`w_review`;
the official resnet32x4 -> resnet8x4 run uses 5.0, sweeps/specs/cifar100_r32x4_r8x4_reviewkd.yaml),
WARMUP_EPOCHS 20, MAX_MID_CHANNEL 512: mid = min(max_mid_channels, the student's pooled-feature
channels), the official rule (256 for resnet8x4).

Deviations: the official code reads the teacher's stage outputs before their last ReLU
(`preact=True`); the staged interface gives the post-activation outputs, used for both networks.
The official dvlab code counts epochs from 0 (no review loss in the first epoch); we follow
mdistiller (epoch 1 of 20 weighs 1/20). Per-pair feature lists are replaced by the rule above
(the official VGG setting leaves out the first of five stages: set `num_stages: 4`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.distillers.base import START, MethodParams, TeacherDistiller, TrainingPosition
from kd_core.distillers.crd import prehead_channels
from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import cross_entropy
from kd_core.models.base import StagedModel

HCL_LEVELS = (4, 2, 1)  # pyramid pooling sizes; weights halve from 1 at each level used


@dataclasses.dataclass
class ReviewKDParams(MethodParams):
    max_mid_channels: int = 512  # ABF width: min(this, the student's pooled-feature channels)
    warmup_epochs: int = 20  # the review term ramps as min(epoch / warmup_epochs, 1); 0: no ramp
    num_stages: int = 0  # deepest stages reviewed (plus the pooled feature); 0: min of both counts
    w_ce: float = 1.0
    w_review: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.max_mid_channels < 1:
            raise ValueError(f"max_mid_channels must be >= 1, got {self.max_mid_channels}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.num_stages < 0:
            raise ValueError(f"num_stages must be >= 0 (0: all stages both networks have), got {self.num_stages}")


class ABF(nn.Module):
    """Attention-based fusion: a student feature (N, C_in, H, W) and the residual of the deeper
    level (N, mid, h, w) -> (output (N, C_out, H_t, W_t), residual (N, mid, H_t, W_t)), where
    (H_t, W_t) is the teacher feature's size. The deepest ABF (`fuse=False`) takes no residual."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)  # as the official code initialises them
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([x, residual], dim=1))  # (N, 2, H, W)
            x = x * weights[:, :1] + residual * weights[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


def hcl(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss, a 0-dim tensor: for each pair of maps (N, C, H, W) of equal
    shape, (MSE + sum_l w_l * MSE(pool_l(fs), pool_l(ft))) / (1 + sum_l w_l) over the pooling
    sizes l in 4, 2, 1 smaller than H, with w halving from 0.5 at each size used; summed over
    the pairs."""
    total = torch.zeros((), device=student_features[0].device)
    for fs, ft in zip(student_features, teacher_features, strict=True):
        loss, weight, weight_sum = F.mse_loss(fs, ft), 1.0, 1.0
        for size in HCL_LEVELS:
            if size >= fs.shape[-2]:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            weight_sum += weight
        total = total + loss / weight_sum
    return total


def review_features(
    model: StagedModel, images: torch.Tensor, num_stages: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(features, logits) of one forward pass: the outputs (N, C_i, H_i, W_i) of the deepest
    `num_stages` stages, then the pooled pre-head feature (N, C, 1, 1), shallow to deep; and
    the logits (N, num_classes)."""
    x = model.stem(images)
    outputs = []
    for stage in model.stages:
        x = stage(x)
        outputs.append(x)
    prehead = model.neck(x)
    return [*outputs[len(outputs) - num_stages:], F.adaptive_avg_pool2d(prehead, 1)], model.head(prehead)


@DISTILLERS.register("reviewkd")
class ReviewKDDistiller(TeacherDistiller):
    Params = ReviewKDParams

    def __init__(self, student: StagedModel, sources: Sequence[StagedModel], params: ReviewKDParams) -> None:
        super().__init__(student, sources, params)
        teacher = self.sources[0]
        shared = min(len(student.stage_channels), len(teacher.stage_channels))
        if params.num_stages > shared:
            raise ValueError(f"num_stages {params.num_stages} exceeds the stages both networks have ({shared})")
        self.num_stages = params.num_stages or shared
        student_channels = [*student.stage_channels[-self.num_stages:], prehead_channels(student)]
        teacher_channels = [*teacher.stage_channels[-self.num_stages:], prehead_channels(teacher)]
        mid = min(params.max_mid_channels, student_channels[-1])
        # Shallow to deep; the deepest (the pooled feature) starts the review and fuses nothing.
        self.abfs = nn.ModuleList(
            ABF(cin, mid, cout, fuse=i < self.num_stages)
            for i, (cin, cout) in enumerate(zip(student_channels, teacher_channels, strict=True))
        )

    def trainable_modules(self) -> list[nn.Module]:
        return [self.student, self.abfs]

    def review(
        self, student_features: Sequence[torch.Tensor], out_sizes: Sequence[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """The ABFs' outputs, shallow to deep, each (N, C_t_i, *out_sizes[i]), from the student
        features (shallow to deep, as `review_features` gives them), reviewed deepest first."""
        results: list[torch.Tensor] = []
        residual = None
        for abf, feature, size in reversed(list(zip(self.abfs, student_features, out_sizes, strict=True))):
            out, residual = abf(feature, residual, size)
            results.insert(0, out)
        return results

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student_features, logits = review_features(self.student, images, self.num_stages)
        with torch.no_grad():
            teacher_features, _ = review_features(self.sources[0], images, self.num_stages)
        reviewed = self.review(student_features, [tuple(f.shape[-2:]) for f in teacher_features])
        warmup = self.params.warmup_epochs
        ramp = min(position.epoch / warmup, 1.0) if warmup > 0 else 1.0
        return logits, {"ce": cross_entropy(logits, labels), "review": ramp * hcl(reviewed, teacher_features)}
