"""Compiled run policies kept for Act and export, reloaded when a newer checkpoint, final or best model lands."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rl_service.core.models.checkpoints import checkpoint_timesteps
from rl_service.core.models.served_policy import ServedPolicy


@dataclass(frozen=True)
class LoadedPolicy:
    """A compiled policy and which file, version and timesteps it came from."""

    path: str
    version: int  # what tells two contents of one path apart: the best model's evaluation timesteps, else 0
    timesteps: int
    served: ServedPolicy


class ActCache:
    """(run_id, model choice) -> LoadedPolicy; loads lazily, reloads when the run serves a new file, bounded.

    Checkpoints and final models are written once under unique names (checkpoint_<timesteps>_steps.zip, a model
    path that is never overwritten), so a cached path is never stale and a hit touches no file: Act's hot path.
    The best model is replaced in place; its version (the timesteps of the evaluation that made it) tells.
    """

    def __init__(self, max_entries: int = 32) -> None:
        self._entries: dict[tuple[str, str], LoadedPolicy] = {}
        self._lock = threading.Lock()
        self._max_entries = max_entries

    def forget(self, run_id: str) -> None:
        """Drop a run's entries (every model choice)."""
        with self._lock:
            for key in [key for key in self._entries if key[0] == run_id]:
                del self._entries[key]

    def get(self, run_id: str, choice: str, path: str, version: int, timesteps: int,
            load: Callable[[Path], ServedPolicy]) -> LoadedPolicy:
        """The policy stored at `path`, loading it with `load` unless it is the cached one (FileNotFoundError if
        gone)."""
        key = (run_id, choice)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.path == path and entry.version == version:
                return entry
        served = load(Path(path))
        steps = checkpoint_timesteps(path)
        loaded = LoadedPolicy(path, version, timesteps if steps is None else steps, served)
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = loaded
            while len(self._entries) > self._max_entries:
                self._entries.pop(next(iter(self._entries)))  # the least recently loaded
        return loaded
