"""The README's configuration table names every setting the server reads (docs that stay true)."""

from __future__ import annotations

from pathlib import Path

from rl_service.infra.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_has_a_row_in_the_readme() -> None:
    text = README.read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `")}
    missing = sorted(name.upper() for name in Settings.model_fields if name.upper() not in rows)
    assert not missing, f"README.md has no table row for {missing}"
