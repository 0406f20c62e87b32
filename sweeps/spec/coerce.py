"""Values coerced to the types a factory or dataclass declares; errors name the field."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError


class SpecError(ValueError):
    """A user error in a sweep spec or argument; the message names the problem."""


class Strict(BaseModel):
    """A spec block: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def dataclass_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a dataclass with type coercion; errors name the field."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"unknown field {', '.join(map(repr, unknown))} (known: {', '.join(known)})"
        )
    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as error:
        raise ValueError(format_errors(error, sep="; ")) from None


def factory_args(factory: Any, args: dict[str, Any], fixed: tuple[str, ...] = ()) -> dict[str, Any]:
    """`args` checked against a factory's signature, coerced to its type hints, defaults filled
    in (so equal settings always look equal, e.g. in stage keys)."""
    parameters = {name: p for name, p in inspect.signature(factory).parameters.items() if name not in fixed}
    unknown = sorted(set(args) - set(parameters))
    if unknown:
        raise ValueError(f"unknown argument {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(parameters) or 'none'})")
    hints = typing.get_type_hints(factory, include_extras=True)  # keeps Annotated bounds
    resolved = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    for name, value in args.items():
        try:
            resolved[name] = TypeAdapter(hints.get(name, Any)).validate_python(value)
        except ValidationError as error:
            raise ValueError(f"{name}: {format_errors(error, sep='; ')}") from None
    missing = [name for name in parameters if name not in resolved]
    if missing:
        raise ValueError(f"missing argument {', '.join(map(repr, missing))}")
    return resolved


def format_errors(error: ValidationError, sep: str = "\n") -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return sep.join(lines)
