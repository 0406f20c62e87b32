"""Reading a spec file safely: UTF-8 text of bounded size, YAML with no duplicate keys and no
alias bombs.

PyYAML shares an aliased value instead of copying it, so nested aliases ("billion laughs") load
fast and small, and explode only later, when the spec is validated, printed or saved: their
expanded size is measured on the composed node graph and refused before anything walks it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from sweeps.spec.coerce import SpecError, clip

MAX_SPEC_BYTES = 1_000_000  # a spec is a page of YAML; more is a mistake (or an attack)
MAX_SPEC_VALUES = 100_000  # values (mapping keys and values, list items) after aliases are expanded
MERGE_TAG = "tag:yaml.org,2002:merge"


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:  # `<<: *base` entries may be overridden: not duplicates
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first is not None:
                raise SpecError(f"duplicate key {clip(repr(key))} at line {line} (first given at line {first}): "
                                "each key may appear once in a mapping")
            lines[key] = line
        return super().construct_mapping(node, deep)


# `1e12` and `5e-4` are numbers, as in YAML 1.2 (PyYAML's YAML 1.1 reads them as strings, so
# `batch_size: 1e12` became a string and `lr: 5e-4` a string coerced later).
_SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


def _expanded_size(node: Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `node` stands for once every alias is copied out; SpecError beyond the
    limit, or for an alias inside its own anchor (a recursive document)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise SpecError("a YAML alias refers to a value that contains it (a recursive document)")
    open_nodes.add(key)
    if isinstance(node, MappingNode):
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, SequenceNode):
        children = list(node.value)
    else:
        children = []
    size = 1
    for child in children:
        size += _expanded_size(child, sizes, open_nodes)
        if size > MAX_SPEC_VALUES:
            raise SpecError(f"YAML aliases expand to more than {MAX_SPEC_VALUES:,} values (nested aliases?): "
                            "write the values out")
    open_nodes.discard(key)
    sizes[key] = size
    return size


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what and where (PyYAML's own text spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return clip(f"{problem}{where}")


def read_yaml(path: Path) -> Any:
    """The parsed YAML of a spec file; SpecError naming the file for an unreadable, oversized,
    non-UTF-8 or invalid file, a duplicate key or an alias bomb."""
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"{path}: {size:,} bytes; a sweep spec is at most {MAX_SPEC_BYTES:,} bytes")
        raw = path.read_bytes()
    except OSError as error:
        raise SpecError(f"{path}: cannot read the spec file: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise SpecError(f"{path}: not UTF-8 text (byte 0x{raw[error.start]:02x} at line {line}); "
                        "save the spec as UTF-8") from None
    try:
        return parse_yaml_text(text)
    except SpecError as error:
        raise SpecError(f"{path}: {error}") from None


def parse_yaml_text(text: str) -> Any:
    """`text` parsed as spec files are (YAML 1.2 numbers, no duplicate keys, bounded aliases);
    None for an empty document. Raises SpecError for invalid YAML, a duplicate key, an alias
    bomb or nesting too deep."""
    loader = _SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise SpecError(f"not valid YAML: {_yaml_problem(error)}") from None
    except RecursionError:
        raise SpecError("YAML nested too deeply") from None
    finally:
        loader.dispose()
