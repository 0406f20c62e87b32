"""LW-KD: learning from a lightweight teacher (Liu et al., 2020), as docs/methods.md (lwkd) describes it.

Only the abstract is public. A small CNN (the lightweight teacher, its own CE stage) is trained
on synthetic shapes with as many classes as the target data. Its logits on `bank_size`
synthetic images per class form a fixed bank; a target sample of class y learns from a random
bank entry of class y, so no teacher forward runs in the student loop. A discriminator D,
stepped by its own optimizer in `after_step`, tells the teacher's soft targets from the
student's; the student also learns to fool it (non-saturating loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_core.data.synthetic import DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, synthetic_images
from kd_core.distillers.base import START, Distiller, MethodParams, TrainingPosition
from kd_core.distillers.kd import KDParams
from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import cross_entropy, kd_loss
from kd_core.models.base import StagedModel
from kd_core.stages import SourcePlan, StageSpec

# Seed of the synthetic images behind the bank: not the teacher's training draw (seeded by the
# sweep seed, a small integer), so the soft targets are on images the teacher has not fitted.
BANK_SEED = 2**31 - 1


@dataclasses.dataclass
class LWKDParams(KDParams):
    w_adv: float = 0.1
    bank_size: int = 32  # soft targets per class
    lw_arch: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"name": "convnet", "args": {"width": 8, "depth": 1}}
    )
    synthetic_per_class: int = 100  # the lightweight teacher's synthetic training set
    lw_epochs: int = 10
    disc_hidden: int = 64
    disc_lr: float = 1e-3
    disc_conditional: bool = True  # D also sees the one-hot label

    def validate(self) -> None:
        super().validate()
        for name in ("bank_size", "synthetic_per_class", "lw_epochs", "disc_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.disc_lr <= 0:
            raise ValueError(f"disc_lr must be > 0, got {self.disc_lr}")
        if not isinstance(self.lw_arch, dict) or "name" not in self.lw_arch:
            raise ValueError(f"lw_arch must be an architecture {{name: ..., args: {{...}}}}, got {self.lw_arch!r}")


class Discriminator(nn.Module):
    """MLP on a class-probability vector (optionally with the one-hot label) -> one logit."""

    def __init__(self, num_classes: int, hidden: int, conditional: bool) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conditional = conditional
        inputs = 2 * num_classes if conditional else num_classes
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.conditional:
            probs = torch.cat([probs, F.one_hot(labels, self.num_classes).to(probs.dtype)], dim=1)
        return self.net(probs).squeeze(1)


@DISTILLERS.register("lwkd")
class LWKDDistiller(Distiller):
    Params = LWKDParams

    def __init__(self, student: StagedModel, sources: Sequence[StagedModel], params: LWKDParams) -> None:
        super().__init__(student, sources, params)
        self.expect_sources(1)
        num_classes = student.num_classes
        # Teacher logits (class, entry, logit), raw so that T stays sweepable. The models do not
        # record their input size, so the bank is built from the first batch's shape, once. Not
        # checkpointed: it is a deterministic function of the teacher and is rebuilt on resume.
        self.register_buffer("bank", None, persistent=False)
        self.discriminator = Discriminator(num_classes, params.disc_hidden, params.disc_conditional)
        # D's own optimizer, outside the trainer's (D is not in `trainable_modules`). Its weights
        # are checkpointed with the distiller's state_dict; its Adam state restarts on resume.
        self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=params.disc_lr)

    @classmethod
    def source_stages(cls, params: MethodParams, plan: SourcePlan) -> list[StageSpec]:
        """The lightweight teacher: a CE stage on synthetic shapes shaped like the target data."""
        assert isinstance(params, LWKDParams)
        channels, image_size = int(plan.input_shape[0]), int(plan.input_shape[-1])
        data = {
            "name": "synthetic_shapes", "num_classes": plan.num_classes, "image_size": image_size,
            "channels": channels, "samples_per_class": params.synthetic_per_class, "seed": plan.seed,
            # Every factory argument spelled out, so equal settings give one stage key.
            "val_fraction": DEFAULT_VAL_FRACTION, "test_fraction": DEFAULT_TEST_FRACTION,
        }
        recipe = {**plan.recipe, "epochs": params.lw_epochs}
        return [plan.stage("lw_teacher", params.lw_arch, "ce", {}, data=data, recipe=recipe)]

    @torch.no_grad()
    def build_bank(self, input_shape: Sequence[int]) -> None:
        """Teacher logits on `bank_size` synthetic images of every class, shape (C, M, C)."""
        teacher = self.sources[0]
        num_classes, bank_size = self.student.num_classes, self.params.bank_size
        channels, image_size = input_shape[0], input_shape[-1]
        images, _ = synthetic_images(num_classes, image_size, channels, bank_size, BANK_SEED)
        device = next(teacher.parameters()).device
        logits = torch.cat([teacher(chunk.to(device)) for chunk in images.split(512)])
        self.bank = logits.reshape(num_classes, bank_size, num_classes)

    def draw_soft_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher logits of a random bank entry of each label's class (torch's global RNG)."""
        entries = torch.randint(self.params.bank_size, labels.shape).to(labels.device)
        return self.bank[labels, entries]

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.bank is None:
            self.build_bank(images.shape[1:])
        p = self.params
        teacher_logits = self.draw_soft_targets(labels)
        logits = self.student(images)
        student_probs = F.softmax(logits / p.T, dim=1)
        d_student = self.discriminator(student_probs, labels)
        return logits, {
            "ce": cross_entropy(logits, labels),
            "kd": kd_loss(logits, teacher_logits, p.T, p.kl_reduction, logit_standardization=p.logit_standardization),
            # -log D(p_s): the student is rewarded when D takes its outputs for the teacher's.
            "adv": F.binary_cross_entropy_with_logits(d_student, torch.ones_like(d_student)),
        }

    def after_step(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
        """One step of D: -log D(q) - log(1 - D(sg(p_s))), on a fresh draw of q."""
        T = self.params.T
        teacher_probs = F.softmax(self.draw_soft_targets(labels) / T, dim=1)
        student_probs = F.softmax(logits.detach().float() / T, dim=1)  # float under mixed precision
        d_teacher = self.discriminator(teacher_probs, labels)
        d_student = self.discriminator(student_probs, labels)
        loss = (F.binary_cross_entropy_with_logits(d_teacher, torch.ones_like(d_teacher))
                + F.binary_cross_entropy_with_logits(d_student, torch.zeros_like(d_student)))
        # The student's backward also reached D through the adversarial term: drop those grads.
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_optimizer.step()
        return {"disc_loss": loss.item()}
