"""The shape of the code base: module sizes, the import graph, and what is defined in one place."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kd_core", "sweeps", "cluster")
MAX_LINES = 300  # per module in sweeps/ and cluster/


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Project modules `name` imports anywhere in its file (function bodies and TYPE_CHECKING too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            # `from a import b` imports the module a.b when there is one, else names of a.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES)
    found.discard(name)
    return found


def external_imports(name: str) -> set[str]:
    """Top-level names of every module `name` imports (anywhere in its file)."""
    tops = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            tops.add(node.module.split(".")[0])
    return tops


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith(("sweeps", "cluster"))])
def test_no_module_in_sweeps_or_cluster_is_over_the_limit(name) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines (limit {MAX_LINES}): split it"


def test_the_import_graph_has_no_cycle() -> None:
    graph = {name: imports_of(name) for name in MODULES}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert graph["sweeps.spec.checks"] >= {"sweeps.sources", "sweeps.spec.schema"}  # the walk sees real edges


def test_kd_core_imports_neither_ray_optuna_nor_mlflow() -> None:
    for name in (n for n in MODULES if n.startswith("kd_core")):
        assert not external_imports(name) & {"ray", "optuna", "mlflow", "sweeps", "cluster"}, name
    every = "; ".join(f"import {n}" for n in MODULES if n.startswith("kd_core"))
    check = f"import sys; {every}; print(sorted({{'ray', 'optuna', 'mlflow'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_sweeps_and_cluster_meet_only_in_the_command_line() -> None:
    for name in MODULES:
        targets = {t.split(".")[0] for t in imports_of(name)}
        if name.startswith("cluster"):
            assert "sweeps" not in targets, name
        elif name.startswith("sweeps") and not name.startswith("sweeps.cli"):
            assert "cluster" not in targets, name


def string_constants(name: str) -> list[str]:
    """Every string constant of the module except docstrings (which may name addresses)."""
    tree = ast.parse(MODULES[name].read_text())
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, documented) and node.body and isinstance(node.body[0], ast.Expr)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_tag_names_and_the_loopback_address_are_defined_once() -> None:
    for name in MODULES:
        for value in string_constants(name):
            if name != "sweeps.tags":
                assert not (value.startswith("kdsweep.") and value[8:].replace("_", "").isalpha()), \
                    f"{name}: tag literal {value!r} (use sweeps.tags)"
            if name != "cluster.addresses":
                assert "127.0.0.2" not in value, f"{name}: loopback address literal (use cluster.addresses)"


def test_worker_threads_are_set_in_one_place() -> None:
    callers = [name for name in MODULES if "set_num_threads" in MODULES[name].read_text()]
    assert callers == ["sweeps.pipeline"]
