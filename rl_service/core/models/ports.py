"""Where a run's models, checkpoints, metadata and history live: the interface infra's file store meets."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from rl_service.core.models.normalization import NormalizeStats


class ModelStore(Protocol):
    """Where models, checkpoints, metadata and history live on disk. Must be picklable (workers get a copy)."""

    def resolve_model_path(self, run_id: str, requested: str) -> Path:
        """The final model's path: MODELS_DIR/<run_id>/model.zip, or `requested` confined to MODELS_DIR."""

    def run_dir(self, run_id: str) -> Path:
        """MODELS_DIR/<run_id>: metadata.json, history.json, and the default model.zip."""

    def save_model(self, model: Any, path: Path, normalize: NormalizeStats | None = None) -> None:
        """Write an algorithm's zip atomically, and before it its normalisation statistics when given
        (normalization.stats_path beside it)."""

    def save_checkpoint(self, run_id: str, model: Any, timesteps: int, replay_buffer: bool = False,
                        normalize: NormalizeStats | None = None) -> Path:
        """Write checkpoint_<timesteps>_steps.zip atomically (with the model's replay buffer when asked, and its
        normalisation statistics when given), keep the newest N (each with its files), return its path."""

    def checkpoints(self, run_id: str) -> list[Path]:
        """A run's checkpoints, oldest first."""

    def latest_checkpoint(self, run_id: str) -> Path | None:
        """The newest checkpoint of a run, if any."""

    def replay_buffer(self, checkpoint: Path) -> Path | None:
        """The replay buffer saved with a checkpoint, if any."""

    def record_attempts(self, run_id: str, attempts: list[dict[str, Any]]) -> None:
        """Set the attempts listed in the run's metadata.json (when it exists)."""

    def delete_run(self, run_id: str, model_path: Path) -> None:
        """Remove every file of a run: checkpoints, final model, metadata, history."""

    def write_json(self, path: Path, data: Any) -> None:
        """Write JSON atomically."""
