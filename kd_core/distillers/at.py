"""AT: attention transfer (Zagoruyko & Komodakis, ICLR 2017), as in the CRD benchmark (official
code HobbitLong/RepDistiller: distiller_zoo/AT.py `Attention`, train_student.py `--distill
attention -a 0 -b 1000`; the same in megvii-research/mdistiller, mdistiller/distillers/AT.py,
cfg.AT: P 2, FEAT_WEIGHT 1000, CE_WEIGHT 1).

The attention map of a feature map f (N, C, H, W) is the L2-normalised, flattened mean over
channels of |f|^p, (N, H * W). For each paired student and teacher stage the loss is the mean
of the squared difference of the two maps (the larger map first adaptive-average-pooled to the
smaller size); the `at` term is the SUM over the pairs, as both official codes sum it (their
weight 1000 was tuned for the sum). Loss: w_ce * CE + w_at * AT. The deployable is the student.

Pairs (`pairing`), over the staged interface's stage outputs:
- `index` (default, the official behaviour): stage i with stage i, from the first stage, as
  far as the model with fewer stages goes (Python's zip over RepDistiller's feat[1:-1]).
- `resolution`: for every spatial size both models produce, the last stage of that size in
  each; a stage whose size the other model never has is left out. Better suited to pairs of
  different families (vgg13 -> MobileNetV2: 5 vs 4 stages, first sizes 32 vs 16).

Deviations: |f|^p rather than f^p, the paper's definition (equal for the default p = 2, and
defined for any p > 0 on signed, pre-activation features); RepDistiller's vgg feat[0] is its
first block, so its feat[1:-1] leaves that block out, while `index` pairs start at stages[0]
for every family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kd_core.distillers.base import START, MethodParams, TeacherDistiller, TrainingPosition
from kd_core.distillers.fitnets import features_and_logits, pool_to_smaller
from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import cross_entropy

PAIRINGS = ("index", "resolution")


@dataclasses.dataclass
class ATParams(MethodParams):
    p: float = 2.0  # exponent of the attention map (official 2)
    pairing: str = "index"  # which student and teacher stages are compared (module docstring)
    w_ce: float = 1.0
    w_at: float = 1000.0  # RepDistiller -b 1000, mdistiller FEAT_WEIGHT

    def validate(self) -> None:
        super().validate()
        if self.p <= 0:
            raise ValueError(f"p must be > 0, got {self.p}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got {self.pairing!r}")


def attention_map(features: torch.Tensor, p: float) -> torch.Tensor:
    """normalize(mean over channels of |f|^p), (N, H * W) for features (N, C, H, W); unit L2 rows."""
    return F.normalize(features.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, p: float) -> torch.Tensor:
    """Mean over (N, H * W) of (at(f_s) - at(f_t))^2, the larger map pooled to the smaller size.

    student_features (N, C_s, H_s, W_s), teacher_features (N, C_t, H_t, W_t): channels may
    differ. Returns a 0-dim tensor; the teacher side is detached.
    """
    f_s, f_t = pool_to_smaller(student_features, teacher_features.detach())
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


def stage_pairs(
    student_sizes: Sequence[tuple[int, int]], teacher_sizes: Sequence[tuple[int, int]], pairing: str
) -> list[tuple[int, int]]:
    """(student stage, teacher stage) index pairs from each model's stage output sizes (H, W).

    `index`: (i, i) for i below the smaller stage count. `resolution`: for every size both
    lists contain, (last student stage of that size, last teacher stage of that size), in the
    student's stage order. ValueError when no pair is found.
    """
    if pairing == "index":
        pairs = [(i, i) for i in range(min(len(student_sizes), len(teacher_sizes)))]
    else:
        last_student = {size: i for i, size in enumerate(student_sizes)}
        last_teacher = {size: i for i, size in enumerate(teacher_sizes)}
        pairs = sorted((i, last_teacher[size]) for size, i in last_student.items() if size in last_teacher)
    if not pairs:
        raise ValueError(f"AT found no stage pair: student stage sizes {list(student_sizes)}, teacher "
                         f"stage sizes {list(teacher_sizes)} (pairing {pairing!r}; try pairing 'index')")
    return pairs


@DISTILLERS.register("at")
class ATDistiller(TeacherDistiller):
    Params = ATParams

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            teacher_features = self.sources[0].stage_outputs(images)
        student_features, logits = features_and_logits(self.student, images)
        p = self.params
        pairs = stage_pairs([tuple(f.shape[-2:]) for f in student_features],
                            [tuple(f.shape[-2:]) for f in teacher_features], p.pairing)
        at = torch.stack([at_loss(student_features[i], teacher_features[j], p.p) for i, j in pairs]).sum()
        return logits, {"ce": cross_entropy(logits, labels), "at": at}
