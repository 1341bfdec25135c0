"""Trained run policies loaded for Act, reloaded when a newer checkpoint or the final model lands."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl_service.core.algorithms.registry import get_algorithm
from rl_service.core.models.checkpoints import checkpoint_timesteps


@dataclass(frozen=True)
class LoadedPolicy:
    """A loaded model and which file and timesteps it came from."""

    path: str
    timesteps: int
    model: Any


class ActCache:
    """run_id -> LoadedPolicy; loads lazily, reloads when the run serves a new file, bounded in size.

    Checkpoint and model files are written once under unique names (checkpoint_<timesteps>_steps.zip, a model
    path that is never overwritten), so a cached path is never stale and a hit touches no file: Act's hot path.
    """

    def __init__(self, max_entries: int = 32) -> None:
        self._entries: dict[str, LoadedPolicy] = {}
        self._lock = threading.Lock()
        self._max_entries = max_entries

    def forget(self, run_id: str) -> None:
        """Drop a run's entry."""
        with self._lock:
            self._entries.pop(run_id, None)

    def get(self, run_id: str, algorithm: str, path: str, timesteps: int) -> LoadedPolicy:
        """The policy stored at `path`, loading it if it is not the cached one (FileNotFoundError if gone)."""
        with self._lock:
            entry = self._entries.get(run_id)
            if entry is not None and entry.path == path:
                return entry
        Path(path).stat()  # FileNotFoundError (-> FAILED_PRECONDITION) before a library error from load
        model = get_algorithm(algorithm).cls.load(path, device="cpu")
        steps = checkpoint_timesteps(path)
        loaded = LoadedPolicy(path, timesteps if steps is None else steps, model)
        with self._lock:
            self._entries.pop(run_id, None)
            self._entries[run_id] = loaded
            while len(self._entries) > self._max_entries:
                self._entries.pop(next(iter(self._entries)))  # the least recently loaded
        return loaded
