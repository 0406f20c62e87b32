"""The sweep spec: YAML -> validated `SweepSpec`. Every error names the offending field.

`load_spec` / `parse_spec` are the only way in: plugins first (`load_plugins`), then the
schema (`schema.py`), then the cross-field checks (`checks.py`). Worker processes receive
the validated spec object and call only `load_plugins`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from sweeps.spec.coerce import SpecError, clip, dataclass_from_dict, factory_args, format_errors
from sweeps.spec.reader import read_yaml
from sweeps.spec.settings import SweepSettings

if TYPE_CHECKING:
    from sweeps.spec.schema import NAME_PATTERN, ArchSpec, ParamSpec, SweepSpec

Resolver = Callable[["SweepSpec"], "SweepSpec"]

# The schema names kd_core's registries, so importing it imports torch (seconds). It is imported
# on first use of one of these names: `SpecError` alone (every command's error handling) stays cheap.
_SCHEMA_NAMES = ("NAME_PATTERN", "ArchSpec", "ParamSpec", "SweepSpec")


def __getattr__(name: str) -> Any:
    if name in _SCHEMA_NAMES:
        from sweeps.spec import schema

        return getattr(schema, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["NAME_PATTERN", "ArchSpec", "ParamSpec", "SpecError", "SweepSettings", "SweepSpec",
           "dataclass_from_dict", "factory_args", "load_plugins", "load_spec", "parse_spec"]


def load_plugins(modules: Iterable[str]) -> None:
    """Import the spec's plugin modules (each registers methods, models or datasets).

    Raises ValueError naming a module that cannot be imported. Importing twice is free.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"plugins: cannot import plugin {module!r}: {error}") from None


def parse_spec(data: Any, source: str = "spec", resolve: Resolver | None = None) -> SweepSpec:
    """A validated spec from parsed YAML; raises SpecError listing every problem found.

    `resolve` runs between the schema and the cross-field checks, for what needs the outside
    world (a `model_uri` teacher resolved in MLflow: `sweeps.pretrained.pin_teacher`).
    """
    from sweeps.spec.checks import check_spec
    from sweeps.spec.schema import SweepSpec

    if not isinstance(data, dict):
        raise SpecError(f"{source}: a sweep spec must be a YAML mapping")
    try:
        plugins = data.get("plugins") or []
        if not isinstance(plugins, list) or not all(isinstance(m, str) for m in plugins):
            raise ValueError("plugins: a list of module names")
        load_plugins(plugins)
        spec = SweepSpec.model_validate(data)
        if resolve is not None:
            spec = resolve(spec)
        check_spec(spec)
    except ValidationError as error:
        raise SpecError(f"invalid sweep spec {source}:\n  " + _bounded(format_errors(error))) from None
    except ValueError as error:
        raise SpecError(f"invalid sweep spec {source}:\n  {_bounded(str(error))}") from None
    return spec


def _bounded(problems: str, lines: int = 10) -> str:
    """At most `lines` problems, each clipped: messages quote the spec's values, which may be huge."""
    found = problems.splitlines()
    more = [f"... and {len(found) - lines} more"] if len(found) > lines else []
    return "\n  ".join([clip(line, 500) for line in found[:lines]] + more)


def load_spec(path: str | Path, resolve: Resolver | None = None, overrides: Iterable[str] = ()) -> SweepSpec:
    """`parse_spec` of a YAML file; raises SpecError for a missing, unreadable or non-UTF-8 file,
    invalid YAML, a duplicate key or an alias bomb (`reader.read_yaml`). `overrides` are
    `--set PATH=VALUE` items, applied before validation (`sweeps.spec.overrides`)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    data, overrides = read_yaml(path), list(overrides)
    if overrides:
        from sweeps.spec.overrides import apply_overrides

        data = apply_overrides(data, overrides, str(path))
    source = f"{path} (with {len(overrides)} --set)" if overrides else str(path)
    return parse_spec(data, source, resolve)
