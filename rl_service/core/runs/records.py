"""Managed runs as data: the request, the record the registry keeps, its state, metrics, filters and Act results
(frozen dataclasses, no behaviour beyond small helpers)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


class RunState(enum.Enum):
    """Lifecycle of a managed run; values match the proto enum."""

    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5
    INTERRUPTED = 6

    @property
    def is_terminal(self) -> bool:
        """True once the run will never train again in this server."""
        return self not in (RunState.PENDING, RunState.RUNNING)


@dataclass(frozen=True)
class TrainingRequest:
    """What a client asked for in StartTraining, before semantic validation."""

    algorithm: str
    env_id: str
    total_timesteps: int
    experiment_id: str = ""
    seed: int | None = None
    hyperparameters: Mapping[str, str] = field(default_factory=dict)
    model_output_path: str = ""
    checkpoint_interval: int = 0


@dataclass(frozen=True)
class Metrics:
    """Progress metrics over the most recent episodes."""

    mean_episode_reward: float = 0.0
    mean_episode_length: float = 0.0
    episodes_completed: int = 0
    steps_per_second: float = 0.0
    losses: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "mean_episode_reward": self.mean_episode_reward,
            "mean_episode_length": self.mean_episode_length,
            "episodes_completed": self.episodes_completed,
            "steps_per_second": self.steps_per_second,
            "losses": dict(self.losses),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Metrics:
        """The inverse of to_dict; missing keys take their defaults."""
        return cls(
            mean_episode_reward=float(data.get("mean_episode_reward", 0.0)),
            mean_episode_length=float(data.get("mean_episode_length", 0.0)),
            episodes_completed=int(data.get("episodes_completed", 0)),
            steps_per_second=float(data.get("steps_per_second", 0.0)),
            losses={str(k): float(v) for k, v in dict(data.get("losses", {})).items()},
        )


# How an attempt ended when its worker or its server died rather than reporting. Only a worker's death counts
# against MAX_RUN_ATTEMPTS (a run that crashes its worker must not loop forever); a server killed or rescheduled
# under a run is not the run's fault, and the run resumes however often that happens.
WORKER_DIED = "worker died"
SERVER_DIED = "server died"


@dataclass(frozen=True)
class Attempt:
    """One stretch of training of a run, from a launch to how it ended ("" while it runs)."""

    number: int
    start_timesteps: int
    started_at: float
    end_timesteps: int = 0
    finished_at: float = 0.0
    outcome: str = ""  # a terminal state's name, "requeued", WORKER_DIED or SERVER_DIED
    error: str = ""

    @property
    def died(self) -> bool:
        """True when its worker process died without a result (what MAX_RUN_ATTEMPTS counts)."""
        return self.outcome == WORKER_DIED

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (metadata.json and the registry)."""
        return {"attempt": self.number, "start_timesteps": self.start_timesteps, "started_at": self.started_at,
                "end_timesteps": self.end_timesteps, "finished_at": self.finished_at, "outcome": self.outcome,
                "error": self.error}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Attempt:
        """The inverse of to_dict."""
        return cls(int(data["attempt"]), int(data["start_timesteps"]), float(data["started_at"]),
                   int(data.get("end_timesteps", 0)), float(data.get("finished_at", 0.0)),
                   str(data.get("outcome", "")), str(data.get("error", "")))


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: deterministic episodes on a separate environment instance (hyperparameter eval_freq)."""

    mean_reward: float
    std_reward: float
    timesteps: int
    episodes: int
    mean_length: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the registry, events)."""
        return {"mean_reward": self.mean_reward, "std_reward": self.std_reward, "timesteps": self.timesteps,
                "episodes": self.episodes, "mean_length": self.mean_length}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        """The inverse of to_dict."""
        return cls(float(data["mean_reward"]), float(data["std_reward"]), int(data["timesteps"]),
                   int(data["episodes"]), float(data.get("mean_length", 0.0)))


@dataclass(frozen=True)
class RunRecord:
    """Everything the server knows about one run; what the run registry persists."""

    run_id: str
    experiment_id: str
    algorithm: str
    env_id: str
    state: RunState
    total_timesteps: int
    seed: int
    hyperparameters: Mapping[str, str]
    checkpoint_interval: int
    model_path: str
    timesteps_done: int = 0
    last_checkpoint_path: str = ""
    error: str = ""
    metrics: Metrics = field(default_factory=Metrics)
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    stop_requested: bool = False
    # True once the final model exists at model_path (SUCCEEDED, or CANCELLED after its final save).
    model_saved: bool = False
    attempt: int = 1  # the attempt the run is on (or ended in); a resume starts the next one
    attempts: tuple[Attempt, ...] = ()  # every launch so far, oldest first
    owner: str = ""  # the token name that started the run ("" on a server without tokens)
    last_evaluation: Evaluation | None = None
    best_evaluation: Evaluation | None = None  # its model is served as model "best"

    def attempt_dicts(self) -> list[dict[str, Any]]:
        """Every attempt in its JSON-ready form (metadata.json, the worker's job)."""
        return [attempt.to_dict() for attempt in self.attempts]

    @property
    def deaths(self) -> int:
        """Attempts whose worker died without a result."""
        return sum(1 for attempt in self.attempts if attempt.died)

    def evolve(self, **changes: Any) -> RunRecord:
        """A copy with some fields changed."""
        return replace(self, **changes)


@dataclass(frozen=True)
class RunFilter:
    """ListRuns criteria; None means any."""

    experiment_id: str | None = None
    state: RunState | None = None


@dataclass(frozen=True)
class ActResult:
    """Actions for one or more observations, flattened, with the size of one action."""

    actions: list[float]
    action_size: int
    count: int
    model_timesteps: int
