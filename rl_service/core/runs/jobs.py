"""The job a training worker receives: one run's validated request as plain, versioned data.

Hyperparameters travel as their effective strings and are parsed again by the algorithm's schema in the worker,
so a job is JSON from end to end and any executor (local processes now, a cluster later) can carry it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rl_service.core.runs.records import RunRecord

JOB_VERSION = 3  # 2: resume, attempt, attempts, save_replay_buffer; 3: best_evaluation


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
    resume: bool = False  # continue from the newest loadable checkpoint (from scratch when there is none)
    attempt: int = 1
    attempts: tuple[Mapping[str, Any], ...] = ()  # every attempt so far, this one last (Attempt.to_dict)
    save_replay_buffer: bool = True  # off-policy algorithms save their replay buffer with each checkpoint
    # The run's best evaluation so far (Evaluation.to_dict), so that a resumed run's best stays best.
    best_evaluation: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The versioned, JSON-ready form."""
        data = asdict(self)
        data["hyperparameters"] = dict(self.hyperparameters)
        data["attempts"] = [dict(a) for a in self.attempts]
        data["best_evaluation"] = dict(self.best_evaluation) if self.best_evaluation is not None else None
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
        return cls(**{**fields, "hyperparameters": {str(k): str(v) for k, v in job.hyperparameters.items()},
                      "attempts": tuple(dict(a) for a in job.attempts)})


def job_for(record: RunRecord, resume: bool, progress_interval: float, torch_threads: int,
            tensorboard_dir: Path | None, save_replay_buffer: bool) -> RunJob:
    """The job of a run's next attempt, from its record and the server's settings."""
    return RunJob(
        run_id=record.run_id, experiment_id=record.experiment_id, algorithm=record.algorithm.lower(),
        env_id=record.env_id, total_timesteps=record.total_timesteps, seed=record.seed,
        hyperparameters=record.hyperparameters, checkpoint_interval=record.checkpoint_interval,
        model_path=record.model_path, progress_interval=progress_interval, torch_threads=torch_threads,
        created_at=record.created_at, tensorboard_dir=str(tensorboard_dir) if tensorboard_dir else None,
        resume=resume, attempt=record.attempt, attempts=tuple(record.attempt_dicts()),
        save_replay_buffer=save_replay_buffer,
        best_evaluation=record.best_evaluation.to_dict() if record.best_evaluation is not None else None,
    )
