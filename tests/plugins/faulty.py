"""Methods that fail on purpose, for tests of failed-trial handling (a spec plugin)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from kd_core.distillers import DISTILLERS, START, MethodParams, TrainingPosition
from kd_core.distillers.ce import CEDistiller
from kd_core.models import StagedModel


@dataclasses.dataclass
class FaultyParams(MethodParams):
    w_ce: float = 1.0
    fail_after_steps: int = 20  # about the second epoch on digits with batch 64
    marker: str = ""  # "flaky": fail only while this file does not exist (then create it)


class _Counting(CEDistiller):
    Params = FaultyParams

    def __init__(self, student: StagedModel, sources: Sequence[StagedModel], params: FaultyParams) -> None:
        super().__init__(student, sources, params)
        self.steps = 0

    def failing_now(self) -> bool:
        self.steps += 1
        if self.steps <= self.params.fail_after_steps:
            return False
        if self.params.marker:
            marker = Path(self.params.marker)
            if marker.exists():
                return False
            marker.touch()
        return True


@DISTILLERS.register("test_nan")
class NaNAfter(_Counting):
    """CE, then a NaN loss."""

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START):
        logits, terms = super().forward_train(images, labels, position)
        if self.failing_now():
            terms["ce"] = terms["ce"] * float("nan")
        return logits, terms


@DISTILLERS.register("test_raise")
class RaiseAfter(_Counting):
    """CE, then an exception (once only when a marker is given: a flaky failure)."""

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, position: TrainingPosition = START):
        if self.failing_now():
            raise RuntimeError("injected failure")
        return super().forward_train(images, labels, position)
