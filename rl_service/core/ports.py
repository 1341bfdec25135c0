"""Interfaces core needs from infra, so tests can hand core an in-memory registry or store."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from rl_service.core.dto import RunFilter, RunRecord


class RunRegistry(Protocol):
    """Persistent run records; survives server restarts."""

    def insert(self, record: RunRecord) -> None:
        """Add a new run; the run_id must be new."""

    def update(self, record: RunRecord) -> None:
        """Replace a run's record."""

    def get(self, run_id: str) -> RunRecord | None:
        """One run, or None."""

    def find(self, run_filter: RunFilter) -> list[RunRecord]:
        """Matching runs, newest first."""

    def mark_interrupted(self, reason: str) -> list[RunRecord]:
        """Move every PENDING or RUNNING run to INTERRUPTED (at start-up); returns the runs changed."""

    def close(self) -> None:
        """Release the underlying connection."""


class ModelStore(Protocol):
    """Where models, checkpoints, metadata and history live on disk. Must be picklable (workers get a copy)."""

    def resolve_model_path(self, run_id: str, requested: str) -> Path:
        """The final model's path: MODELS_DIR/<run_id>/model.zip, or `requested` confined to MODELS_DIR."""

    def run_dir(self, run_id: str) -> Path:
        """MODELS_DIR/<run_id>: metadata.json, history.json, and the default model.zip."""

    def save_model(self, model: Any, path: Path) -> None:
        """Write an algorithm's zip atomically."""

    def save_checkpoint(self, run_id: str, model: Any, timesteps: int) -> Path:
        """Write checkpoint_<timesteps>_steps.zip atomically, keep the newest N, return its path."""

    def latest_checkpoint(self, run_id: str) -> Path | None:
        """The newest checkpoint of a run, if any."""

    def write_json(self, path: Path, data: Any) -> None:
        """Write JSON atomically."""


class Executor(Protocol):
    """Starts and stops training workers; a local process pool now, a Ray cluster later."""

    def launch(self, run_id: str, job: Any) -> None:
        """Start training `job` in the background."""

    def request_stop(self, run_id: str) -> None:
        """Ask a worker to checkpoint and stop."""

    def kill(self, run_id: str) -> None:
        """End a worker at once."""

    def next_event(self, timeout: float) -> Any | None:
        """The next event from any worker, or None after `timeout` seconds (0: do not wait)."""

    def reap(self) -> list[tuple[str, int]]:
        """Workers that exited since the last call, with exit codes."""

    def active(self) -> set[str]:
        """Run ids with a live worker."""

    def close(self) -> None:
        """Stop everything and release resources."""


class PolicyStore(Protocol):
    """Named policies' saved states: tensors plus string metadata, one atomic file per state."""

    def save_state(self, policy_id: str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        """Replace the policy's current saved state."""

    def load_state(self, policy_id: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The policy's current saved state."""

    def policy_ids(self) -> list[str]:
        """Every policy with a saved state."""

    def delete(self, policy_id: str) -> None:
        """Remove a policy and its checkpoints."""

    def save_checkpoint(self, policy_id: str, name: str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        """Write (or replace) a named checkpoint."""

    def load_checkpoint(self, policy_id: str, name: str) -> tuple[dict[str, Any], dict[str, str]] | None:
        """A named checkpoint, or None."""

    def checkpoints(self, policy_id: str) -> list[tuple[str, dict[str, str]]]:
        """Every named checkpoint's name and metadata, sorted by name."""
