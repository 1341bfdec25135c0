"""The run lifecycle as data: one table of allowed (state, event) pairs and one pure function that applies them.

Events are the commands the orchestrator issues (Launched, StopRequested, ...) and the reports a worker sends
(rl_service.core.runs.events). `apply` returns the next record or raises InvalidTransition; the orchestrator
persists what it returns and wakes watchers. Nothing here does I/O.

    PENDING --Launched--> RUNNING --Finished--> SUCCEEDED | CANCELLED (stop requested) | INTERRUPTED (shutdown)
    PENDING --StopRequested--> CANCELLED      RUNNING --Failed | WorkerExited--> FAILED
    PENDING --LaunchFailed--> FAILED          RUNNING --Killed--> CANCELLED (stop requested) | INTERRUPTED
    PENDING --ShutdownRequested--> INTERRUPTED
    INTERRUPTED | FAILED | CANCELLED --Resumed--> PENDING; SUCCEEDED --Resumed(larger budget)--> PENDING
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rl_service.core.runs.events import CheckpointSaved, Failed, Finished, Progress, Started, WorkerEvent
from rl_service.core.runs.records import RunRecord, RunState

P, R = RunState.PENDING, RunState.RUNNING
SUCCEEDED, FAILED, CANCELLED, INTERRUPTED = (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED,
                                             RunState.INTERRUPTED)


class InvalidTransition(Exception):
    """An event that the run's current state does not allow (a bug in the caller, never a client's mistake)."""


@dataclass(frozen=True)
class Launched:
    """The executor started the run's worker: it holds a slot from now on."""


@dataclass(frozen=True)
class LaunchFailed:
    """The executor could not start a worker."""

    error: str


@dataclass(frozen=True)
class StopRequested:
    """A client asked the run to stop (StopTraining)."""


@dataclass(frozen=True)
class ShutdownRequested:
    """The server is shutting down: a pending run ends INTERRUPTED; a running one is asked to stop."""


@dataclass(frozen=True)
class Killed:
    """The orchestrator gave up waiting for a stop and killed the worker; the last checkpoint is kept."""

    reason: str


@dataclass(frozen=True)
class WorkerExited:
    """The worker process ended without reporting a result."""

    exitcode: int


@dataclass(frozen=True)
class Resumed:
    """Train again from the newest checkpoint; `total_timesteps` (when given) extends the budget."""

    total_timesteps: int | None = None


Command = Launched | LaunchFailed | StopRequested | ShutdownRequested | Killed | WorkerExited | Resumed
RunEvent = Command | WorkerEvent
_Handler = Callable[[RunRecord, Any, float], RunRecord]


def _launched(record: RunRecord, event: Launched, now: float) -> RunRecord:
    return record.evolve(state=R, started_at=now)


def _launch_failed(record: RunRecord, event: LaunchFailed, now: float) -> RunRecord:
    return record.evolve(state=FAILED, finished_at=now, error=f"could not start a worker: {event.error}")


def _cancel_pending(record: RunRecord, event: StopRequested, now: float) -> RunRecord:
    return record.evolve(state=CANCELLED, stop_requested=True, finished_at=now)


def _stop_running(record: RunRecord, event: StopRequested, now: float) -> RunRecord:
    return record.evolve(stop_requested=True)


def _interrupt_pending(record: RunRecord, event: ShutdownRequested, now: float) -> RunRecord:
    return record.evolve(state=INTERRUPTED, finished_at=now,
                         error="interrupted: the server shut down before the run started")


def _unchanged(record: RunRecord, event: Any, now: float) -> RunRecord:
    return record


def _progress(record: RunRecord, event: Progress, now: float) -> RunRecord:
    return record.evolve(timesteps_done=event.timesteps, metrics=event.metrics)


def _checkpoint(record: RunRecord, event: CheckpointSaved, now: float) -> RunRecord:
    return record.evolve(timesteps_done=event.timesteps, last_checkpoint_path=event.path)


def _finished(record: RunRecord, event: Finished, now: float) -> RunRecord:
    # Stopped early without a client's stop request: the server shut down (or died) under it.
    if not event.stopped_early:
        state, error = SUCCEEDED, ""
    elif record.stop_requested:
        state, error = CANCELLED, ""
    else:
        state, error = INTERRUPTED, "interrupted: the server shut down; the final checkpoint and model are kept"
    return record.evolve(state=state, timesteps_done=event.timesteps, metrics=event.metrics, model_saved=True,
                         model_path=event.model_path, finished_at=now, error=error,
                         last_checkpoint_path=event.checkpoint_path or record.last_checkpoint_path)


def _failed(record: RunRecord, event: Failed, now: float) -> RunRecord:
    return record.evolve(state=FAILED, error=event.error, finished_at=now,
                         timesteps_done=max(event.timesteps, record.timesteps_done))


def _killed(record: RunRecord, event: Killed, now: float) -> RunRecord:
    state = CANCELLED if record.stop_requested else INTERRUPTED
    return record.evolve(state=state, error=event.reason, finished_at=now)


def _exited(record: RunRecord, event: WorkerExited, now: float) -> RunRecord:
    return record.evolve(state=FAILED, finished_at=now,
                         error=f"the worker process exited with code {event.exitcode} without reporting a result")


def _resumed(record: RunRecord, event: Resumed, now: float) -> RunRecord:
    total = event.total_timesteps or record.total_timesteps
    if record.state is SUCCEEDED and total <= record.timesteps_done:
        raise InvalidTransition(f"run {record.run_id} SUCCEEDED at {record.timesteps_done} timesteps; resuming it "
                                "needs a larger total_timesteps")
    return record.evolve(state=P, total_timesteps=total, error="", stop_requested=False, finished_at=0.0,
                         model_saved=False)


TRANSITIONS: dict[tuple[RunState, type], _Handler] = {
    (P, Launched): _launched,
    (P, LaunchFailed): _launch_failed,
    (P, StopRequested): _cancel_pending,
    (P, ShutdownRequested): _interrupt_pending,
    (R, StopRequested): _stop_running,
    (R, ShutdownRequested): _unchanged,  # the worker is asked to stop; its Finished says INTERRUPTED
    (R, Started): _unchanged,
    (R, Progress): _progress,
    (R, CheckpointSaved): _checkpoint,
    (R, Finished): _finished,
    (R, Failed): _failed,
    (R, Killed): _killed,
    (R, WorkerExited): _exited,
    (INTERRUPTED, Resumed): _resumed,
    (FAILED, Resumed): _resumed,
    (CANCELLED, Resumed): _resumed,
    (SUCCEEDED, Resumed): _resumed,
}
"""(state, event type) -> handler; every pair not listed raises InvalidTransition."""

EVENT_TYPES: tuple[type, ...] = (Launched, LaunchFailed, StopRequested, ShutdownRequested, Killed, WorkerExited,
                                 Resumed, Started, Progress, CheckpointSaved, Finished, Failed)


def apply(record: RunRecord, event: RunEvent, now: float) -> RunRecord:
    """The record after `event` at time `now`; InvalidTransition if the record's state does not allow it."""
    handler = TRANSITIONS.get((record.state, type(event)))
    if handler is None:
        raise InvalidTransition(f"run {record.run_id}: {type(event).__name__} is not allowed in state "
                                f"{record.state.name}")
    return handler(record, event, now)
