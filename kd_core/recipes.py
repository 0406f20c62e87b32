"""Named training recipes: optimizer, schedule, epochs and batch size.

A spec names a recipe and may override any field (`recipe: {name: digits, epochs: 10}`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from kd_core.registry import Registry

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "multistep", "constant")
MAX_EPOCHS = 100_000  # sane upper bounds: a larger value is a typo (1e12), not a plan
MAX_BATCH_SIZE = 65_536


@dataclasses.dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        problems = []
        for name, low, high in (("epochs", 1, MAX_EPOCHS), ("batch_size", 1, MAX_BATCH_SIZE)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name} must be a whole number, got {value!r}")
            elif value < low:
                problems.append(f"{name} must be >= {low}, got {value}")
            elif value > high:
                problems.append(f"{name} must be <= {high} (a sane upper bound), got {value}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be >= 0 and < 1, got {self.momentum}")
        elif self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            problems.append("nesterov needs momentum > 0 (got momentum 0): set momentum > 0 or nesterov: false")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            problems.append(f"gamma must be > 0, got {self.gamma}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        self._check_builds()

    def _check_builds(self) -> None:
        """Build the optimizer and schedule once on a dummy parameter, so a combination torch
        refuses fails here, where the recipe is given, not in a training process."""
        try:
            self.make_scheduler(self.make_optimizer([nn.Parameter(torch.zeros(1))]))
        except (ValueError, TypeError, RuntimeError) as error:
            raise ValueError(f"the optimizer or schedule cannot be built: {error}") from None

    def with_overrides(self, overrides: dict[str, Any]) -> Recipe:
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(
                f"unknown recipe field {', '.join(map(repr, unknown))} (known: {', '.join(known)})"
            )
        return dataclasses.replace(self, **overrides)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    def make_optimizer(self, params: list[nn.Parameter] | list[dict[str, Any]]) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                weight_decay=self.weight_decay,
            )
        optimizer_class = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
        return optimizer_class(params, lr=self.lr, weight_decay=self.weight_decay)

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """A per-epoch schedule."""
        if self.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)
        if self.schedule == "multistep":
            return torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=list(self.milestones), gamma=self.gamma
            )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


RECIPES: Registry = Registry("recipe")
RECIPES.register("digits")(
    Recipe(epochs=20, batch_size=64, lr=0.05, nesterov=True, weight_decay=5e-4)
)
# CRD/RepDistiller CIFAR-100 protocol.
RECIPES.register("crd")(
    Recipe(epochs=240, batch_size=64, lr=0.05, weight_decay=5e-4, schedule="multistep",
           milestones=(150, 180, 210))
)
RECIPES.register("adam")(
    Recipe(epochs=20, batch_size=64, lr=1e-3, optimizer="adam", weight_decay=0.0)
)


def build_recipe(name: str, overrides: dict[str, Any] | None = None) -> Recipe:
    return RECIPES.get(name).with_overrides(dict(overrides or {}))
