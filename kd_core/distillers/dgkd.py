"""DGKD: densely guided KD with teacher assistants (Son et al., ICCV 2021).

Assistants A1..An (largest first) are stages: A_i learns from {T, A1..A(i-1)}, the student
from {T, A1..An}. Loss: w_ce * CE + w_kd * sum over kept sources of KD_T. Stochastic
teaching drops sources per mini-batch (`bernoulli` or `drop_k`), never all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from kd_core.distillers.base import START, Distiller, MethodParams, SoftTargetParams, TrainingPosition
from kd_core.distillers.registry import DISTILLERS
from kd_core.losses import cross_entropy, kd_loss
from kd_core.models.base import StagedModel
from kd_core.stages import SourcePlan, StageSpec

DROP_MODES = ("none", "bernoulli", "drop_k")


@dataclasses.dataclass
class DGKDParams(SoftTargetParams):
    # Defaults of the official code: T=5, KD weight 1, CE weight 0, 3 assistants, mean KL.
    T: float = 5.0
    kl_reduction: str = "mean"
    w_ce: float = 0.0
    w_kd: float = 1.0
    num_assistants: int = 3
    drop_mode: str = "drop_k"
    keep_prob: float = 0.75  # bernoulli: each link kept with this probability (paper best)
    drop_k: int = 1  # drop_k: exactly this many links removed per batch
    drop_teacher: bool = True  # whether the teacher link may be dropped

    def validate(self) -> None:
        super().validate()
        if self.num_assistants < 0:
            raise ValueError(f"num_assistants must be >= 0, got {self.num_assistants}")
        if self.drop_mode not in DROP_MODES:
            raise ValueError(f"drop_mode must be one of {', '.join(DROP_MODES)}, got {self.drop_mode!r}")
        if not 0 < self.keep_prob <= 1:
            raise ValueError(f"keep_prob must be in (0, 1], got {self.keep_prob}")
        if self.drop_k < 0:
            raise ValueError(f"drop_k must be >= 0, got {self.drop_k}")


def keep_mask(num_sources: int, params: DGKDParams, generator: torch.Generator | None = None) -> list[bool]:
    """Which sources teach this mini-batch. Source 0 is the teacher; at least one is kept."""
    droppable = list(range(num_sources)) if params.drop_teacher else list(range(1, num_sources))
    keep = [True] * num_sources
    if params.drop_mode == "bernoulli":
        draws = torch.rand(num_sources, generator=generator)
        for i in droppable:
            keep[i] = bool(draws[i] < params.keep_prob)
        if not any(keep):
            keep[droppable[int(torch.randint(len(droppable), (1,), generator=generator))]] = True
    elif params.drop_mode == "drop_k":
        k = min(params.drop_k, len(droppable), num_sources - 1)  # never every source
        for position in torch.randperm(len(droppable), generator=generator)[:k].tolist():
            keep[droppable[position]] = False
    return keep


@DISTILLERS.register("dgkd")
class DGKDDistiller(Distiller):
    Params = DGKDParams
    logit_sources = True

    def __init__(self, student: StagedModel, sources: Sequence[StagedModel], params: DGKDParams) -> None:
        super().__init__(student, sources, params)
        if not self.sources:
            raise ValueError("DGKDDistiller needs the teacher as its first source")

    @classmethod
    def source_stages(cls, params: MethodParams, plan: SourcePlan) -> list[StageSpec]:
        """[T, A1..An]; A_i is itself a DGKD stage learning from [T, A1..A(i-1)]."""
        assert isinstance(params, DGKDParams)
        fixed = plan.fixed_params_of(DGKDParams)
        stages = [plan.require_teacher()]
        for i, arch in enumerate(plan.require_assistants(params.num_assistants)):
            # Fixed values only, so every trial with >= i+1 assistants shares A_{i+1}.
            assistant_params = {**fixed, "num_assistants": i}
            stages.append(plan.stage("assistant", arch, "dgkd", assistant_params, parents=tuple(stages)))
        return stages

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p = self.params
        logits = self.student(images)
        keep = keep_mask(len(self.sources), p)
        kept_logits = self.source_logits(images, only=[i for i, kept in enumerate(keep) if kept])
        kd = sum(kd_loss(logits, source_logits, p.T, p.kl_reduction, logit_standardization=p.logit_standardization)
                 for source_logits in kept_logits)
        return logits, {"ce": cross_entropy(logits, labels), "kd": kd}
