"""DKD: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022; official code
megvii-research/mdistiller, mdistiller/distillers/DKD.py; defaults from mdistiller/engine/cfg.py,
section DKD).

KD's KL splits into two parts that DKD weights independently:
- TCKD, target-class KD: KL between the binary distributions [p_gt, 1 - p_gt] of teacher and
  student (softmax(z / T), gt the label's class);
- NCKD, non-target-class KD: KL between the distributions over the other C - 1 classes
  (softmax of the non-target logits / T).
Both are multiplied by T^2 and averaged over the batch. Loss: w_ce * CE + warm-up *
(w_tckd * TCKD + w_nckd * NCKD), the paper's CE + alpha * TCKD + beta * NCKD.

The warm-up min(epoch / warmup_epochs, 1) (1-based epoch, as the official trainer counts) is the
method's schedule, not a weight: it is applied inside the `tckd` and `nckd` terms (and shows in
their logged values). Official: 20 epochs of a 240-epoch recipe; a shorter recipe should scale it
in proportion (epochs / 12), and `warmup_epochs: 0` turns it off.

With `logit_standardization` both logit vectors are z-scored before the temperature, as the
logit standardization paper's DKD does (its recipe: T=2, both weights x9).

Deviations (same values, better numerics): NCKD drops the target column instead of
subtracting 1000 from its logit (the official approximate mask); TCKD is computed in log space
(log(1 - p_gt) as the logsumexp of the non-target log-probabilities) instead of the log of
summed probabilities, so it stays finite when p_gt rounds to 1. Only `kl_reduction: batchmean`
(the official reduction) is accepted.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kd_core.distillers.base import START, SoftTargetParams, TeacherDistiller, TrainingPosition
from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import cross_entropy, standardize


@dataclasses.dataclass
class DKDParams(SoftTargetParams):
    # Official defaults (mdistiller cfg.DKD): CE_WEIGHT 1, ALPHA 1, BETA 8, T 4, WARMUP 20.
    T: float = 4.0
    w_ce: float = 1.0
    w_tckd: float = 1.0  # alpha
    w_nckd: float = 8.0  # beta
    warmup_epochs: float = 20.0  # epochs of the linear warm-up of the KD part; 0: none

    def validate(self) -> None:
        super().validate()
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.kl_reduction != "batchmean":
            raise ValueError("DKD sums its KLs over classes and averages over the batch, as the official code "
                             f"does: kl_reduction must be 'batchmean', got {self.kl_reduction!r}")


def warmup_factor(epoch: int, warmup: float) -> float:
    """min(epoch / warmup, 1) for a 1-based epoch; 1 when warmup is 0."""
    return 1.0 if warmup == 0 else min(epoch / warmup, 1.0)


def non_target(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`values` (N, C) without each row's target column: (N, C - 1), order kept."""
    keep = torch.ones_like(values, dtype=torch.bool).scatter_(1, labels[:, None], False)
    return values[keep].view(values.shape[0], -1)


def _binary_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """[log p_gt, log(1 - p_gt)] of softmax(logits / T): (N, 2) for logits (N, C)."""
    log_p = F.log_softmax(logits / temperature, dim=1)
    log_gt = log_p.gather(1, labels[:, None])
    log_rest = non_target(log_p, labels).logsumexp(dim=1, keepdim=True)
    return torch.cat([log_gt, log_rest], dim=1)


def _kl_batchmean(log_p_teacher: torch.Tensor, log_p_student: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of (N, K) log-probabilities, summed over K and averaged over N."""
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1).mean()


def tckd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """TCKD: T^2 * KL(b_t || b_s), b = [p_gt, 1 - p_gt] of softmax(z / T), averaged over the batch.

    student_logits, teacher_logits: (N, C); labels: (N,) int64. Returns a 0-dim tensor; the
    teacher side is detached.
    """
    log_b_student = _binary_log_probs(student_logits, labels, temperature)
    log_b_teacher = _binary_log_probs(teacher_logits.detach(), labels, temperature)
    return _kl_batchmean(log_b_teacher, log_b_student) * temperature**2


def nckd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """NCKD: T^2 * KL(q_t || q_s), q = softmax over the C - 1 non-target logits / T, averaged over
    the batch.

    student_logits, teacher_logits: (N, C), C >= 2; labels: (N,) int64. Returns a 0-dim tensor;
    the teacher side is detached.
    """
    log_q_student = F.log_softmax(non_target(student_logits, labels) / temperature, dim=1)
    log_q_teacher = F.log_softmax(non_target(teacher_logits.detach(), labels) / temperature, dim=1)
    return _kl_batchmean(log_q_teacher, log_q_student) * temperature**2


@DISTILLERS.register("dkd")
class DKDDistiller(TeacherDistiller):
    Params = DKDParams
    logit_sources = True

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (teacher_logits,) = self.source_logits(images)
        logits = self.student(images)
        p = self.params
        student_z, teacher_z = logits, teacher_logits
        if p.logit_standardization:
            student_z, teacher_z = standardize(logits), standardize(teacher_logits)
        warm = warmup_factor(position.epoch, p.warmup_epochs)
        return logits, {
            "ce": cross_entropy(logits, labels),
            "tckd": warm * tckd_loss(student_z, teacher_z, labels, p.T),
            "nckd": warm * nckd_loss(student_z, teacher_z, labels, p.T),
        }
