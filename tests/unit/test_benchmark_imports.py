"""benchmarks/ uses the package's public names only, and every name it imports exists: a refactor of the package
breaks this test, not a benchmark run weeks later (most of their imports sit inside functions)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py"))


def _package_imports(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) for every `from rl_service... import name`, at any depth of the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
                "rl_service", "rl_service_proto"):
            found.extend((node.module, alias.name, node.lineno) for alias in node.names)
    return found


def _attribute_reaches(path: Path) -> list[tuple[str, int]]:
    """Private attributes read off other objects (`manager._get`), which a refactor may remove silently."""
    return [(node.attr, node.lineno) for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_public_names_that_exist(path: Path) -> None:
    for module, name, line in _package_imports(path):
        assert not name.startswith("_"), f"{path.name}:{line} imports the private {module}.{name}"
        assert hasattr(importlib.import_module(module), name), f"{path.name}:{line}: {module} has no {name}"
    assert _attribute_reaches(path) == [], f"{path.name} reads private attributes of the package's objects"


def test_the_check_sees_imports_inside_functions() -> None:
    overhead = Path(__file__).resolve().parents[2] / "benchmarks" / "overhead.py"
    assert ("rl_service.core.runs.worker", "run_worker") in {(m, n) for m, n, _ in _package_imports(overhead)}
