"""Pure loss functions with the canonical semantics (docs/spec.md#methods; per-method choices in docs/methods.md).

KD_T(z_s, z_t) = T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), the teacher side detached.
`batchmean` sums KL over classes and averages over the batch; `mean` averages over every
element (batchmean / num_classes), as some official codes (TAKD, DGKD) do.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

KLReduction = Literal["batchmean", "mean"]
KL_REDUCTIONS: tuple[str, ...] = ("batchmean", "mean")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    reduction: KLReduction = "batchmean",
    *,
    detach_teacher: bool = True,
) -> torch.Tensor:
    """Temperature-scaled KL from the teacher to the student, times T^2.

    The teacher side is detached unless `detach_teacher=False` (SFTN trains its teacher
    through this term).
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
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
