"""SFTN: student-friendly teacher networks (Park et al., NeurIPS 2021).

Stage 1 ("sftn_teacher") trains the teacher jointly with student branches: after teacher
stage i (i < N_t-1) a branch transforms the features to the output of student stage j(i) (the
input of student stage j+1: its channels and its resolution, see `StudentBranch`) and runs them
through branch-owned copies of student stages j+1..N_s-1 and the student's neck and head. The
branches' KL to the teacher is not detached, so the teacher learns outputs the student can
follow. Stage 2 ("sftn") drops the branches and distills a fresh student from the frozen SFTN
teacher with vanilla KD.

The paper splits teacher and student into the same number of blocks and joins block i to
block i (j(i) = i); we do the same when their stage counts agree. Where they differ (vgg13 ->
MobileNetV2, resnet50 -> vgg8) the paper gives no rule; we join by resolution
(`branch_joins`). No official code was found: the stage-1 weights, tau, the epochs and
from-scratch vs fine-tune are options (docs/methods.md, sftn).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.distillers.base import START, Distiller, MethodParams, TrainingPosition
from kd_core.distillers.kd import KDDistiller, KDParams
from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import KL_REDUCTIONS, cross_entropy, kd_loss
from kd_core.models.base import StagedModel
from kd_core.models.registry import build_model
from kd_core.stages import SourcePlan, StageSpec

# Stage 1 ---------------------------------------------------------------------------------


@dataclasses.dataclass
class SFTNTeacherParams(MethodParams):
    student_arch: dict[str, Any] = dataclasses.field(default_factory=dict)  # {"name": ..., "args": {...}}
    # One field per term of forward_train (stage 2's stage1_w_t / _rce / _rkl map onto them).
    w_t_ce: float = 1.0  # CE of the teacher
    w_r_ce: float = 1.0  # sum of the branches' CE
    w_r_kl: float = 3.0  # sum of the branches' KL to the teacher (not detached)
    tau: float = 1.0
    kl_reduction: str = "batchmean"
    finetune: bool = False  # start from the parent (a trained CE teacher) instead of scratch
    # branch_joins[i]: the student stage whose output teacher stage i's branch produces (its
    # transform's target; the branch then runs the student's later stages). None: j(i) = i,
    # which needs equal stage counts. SFTNDistiller.source_stages always sets it (`branch_joins`).
    branch_joins: list[int] | None = None

    def validate(self) -> None:
        super().validate()
        if self.branch_joins is not None and any(j < 0 for j in self.branch_joins):
            raise ValueError(f"branch_joins must be stage indices >= 0, got {self.branch_joins}")
        if "name" not in self.student_arch:
            raise ValueError("student_arch is required: {'name': ..., 'args': {...}}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {', '.join(KL_REDUCTIONS)}, got {self.kl_reduction!r}")


class StudentBranch(nn.Module):
    """Teacher features after stage i -> transform -> student stages j+1.. -> neck -> head,
    where j = `join` is the student stage the branch joins (`branch_joins`; j = i by default).

    The transform maps the teacher map (N, C_t, H_t, W_t) to the student's stage-j output
    (N, C_s, H_s, W_s), the input of student stage j+1: adaptive average pooling to (H_s, W_s),
    then a 1x1 conv + BN + ReLU to C_s channels (the paper's transform layer is the 1x1 conv +
    BN + ReLU; it matches channels and resolution). Pooling rather than a strided conv because
    it reads every teacher pixel (a strided 1x1 conv reads one in four: aliasing), adds no
    parameters, works for any size ratio (teacher and student may differ by 2x, 4x or not at
    all; equal sizes leave the map untouched), and is what SimKD does to align maps. Should a
    student map be larger than the teacher's, the pooling repeats pixels (nearest upsampling).
    Without it, resnet32x4 -> ShuffleV2 branches ran the student stages at 8x8 where the
    student runs at 4x4.
    """

    def __init__(self, in_channels: int, student: StagedModel, join: int) -> None:
        super().__init__()
        out_channels = student.stage_channels[join]  # = the input channels of student stage j+1
        self.transform = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
        )
        # Deep copies: every branch owns its weights.
        self.stages = copy.deepcopy(student.stages[join + 1:])
        self.neck, self.head = copy.deepcopy(student.neck), copy.deepcopy(student.head)

    def forward(self, features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits (N, num_classes) from teacher features (N, C_t, H_t, W_t), resized to `size`
        (the student's stage-j output size; None: kept)."""
        if size is not None and tuple(features.shape[-2:]) != tuple(size):
            features = F.adaptive_avg_pool2d(features, size)
        x = self.transform(features)
        for stage in self.stages:
            x = stage(x)
        return self.head(self.neck(x))


