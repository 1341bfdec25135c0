"""A run's episode history (MODELS_DIR/<run_id>/history.json, written by the worker), served page by page."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl_service.core.errors import InvalidRequest

# Episodes per GetRunHistory page: about 3 MB on the wire, well under the default message cap.
MAX_HISTORY_PAGE = 100_000


@dataclass(frozen=True)
class Episode:
    """One finished episode: its return, its length, when it ended (seconds since training started, timesteps)."""

    reward: float
    length: int
    time: float
    timesteps: int


@dataclass(frozen=True)
class HistoryPage:
    """Episodes [offset, offset + len(episodes)) of a run that has recorded total_episodes so far."""

    run_id: str
    episodes: list[Episode]
    total_episodes: int
    offset: int


def read_history(path: Path, run_id: str, offset: int, limit: int) -> HistoryPage:
    """One page of the history file; a missing file (run not started, no checkpoint yet) is an empty history."""
    if offset < 0:
        raise InvalidRequest(f"offset: must be 0 or more, got {offset}", field="offset")
    if limit < 0:
        raise InvalidRequest(f"limit: must be 0 (the server's maximum) or more, got {limit}", field="limit")
    size = min(limit or MAX_HISTORY_PAGE, MAX_HISTORY_PAGE)
    entries = load_entries(path)
    page = [_episode(entry) for entry in entries[offset:offset + size]]
    return HistoryPage(run_id=run_id, episodes=page, total_episodes=len(entries), offset=offset)


def load_entries(path: Path) -> list[Any]:
    """The episode entries of a history file (none when it is missing)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    episodes = data.get("episodes", []) if isinstance(data, dict) else []
    return episodes if isinstance(episodes, list) else []


def _episode(entry: Any) -> Episode:
    return Episode(reward=float(entry.get("reward", 0.0)), length=int(entry.get("length", 0)),
                   time=float(entry.get("time", 0.0)), timesteps=int(entry.get("timesteps", 0)))
