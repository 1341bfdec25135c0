"""What a training worker reports to the server: typed events with a versioned plain-dict form.

The dict form is all that crosses a process (or, later, a cluster) boundary, so any executor can carry events as
JSON; nothing here imports torch or is ever unpickled from a worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from rl_service.core.runs.records import Evaluation, Metrics

EVENT_VERSION = 2  # 2: evaluated


@dataclass(frozen=True)
class Started:
    """The worker built its environment and model (or loaded a checkpoint's) and is about to train."""

    kind: ClassVar[str] = "started"
    run_id: str
    pid: int
    timesteps: int = 0  # where it starts: a resumed run's checkpoint, 0 for a fresh one


@dataclass(frozen=True)
class Progress:
    """Periodic progress, at most one per PROGRESS_INTERVAL_SECONDS."""

    kind: ClassVar[str] = "progress"
    run_id: str
    timesteps: int
    metrics: Metrics


@dataclass(frozen=True)
class CheckpointSaved:
    """A checkpoint landed on disk."""

    kind: ClassVar[str] = "checkpoint_saved"
    run_id: str
    timesteps: int
    path: str


@dataclass(frozen=True)
class Evaluated:
    """An evaluation ended (hyperparameter eval_freq); `best`: it beat every earlier one, and its model is now the
    run's best_model.zip."""

    kind: ClassVar[str] = "evaluated"
    run_id: str
    evaluation: Evaluation
    best: bool


@dataclass(frozen=True)
class Finished:
    """Training ended normally or on a stop request; the final model and checkpoint are saved."""

    kind: ClassVar[str] = "finished"
    run_id: str
    timesteps: int
    metrics: Metrics
    model_path: str
    checkpoint_path: str
    stopped_early: bool


@dataclass(frozen=True)
class Failed:
    """Training raised; earlier checkpoints are kept."""

    kind: ClassVar[str] = "failed"
    run_id: str
    timesteps: int
    error: str


WorkerEvent = Started | Progress | CheckpointSaved | Evaluated | Finished | Failed
_EVENT_TYPES: dict[str, type[WorkerEvent]] = {cls.kind: cls for cls in (Started, Progress, CheckpointSaved,
                                                                         Evaluated, Finished, Failed)}


def event_to_dict(event: WorkerEvent) -> dict[str, Any]:
    """The versioned, JSON-ready form of an event."""
    data: dict[str, Any] = {"version": EVENT_VERSION, "kind": event.kind}
    for name, value in vars(event).items():
        data[name] = value.to_dict() if isinstance(value, Metrics | Evaluation) else value
    return data


def event_from_dict(data: Mapping[str, Any]) -> WorkerEvent:
    """The inverse of event_to_dict; ValueError for an unknown version, kind or field set."""
    if data.get("version") != EVENT_VERSION:
        raise ValueError(f"worker event version {data.get('version')!r}; this server reads {EVENT_VERSION}")
    cls = _EVENT_TYPES.get(str(data.get("kind")))
    if cls is None:
        raise ValueError(f"unknown worker event kind {str(data.get('kind'))[:40]!r}")
    fields = {key: value for key, value in data.items() if key not in ("version", "kind")}
    try:
        if "metrics" in fields:
            fields["metrics"] = Metrics.from_dict(fields["metrics"])
        if "evaluation" in fields:
            fields["evaluation"] = Evaluation.from_dict(fields["evaluation"])
        return cls(**fields)
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"malformed {cls.kind} event: {exc}") from None
