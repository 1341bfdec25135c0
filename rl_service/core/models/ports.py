"""Where a run's models, checkpoints, metadata and history live: the interface infra's file store meets."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


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
