"""Pure loss functions with the canonical semantics (docs/spec.md#methods; per-method choices in docs/methods.md).

KD_T(z_s, z_t) = T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), the teacher side detached.
`batchmean` sums KL over classes and averages over the batch; `mean` averages over every
element (batchmean / num_classes), as some official codes (TAKD, DGKD) do.

Logit standardization (Sun et al., CVPR 2024; official code sunshangquan/logit-standardization-KD,
mdistiller/distillers/KD.py `normalize`) z-scores each logit vector before the temperature:
softmax(standardize(z) / T) for student and teacher alike, so the student matches the teacher's
logit relations rather than their range.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

KLReduction = Literal["batchmean", "mean"]
KL_REDUCTIONS: tuple[str, ...] = ("batchmean", "mean")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


#: Added to the standard deviation, as the official code does: a constant logit vector stays finite.
STANDARDIZE_EPS = 1e-7


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Z-score of each logit vector: (z - mean(z)) / (std(z) + 1e-7) over the classes.

    logits: (N, C), C >= 2; returns (N, C). The std is Bessel-corrected (divides by C - 1) and
    the epsilon is added to it, both as in the official code; the paper writes the population
    std, which differs by a factor sqrt(C / (C - 1)) (0.5% at C = 100), i.e. a slightly
    different temperature.
    """
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + STANDARDIZE_EPS)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    reduction: KLReduction = "batchmean",
    *,
    detach_teacher: bool = True,
    logit_standardization: bool = False,
) -> torch.Tensor:
    """Temperature-scaled KL from the teacher to the student, times T^2.

    student_logits, teacher_logits: (N, C); returns a 0-dim tensor. The teacher side is
    detached unless `detach_teacher=False` (SFTN trains its teacher through this term). With
    `logit_standardization`, both sides are `standardize`d before dividing by T (the T^2
    factor stays, as in the official code).
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    if logit_standardization:
        student_logits, teacher_logits = standardize(student_logits), standardize(teacher_logits)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    if detach_teacher:
        teacher_logits = teacher_logits.detach()
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    # Written out rather than F.kl_div(reduction="mean"), whose meaning PyTorch will change.
    kl_per_sample = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    kl = kl_per_sample.mean()
    if reduction == "mean":
        kl = kl / student_logits.shape[1]
    return kl * temperature**2
