"""Values coerced to the types a factory or dataclass declares; errors name the field."""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

MAX_QUOTE = 200  # characters of a user's value quoted in an error message


class SpecError(ValueError):
    """A user error in a sweep spec or argument; the message names the problem."""


def clip(text: str, limit: int = MAX_QUOTE) -> str:
    """`text` cut to `limit` characters (saying how long it was): errors quote user values,
    and a huge value must not become a huge message."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _wants_int(hint: Any) -> bool:
    """Whether a type hint means a whole number (int, Annotated[int, ...], int | None), not a float."""
    if typing.get_origin(hint) is typing.Annotated:
        return _wants_int(typing.get_args(hint)[0])
    if hint is int:
        return True
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    return any(_wants_int(o) for o in options) and float not in options


def refuse_float_for_int(name: str, hint: Any, value: Any) -> None:
    """A float where a whole number is meant (`batch_size: 64.0`, `1.0e+12`) is refused, not
    silently truncated: ValueError naming the field."""
    if isinstance(value, float) and _wants_int(hint):
        raise ValueError(f"{name}: {clip(repr(value))} is a float where a whole number is meant")


class Strict(BaseModel):
    """A spec block: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def dataclass_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a dataclass with type coercion; errors name the field."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"unknown field {clip(', '.join(map(repr, unknown)))} (known: {', '.join(known)})"
        )
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except (NameError, TypeError):  # a hint that cannot be resolved here: pydantic still checks
        hints = {}
    for name, value in values.items():
        try:
            refuse_float_for_int(name, hints.get(name), value)
        except ValueError as error:
            if not (math.isfinite(value) and value.is_integer()):
                raise
            try:  # say what else is wrong with it (a bound: `batch_size: 1e12`) in the same message
                dataclass_from_dict(cls, {**values, name: int(value)})
            except ValueError as more:
                raise ValueError(f"{error}; {more}") from None
            raise
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
        raise ValueError(f"unknown argument {clip(', '.join(map(repr, unknown)))} "
                         f"(known: {', '.join(parameters) or 'none'})")
    hints = typing.get_type_hints(factory, include_extras=True)  # keeps Annotated bounds
    resolved = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    for name, value in args.items():
        refuse_float_for_int(name, hints.get(name), value)
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
