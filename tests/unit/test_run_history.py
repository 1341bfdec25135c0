"""A run's history file served in pages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl_service.core.errors import InvalidRequest
from rl_service.core.runs.history import MAX_HISTORY_PAGE, Episode, read_history


def _write(path: Path, count: int) -> None:
    episodes = [{"reward": float(i), "length": i + 1, "time": i / 10, "timesteps": 10 * (i + 1)} for i in range(count)]
    path.write_text(json.dumps({"run_id": "run-x", "episodes": episodes}))


def test_pages(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    _write(path, 25)
    full = read_history(path, "run-x", 0, 0)
    assert full.total_episodes == 25 and len(full.episodes) == 25 and full.offset == 0
    assert full.episodes[3] == Episode(reward=3.0, length=4, time=0.3, timesteps=40)
    page = read_history(path, "run-x", 20, 10)
    assert page.offset == 20 and [e.reward for e in page.episodes] == [20.0, 21.0, 22.0, 23.0, 24.0]
    assert read_history(path, "run-x", 30, 0).episodes == []


def test_page_size_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    _write(path, MAX_HISTORY_PAGE + 3)
    page = read_history(path, "run-x", 0, MAX_HISTORY_PAGE * 2)
    assert len(page.episodes) == MAX_HISTORY_PAGE and page.total_episodes == MAX_HISTORY_PAGE + 3


def test_no_file_yet_is_an_empty_history(tmp_path: Path) -> None:
    page = read_history(tmp_path / "missing.json", "run-x", 0, 0)
    assert page.episodes == [] and page.total_episodes == 0


@pytest.mark.parametrize(("offset", "limit", "field"), [(-1, 0, "offset"), (0, -5, "limit")])
def test_negative_offset_or_limit_is_invalid(tmp_path: Path, offset: int, limit: int, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        read_history(tmp_path / "history.json", "run-x", offset, limit)
    assert info.value.field == field
