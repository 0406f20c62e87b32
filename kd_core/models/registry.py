"""The model registry: name -> factory(num_classes, in_channels, **args) -> StagedModel."""

from __future__ import annotations

import inspect
from typing import Any

from kd_core.models.base import StagedModel
from kd_core.registry import Registry

MODELS: Registry = Registry("architecture")

_DATA_ARGS = ("num_classes", "in_channels")


def model_arg_names(name: str) -> list[str]:
    """The free arguments of an architecture (those a spec may set)."""
    params = inspect.signature(MODELS.get(name)).parameters
    return [p for p in params if p not in _DATA_ARGS]


def check_model_args(name: str, args: dict[str, Any]) -> None:
    """Raise ValueError naming any argument the architecture does not take."""
    allowed = model_arg_names(name)
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ValueError(
            f"architecture {name!r} takes no argument {', '.join(map(repr, unknown))}"
            f" (it takes: {', '.join(allowed) or 'none'})"
        )


def build_model(
    name: str, num_classes: int, in_channels: int, args: dict[str, Any] | None = None
) -> StagedModel:
    args = dict(args or {})
    check_model_args(name, args)
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **args)
