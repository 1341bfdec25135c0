"""The README's hyperparameter tables list exactly every algorithm's schema: key, default, range and meaning."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rl_service.core.algorithms.hyperparams import Param, format_value
from rl_service.core.algorithms.registry import ALGORITHMS
from rl_service.core.algorithms.schemas import SERVICE

README = Path(__file__).resolve().parents[2] / "README.md"
SHARED_HEADING = "### Keys every algorithm takes"


def row(param: Param) -> str:
    """The README row of one key, as the tables write it (floats in their shortest form: 1e-05, 0)."""
    default = param.default
    text = f"{default:g}" if isinstance(default, float) else format_value(default)
    return f"| `{param.name}` | `{text}` | {param.describe_range()} | {param.help} |"


def table_after(heading: str) -> list[str]:
    """The rows of the first table under a heading line that starts with `heading`."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("| Key |"))
    rows = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


@pytest.mark.parametrize("key", sorted(ALGORITHMS))
def test_each_algorithm_table_lists_its_schema(key: str) -> None:
    spec = ALGORITHMS[key]
    shared = {p.name for p in SERVICE}
    expected = [row(p) for p in sorted(spec.schema.params, key=lambda p: p.name) if p.name not in shared]
    assert table_after(f"### {spec.name} (action spaces") == expected


def test_the_shared_table_lists_the_service_keys() -> None:
    assert table_after(SHARED_HEADING) == [row(p) for p in sorted(SERVICE, key=lambda p: p.name)]


def test_every_algorithm_has_a_section() -> None:
    headings = set(re.findall(r"^### (\w+) \(action spaces", README.read_text(), flags=re.MULTILINE))
    assert headings == {spec.name for spec in ALGORITHMS.values()}
