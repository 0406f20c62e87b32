"""The Distiller interface: one stage's trainable modules and its named loss terms.

`forward_train` returns the student logits and a dict of *unweighted* terms; the trainer
multiplies each by `weights[term]`, sums, steps and logs every term. Frozen sources (the
teacher, assistants) run in eval mode under `torch.no_grad()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from kd_core.losses import KL_REDUCTIONS
from kd_core.models.base import StagedModel
from kd_core.stages import SourcePlan, StageSpec


@dataclasses.dataclass
class MethodParams:
    """Base of every method's hyperparameters; subclasses add fields with defaults."""

    def weights(self) -> dict[str, float]:
        """The loss weights, by term name: every field named `w_<term>`."""
        return {
            f.name[2:]: float(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name.startswith("w_")
        }

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on an invalid value; subclasses extend it."""
        for term, weight in self.weights().items():
            if weight < 0:
                raise ValueError(f"w_{term} must be >= 0, got {weight}")


@dataclasses.dataclass
class SoftTargetParams(MethodParams):
    """Base of the params of methods with a KD_T term: its temperature and KL reduction."""

    T: float = 4.0
    kl_reduction: str = "batchmean"

    def validate(self) -> None:
        super().validate()
        if self.T <= 0:
            raise ValueError(f"T must be > 0, got {self.T}")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {', '.join(KL_REDUCTIONS)}, got {self.kl_reduction!r}")


class Distiller(nn.Module):
    """Base class: holds the student and the frozen sources of one stage.

    Hooks a method may override: `source_stages` (which frozen stages it learns from),
    `trainable_modules` / `param_groups` (what the optimizer updates, with lr scales),
    `after_step` (an extra update with the method's own optimizer), `deployable`.
    """

    Params: ClassVar[type[MethodParams]] = MethodParams
    #: Whether the sources' outputs stay fixed during training (cacheable across trials).
    frozen_sources: ClassVar[bool] = True
    #: Whether the sources are read only through `source_logits`, so that logits cached once
    #: per sweep (kd_core.cache) can stand in for their forward pass.
    logit_sources: ClassVar[bool] = False

    def __init__(
        self, student: StagedModel, sources: Sequence[StagedModel], params: MethodParams
    ) -> None:
        super().__init__()
        self.student = student
        self.sources = nn.ModuleList(sources)
        self.params = params
        #: The current batch's source logits from the teacher-output cache, set by `fit`.
        self.cached_source_logits: list[torch.Tensor] | None = None
        for source in self.sources:
            source.requires_grad_(False)
            source.eval()

    def expect_sources(self, count: int) -> None:
        if len(self.sources) != count:
            raise ValueError(f"{type(self).__name__} learns from exactly {count} "
                             f"source{'s' * (count != 1)}, got {len(self.sources)}")

    @classmethod
    def make_params(cls, values: dict[str, Any] | None = None) -> MethodParams:
        """The method's params from a dict; unknown names raise a ValueError naming them."""
        values = dict(values or {})
        known = [f.name for f in dataclasses.fields(cls.Params)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(
                f"unknown parameter {', '.join(map(repr, unknown))} (known: {', '.join(known)})"
            )
        return cls.Params(**values)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        for source in self.sources:
            source.eval()  # frozen sources never leave eval mode
        return self

    @classmethod
    def source_stages(cls, params: MethodParams, plan: SourcePlan) -> list[StageSpec]:
        """The frozen stages this method learns from, in the order `__init__` receives them."""
        return []

    def trainable_modules(self) -> list[nn.Module]:
        """Modules whose parameters the optimizer updates."""
        return [self.student]

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; a group's optional `lr_scale` multiplies the recipe lr."""
        return [{"params": [p for m in self.trainable_modules() for p in m.parameters()]}]

    def after_step(
        self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor
    ) -> dict[str, float]:
        """An extra update after the optimizer step (e.g. a discriminator); returns metrics."""
        return {}

    @property
    def weights(self) -> dict[str, float]:
        return self.params.weights()

    @classmethod
    def can_cache_sources(cls) -> bool:
        return cls.frozen_sources and cls.logit_sources

    @torch.no_grad()
    def source_logits(self, images: torch.Tensor, only: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Logits of the sources (or of those at positions `only`): cached ones when `fit` has
        them for this batch, else a forward pass of each."""
        chosen = range(len(self.sources)) if only is None else only
        if self.cached_source_logits is not None:
            return [self.cached_source_logits[i] for i in chosen]
        return [self.sources[i](images) for i in chosen]

    def forward_train(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the deployable model."""
        return self.student(images)

    def deployable(self) -> nn.Module:
        """The module exported after training (the student, for most methods)."""
        return self.student
