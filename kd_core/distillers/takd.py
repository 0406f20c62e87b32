"""TAKD: KD through a chain of teacher assistants (Mirzadeh et al., AAAI 2020).

T -> A1 -> ... -> An -> S; each link is vanilla KD from the next larger model only, so the
student learns from An alone (from T when n = 0). Assistants are stages, trained in order.
"""

from __future__ import annotations

import dataclasses

from kd_core.distillers.base import MethodParams
from kd_core.distillers.kd import KDDistiller, KDParams
from kd_core.distillers.registry import DISTILLERS
from kd_core.stages import SourcePlan, StageSpec


@dataclasses.dataclass
class TAKDParams(KDParams):
    num_assistants: int = 1

    def validate(self) -> None:
        super().validate()
        if self.num_assistants < 0:
            raise ValueError(f"num_assistants must be >= 0, got {self.num_assistants}")


@DISTILLERS.register("takd")
class TAKDDistiller(KDDistiller):
    Params = TAKDParams

    @classmethod
    def source_stages(cls, params: MethodParams, plan: SourcePlan) -> list[StageSpec]:
        """[An], where A_i is a KD stage from A_(i-1) (A_0 = the teacher)."""
        assert isinstance(params, TAKDParams)
        link_params = plan.fixed_params_of(KDParams)  # fixed values: every trial shares the chain
        parent = plan.require_teacher()
        for arch in plan.require_assistants(params.num_assistants):
            parent = plan.stage("assistant", arch, "kd", link_params, parents=(parent,))
        return [parent]
