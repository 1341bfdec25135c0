"""Messages a training worker sends to the server process (picklable, internal: never from a client)."""

from __future__ import annotations

from dataclasses import dataclass

from rl_service.core.dto import Metrics


@dataclass(frozen=True)
class Started:
    """The worker built its environment and model and is about to train."""

    run_id: str
    pid: int


@dataclass(frozen=True)
class Progress:
    """Periodic progress, at most one per PROGRESS_INTERVAL_SECONDS."""

    run_id: str
    timesteps: int
    metrics: Metrics


@dataclass(frozen=True)
class CheckpointSaved:
    """A checkpoint landed on disk."""

    run_id: str
    timesteps: int
    path: str


@dataclass(frozen=True)
class Finished:
    """Training ended normally or on a stop request; the final model and checkpoint are saved."""

    run_id: str
    timesteps: int
    metrics: Metrics
    model_path: str
    checkpoint_path: str
    stopped_early: bool


@dataclass(frozen=True)
class Failed:
    """Training raised; earlier checkpoints are kept."""

    run_id: str
    timesteps: int
    error: str


WorkerEvent = Started | Progress | CheckpointSaved | Finished | Failed
