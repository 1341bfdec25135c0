"""The job a training worker receives: one run's validated request as plain, versioned data.

Hyperparameters travel as their effective strings and are parsed again by the algorithm's schema in the worker,
so a job is JSON from end to end and any executor (local processes now, a cluster later) can carry it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

JOB_VERSION = 1


@dataclass(frozen=True)
class RunJob:
    """Everything a worker needs to train one run, already validated by the orchestrator."""

    run_id: str
    experiment_id: str
    algorithm: str  # registry key
    env_id: str
    total_timesteps: int
    seed: int
    hyperparameters: Mapping[str, str]  # effective values, formatted by the algorithm's schema
    checkpoint_interval: int
    model_path: str
    progress_interval: float = 1.0
    torch_threads: int = 1
    tensorboard_dir: str | None = None  # also log to <tensorboard_dir>/<run_id> (stable-baselines3's writer)
    created_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The versioned, JSON-ready form."""
        data = asdict(self)
        data["hyperparameters"] = dict(self.hyperparameters)
        return {"version": JOB_VERSION, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunJob:
        """The inverse of to_dict; ValueError for another version or a malformed job."""
        if data.get("version") != JOB_VERSION:
            raise ValueError(f"run job version {data.get('version')!r}; this worker reads {JOB_VERSION}")
        fields = {key: value for key, value in data.items() if key != "version"}
        try:
            job = cls(**fields)
        except TypeError as exc:
            raise ValueError(f"malformed run job: {exc}") from None
        return cls(**{**fields, "hyperparameters": {str(k): str(v) for k, v in job.hyperparameters.items()}})