def branch_joins(teacher_sizes: Sequence[tuple[int, int]], student_sizes: Sequence[tuple[int, int]]) -> list[int]:
    """For each teacher stage i < N_t-1, the student stage j (0 <= j <= N_s-2) its branch joins.

    `teacher_sizes`/`student_sizes`: (H, W) of every stage output (`stage_sizes`). Equal stage
    counts: j = i (the paper's block correspondence). Otherwise by resolution: the deepest
    student stage whose map is at least as large as teacher stage i's (the same downsampling
    when one exists), or stage 0 when every student map is smaller. Several teacher stages may
    join the same student stage. Raises ValueError when the student has fewer than 2 stages
    (no stage would be left for a branch to run)."""
    n_teacher, n_student = len(teacher_sizes), len(student_sizes)
    if n_student < 2:
        raise ValueError(f"SFTN needs a student with at least 2 stages, got {n_student}")
    if n_teacher == n_student:
        return list(range(n_teacher - 1))
    joins = []
    for h, w in teacher_sizes[:-1]:
        large_enough = [j for j in range(n_student - 1) if student_sizes[j][0] * student_sizes[j][1] >= h * w]
        joins.append(large_enough[-1] if large_enough else 0)
    return joins


def stage_sizes(arch: dict[str, Any], num_classes: int, input_shape: Sequence[int]) -> list[tuple[int, int]]:
    """(H, W) of every stage output of architecture `arch` for inputs of `input_shape` (C, H, W),
    from a meta-device build (no memory, no compute; remembered per arguments)."""
    return list(_stage_sizes(json.dumps(arch, sort_keys=True), num_classes, tuple(int(d) for d in input_shape)))


