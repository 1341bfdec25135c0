"""Models, checkpoints, metadata and history on the filesystem, confined to MODELS_DIR and CHECKPOINT_DIR.

Paths are checked when a request is accepted (resolve_model_path) and again by every write: each goes through
`_write`, which writes relative to a descriptor of the root and refuses a symlinked directory on the way
(infra.atomic), so a directory swapped for a link after the check cannot send a file elsewhere.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rl_service.core.errors import AlreadyExists, InvalidRequest, PathOutsideRoot, quoted
from rl_service.core.models.checkpoints import (
    checkpoint_name,
    checkpoint_timesteps,
    replay_buffer_name,
    replay_buffer_timesteps,
    stats_timesteps,
)
from rl_service.core.models.normalization import NormalizeStats, stats_bytes, stats_path
from rl_service.infra.atomic import PathEscapesRoot, atomic_write_with, json_bytes

MAX_PATH_LENGTH = 1024


@dataclass(frozen=True)
class FileModelStore:
    """The storage layout of the architecture doc; every write atomic."""

    models_dir: Path
    checkpoint_dir: Path
    keep_checkpoints: int = 5

    def run_dir(self, run_id: str) -> Path:
        """MODELS_DIR/<run_id>."""
        return self.models_dir.resolve() / run_id

    def checkpoint_run_dir(self, run_id: str) -> Path:
        """CHECKPOINT_DIR/<run_id>."""
        return self.checkpoint_dir.resolve() / run_id

    def resolve_model_path(self, run_id: str, requested: str) -> Path:
        """The final model's path; a requested one must stay inside MODELS_DIR (after symlinks) and be new."""
        if not requested:
            return self.run_dir(run_id) / "model.zip"
        if len(requested) > MAX_PATH_LENGTH or "\x00" in requested:
            raise InvalidRequest("model_output_path: too long or contains a NUL byte", field="model_output_path")
        root = self.models_dir.resolve()
        candidate = Path(requested)
        if not candidate.is_absolute():
            candidate = root / candidate
        # resolve() follows every symlink that exists, so a link pointing out of the root is caught here.
        resolved = candidate.resolve()
        if resolved == root or not resolved.is_relative_to(root):
            raise PathOutsideRoot(
                f"model_output_path: {quoted(requested)} resolves outside MODELS_DIR ({root}); "
                "give a path relative to MODELS_DIR such as 'cartpole/ppo.zip'",
                field="model_output_path",
            )
        if resolved.suffix != ".zip":
            resolved = resolved.with_name(resolved.name + ".zip")
        if resolved.exists():
            raise AlreadyExists(
                f"model_output_path: {quoted(str(resolved.relative_to(root)))} already exists in MODELS_DIR; "
                "choose a new path (models are never overwritten)",
                field="model_output_path",
            )
        return resolved

    def save_model(self, model: Any, path: Path, normalize: NormalizeStats | None = None) -> None:
        """Write the algorithm's zip (stable-baselines3 format) atomically, after its normalisation statistics."""
        if normalize is not None:  # first, so that a model on disk always has its statistics
            data = stats_bytes(normalize)
            self._write(stats_path(path), lambda handle: handle.write(data))
        self._write(path, model.save)

    def save_checkpoint(self, run_id: str, model: Any, timesteps: int, replay_buffer: bool = False,
                        normalize: NormalizeStats | None = None) -> Path:
        """Write checkpoint_<timesteps>_steps.zip (with its replay buffer and normalisation statistics), then keep
        only the newest checkpoints."""
        directory = self.checkpoint_run_dir(run_id)
        if replay_buffer:  # first, so that a checkpoint on disk always has its buffer
            self._write(directory / replay_buffer_name(timesteps), model.save_replay_buffer)
        path = directory / checkpoint_name(timesteps)
        self.save_model(model, path, normalize)
        self._prune(run_id)
        return path

    def replay_buffer(self, checkpoint: Path) -> Path | None:
        """The replay buffer saved with a checkpoint, if there is one."""
        steps = checkpoint_timesteps(checkpoint)
        path = checkpoint.with_name(replay_buffer_name(steps)) if steps is not None else None
        return path if path is not None and path.is_file() else None

    def record_attempts(self, run_id: str, attempts: list[dict[str, Any]]) -> None:
        """Set metadata.json's list of attempts (how each ended is the server's to say, once its worker is done)."""
        path = self.run_dir(run_id) / "metadata.json"
        try:
            metadata = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return  # the worker never got as far as writing it
        self.write_json(path, {**metadata, "attempts": attempts})

    def delete_run(self, run_id: str, model_path: Path) -> None:
        """Remove a run's directories and its final model, wherever in MODELS_DIR it was written."""
        root = self.models_dir.resolve()
        for directory in (self.run_dir(run_id), self.checkpoint_run_dir(run_id)):
            shutil.rmtree(directory, ignore_errors=True)
        resolved = model_path.resolve()
        if resolved.is_relative_to(root) and resolved != root:  # checked again at delete time
            resolved.unlink(missing_ok=True)
            stats_path(resolved).unlink(missing_ok=True)

    def checkpoints(self, run_id: str) -> list[Path]:
        """A run's checkpoints, oldest first."""
        directory = self.checkpoint_run_dir(run_id)
        if not directory.is_dir():
            return []
        found = []
        for entry in directory.iterdir():
            steps = checkpoint_timesteps(entry)
            if steps is not None:
                found.append((steps, entry))
        return [path for _, path in sorted(found)]

    def latest_checkpoint(self, run_id: str) -> Path | None:
        """The newest checkpoint, if any."""
        found = self.checkpoints(run_id)
        return found[-1] if found else None

    def write_json(self, path: Path, data: Any) -> None:
        """Write JSON atomically."""
        self._write(path, lambda handle: handle.write(json_bytes(data)))

    def _write(self, path: Path, write: Callable[[IO[bytes]], Any]) -> None:
        """Every write of the store: atomic, confined at write time to the root `path` was made under."""
        atomic_write_with(path, write, root=self._root_of(path))

    def _root_of(self, path: Path) -> Path:
        # The innermost root holding the path (CHECKPOINT_DIR may be configured inside MODELS_DIR, or the reverse).
        roots = sorted((self.models_dir.resolve(), self.checkpoint_dir.resolve()), key=lambda r: len(r.parts),
                       reverse=True)
        for root in roots:
            if path.is_relative_to(root) and path != root:
                return root
        raise PathEscapesRoot(f"{path} is outside MODELS_DIR and CHECKPOINT_DIR")

    def _prune(self, run_id: str) -> None:
        found = self.checkpoints(run_id)  # oldest first
        kept, pruned = found[-self.keep_checkpoints:], found[:-self.keep_checkpoints]
        oldest_kept = (checkpoint_timesteps(kept[0]) or 0) if kept else 0
        for old in pruned:
            old.unlink(missing_ok=True)
        for entry in self.checkpoint_run_dir(run_id).iterdir():  # buffers and statistics of pruned checkpoints
            steps = replay_buffer_timesteps(entry)
            if steps is None:
                steps = stats_timesteps(entry)
            if steps is not None and steps < oldest_kept:
                entry.unlink(missing_ok=True)
