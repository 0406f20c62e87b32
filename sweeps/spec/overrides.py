"""`--set PATH=VALUE`: one value of a spec changed on the command line, without a copied spec.

Overrides are applied to the spec's parsed YAML mapping *before* it is validated, so the result
is checked exactly as a spec file with those values would be. PATH is dotted keys into the
mapping (`sweep.num_trials`, `teacher.recipe.epochs`, `data.name`); a list item is its index
(`assistants.0.args.width`). The keys of `search` are dotted paths themselves
(`search.method.T.low`: the parameter `method.T`, its `low`): the longest existing key wins,
and a new key under `search` takes the whole rest of the path (`search.method.T={low: 1, high: 8}`).
VALUE is YAML read by the spec reader's rules (YAML 1.2 numbers, no duplicate keys, no alias
bombs): `4`, `5e-4`, `true`, `null`, `fashion_mnist`, `[accuracy, params]`, `{low: 1, high: 8}`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from sweeps.spec.coerce import SpecError, clip
from sweeps.spec.reader import parse_yaml_text, read_yaml

MAX_ITEM_CHARS = 10_000  # one --set item; a longer one is a mistake
DOTTED_KEYS = ("search",)  # top-level blocks whose keys are dotted paths themselves


def top_level_keys() -> list[str]:
    """The keys a spec may have at its top level (`SweepSpec`'s fields)."""
    from sweeps.spec.schema import SweepSpec  # imports torch: only when overrides are given

    return list(SweepSpec.model_fields)


def parse_value(text: str) -> Any:
    """VALUE of a `--set` item as YAML, read as spec files are (`reader.parse_yaml_text`); an empty
    text is null. Raises SpecError for invalid YAML, a duplicate key or an alias bomb."""
    return parse_yaml_text(text)


def parse_item(item: str) -> tuple[list[str], Any]:
    """`PATH=VALUE` -> (PATH's dotted parts, VALUE parsed); SpecError naming the item when
    malformed (no `=`, an empty key, invalid YAML)."""
    try:
        if len(item) > MAX_ITEM_CHARS:
            raise SpecError(f"{len(item):,} characters; one --set item is at most {MAX_ITEM_CHARS:,}")
        path, equals, value = item.partition("=")
        path = path.strip()
        if not equals or not path:
            raise SpecError("expected PATH=VALUE, e.g. sweep.num_trials=4")
        parts = path.split(".")
        if any(not part.strip() for part in parts):
            raise SpecError(f"empty key in the path {path!r}")
        return [part.strip() for part in parts], parse_value(value)
    except SpecError as error:
        raise SpecError(f"--set {clip(item)}: {error}") from None


def _key(mapping: dict[Any, Any], parts: list[str], dotted: bool) -> tuple[str, int]:
    """The key of `mapping` that the path `parts` starts with and how many parts it takes: the
    longest existing dotted key, else one part (all of them in a block of dotted keys)."""
    for taken in range(len(parts), 0, -1):
        if ".".join(parts[:taken]) in mapping:
            return ".".join(parts[:taken]), taken
    return (".".join(parts), len(parts)) if dotted else (parts[0], 1)


def set_value(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Put `value` at the dotted path `parts` of `data` (in place), creating missing mappings.
    Raises ValueError naming where the path cannot go (a value that is not a mapping, a list
    index out of range)."""
    node: Any = data
    done: list[str] = []
    while True:
        if isinstance(node, dict):
            key, taken = _key(node, parts, dotted=len(done) == 1 and done[0] in DOTTED_KEYS)
            parts = parts[taken:]
            if not parts:
                node[key] = value
                return
            if node.get(key) is None:  # absent or null (`teacher:` left empty): a new mapping
                node[key] = {}
            node, done = node[key], [*done, key]
        elif isinstance(node, list):
            index = parts[0]
            if not index.isdigit() or int(index) >= len(node):
                raise ValueError(f"{'.'.join(done)} is a list of {len(node)}: {index!r} is not an index in it "
                                 f"(0 to {len(node) - 1})")
            parts = parts[1:]
            if not parts:
                node[int(index)] = value
                return
            node, done = node[int(index)], [*done, index]
        else:
            raise ValueError(f"{'.'.join(done)} is {clip(repr(node))}, not a mapping: it has no key {parts[0]!r}")


def apply_overrides(data: Any, items: Sequence[str], source: str = "spec") -> dict[str, Any]:
    """A copy of a spec's parsed YAML with each `PATH=VALUE` item applied, in order (a later item
    wins). Raises SpecError naming the item (`--set foo=1: ...`) for a malformed item, an unknown
    top-level key or a path that cannot be followed; the values are validated later, with the spec."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a sweep spec must be a YAML mapping")
    data = copy.deepcopy(data)
    known = top_level_keys()
    for item in items:
        parts, value = parse_item(item)
        if parts[0] not in known:
            raise SpecError(f"--set {clip(item)}: unknown top-level key {clip(repr(parts[0]))} "
                            f"(known: {', '.join(known)})")
        try:
            set_value(data, parts, value)
        except ValueError as error:
            raise SpecError(f"--set {clip(item)}: {error}") from None
    return data


def overridden_yaml(path: Path, items: Sequence[str]) -> str:
    """The spec file at `path` with the items applied, as YAML text: what a cluster job runs
    (`kdsweep submit --set`). Raises SpecError as `read_yaml` and `apply_overrides` do."""
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    data = apply_overrides(read_yaml(path), items, str(path))
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)  # key order kept: `when` depends on it