@functools.lru_cache(maxsize=256)  # a meta build of a large model takes about a second
def _stage_sizes(arch_json: str, num_classes: int, input_shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    arch = json.loads(arch_json)
    with torch.device("meta"):
        probe = build_model(arch["name"], num_classes, int(input_shape[0]), arch.get("args", {})).eval()
        outputs = probe.stage_outputs(torch.empty(1, *input_shape))
    return tuple((int(o.shape[-2]), int(o.shape[-1])) for o in outputs)


@DISTILLERS.register("sftn_teacher")
class SFTNTeacherDistiller(Distiller):
    """Stage 1: `student` is the teacher being trained; the branches are trained with it."""

    Params = SFTNTeacherParams
    frozen_sources = False  # the model that is distilled from (the teacher) is being trained
    internal_stage = True  # built by SFTNDistiller.source_stages only

    def __init__(self, student: StagedModel, sources: Sequence[StagedModel], params: SFTNTeacherParams) -> None:
        super().__init__(student, sources, params)
        self.expect_sources(1 if params.finetune else 0)
        if params.finetune:
            self.student.load_state_dict(self.sources[0].state_dict())
        arch = params.student_arch
        # in_channels is irrelevant: the branches start after the student's stem.
        template = build_model(arch["name"], student.num_classes, 1, arch.get("args", {}))
        n_teacher, n_student = len(student.stages), len(template.stages)
        joins = params.branch_joins
        if joins is None:
            if n_teacher != n_student:
                raise ValueError(f"the teacher has {n_teacher} stages, the student {n_student}: pass branch_joins "
                                 "(the student stage each teacher stage's branch joins; sftn sets it)")
            joins = list(range(n_teacher - 1))
        if len(joins) != n_teacher - 1 or any(j > n_student - 2 for j in joins):
            raise ValueError(f"branch_joins must give, for each of the teacher's first {n_teacher - 1} stages, a "
                             f"student stage in 0..{n_student - 2}; got {joins}")
        self.joins = list(joins)
        self.branches = nn.ModuleList(
            StudentBranch(student.stage_channels[i], template, j) for i, j in enumerate(self.joins)
        )
        self._sizes: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # input shape -> student stage sizes

    def student_sizes(self, input_shape: Sequence[int]) -> list[tuple[int, int]]:
        """The student's stage output sizes for inputs of `input_shape` (C, H, W), found once per shape."""
        key = tuple(int(d) for d in input_shape)
        if key not in self._sizes:
            self._sizes[key] = stage_sizes(self.params.student_arch, self.student.num_classes, key)
        return self._sizes[key]

    @classmethod
    def source_stages(cls, params: MethodParams, plan: SourcePlan) -> list[StageSpec]:
        raise ValueError("sftn_teacher is stage 1 of 'sftn', not a method to sweep on its own")

    def trainable_modules(self) -> list[nn.Module]:
        return [self.student, self.branches]

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p, teacher = self.params, self.student
        features = teacher.stage_outputs(images)
        logits = teacher.head(teacher.neck(features[-1]))
        student_sizes = self.student_sizes(images.shape[1:])
        sizes = [student_sizes[j] for j in self.joins]  # the joined student stage's output, per branch
        branch_logits = [branch(f, size) for branch, f, size in zip(self.branches, features[:-1], sizes, strict=True)]
        return logits, {
            "t_ce": cross_entropy(logits, labels),
            "r_ce": torch.stack([cross_entropy(z, labels) for z in branch_logits]).sum(),
            # detach_teacher=False: the KL gradient reaching the teacher is the point of SFTN.
            "r_kl": torch.stack([kd_loss(z, logits, p.tau, p.kl_reduction, detach_teacher=False)
                                 for z in branch_logits]).sum(),
        }

    def deployable(self) -> nn.Module:
        return self.student  # the teacher alone; the branches are dropped


# Stage 2 ---------------------------------------------------------------------------------


@dataclasses.dataclass
class SFTNParams(KDParams):
    stage1_w_t: float = 1.0
    stage1_w_rce: float = 1.0
    stage1_w_rkl: float = 3.0
    stage1_tau: float = 1.0
    stage1_epochs: int | None = None  # None: the teacher recipe's epochs (the student's for a pretrained teacher)
    finetune: bool = False  # stage 1 fine-tunes the trained CE teacher instead of starting from scratch

    def validate(self) -> None:
        super().validate()
        for name in ("stage1_w_t", "stage1_w_rce", "stage1_w_rkl"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.stage1_tau <= 0:
            raise ValueError(f"stage1_tau must be > 0, got {self.stage1_tau}")
        if self.stage1_epochs is not None and self.stage1_epochs < 1:
            raise ValueError(f"stage1_epochs must be >= 1 or None, got {self.stage1_epochs}")


@DISTILLERS.register("sftn")
class SFTNDistiller(KDDistiller):
    """Stage 2: vanilla KD from the frozen SFTN teacher."""

    Params = SFTNParams

    @classmethod
    def source_stages(cls, params: MethodParams, plan: SourcePlan) -> list[StageSpec]:
        teacher = plan.require_teacher()
        # The SFTN teacher depends only on the spec's fixed values (over the defaults), never on
        # a trial's sampled ones: trials that search T/w_kd share one SFTN teacher.
        fixed = type(params)(**plan.fixed_params_of(type(params)))
        stage1 = SFTNTeacherParams(
            student_arch=plan.student_arch, w_t_ce=float(fixed.stage1_w_t), w_r_ce=float(fixed.stage1_w_rce),
            w_r_kl=float(fixed.stage1_w_rkl), tau=float(fixed.stage1_tau), finetune=bool(fixed.finetune),
        )
        shape = plan.input_shape
        joins = branch_joins(stage_sizes(teacher.arch, plan.num_classes, shape),
                             stage_sizes(plan.student_arch, plan.num_classes, shape))
        stage1 = dataclasses.replace(stage1, branch_joins=joins)
        recipe = plan.teacher_recipe  # a pretrained teacher has none: the plan's
        epochs = fixed.stage1_epochs or recipe["epochs"]
        return [plan.stage(
            "sftn_teacher", teacher.arch, "sftn_teacher", dataclasses.asdict(stage1),  # every field: defaults count
            parents=(teacher,) if stage1.finetune else (), recipe={**recipe, "epochs": int(epochs)},
            seed=teacher.seed,
        )]
