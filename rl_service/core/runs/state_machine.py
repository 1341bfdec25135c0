"""The run lifecycle as data: one table of allowed (state, event) pairs and one pure function that applies them.

Events are the commands the orchestrator issues (Launched, StopRequested, ...) and the reports a worker sends
(rl_service.core.runs.events). `apply` returns the next record or raises InvalidTransition; the orchestrator
persists what it returns and wakes watchers. Nothing here does I/O.

    PENDING --Launched--> RUNNING --Finished--> SUCCEEDED | CANCELLED (stop requested) | INTERRUPTED (shutdown)
    PENDING --StopRequested--> CANCELLED      RUNNING --Failed--> FAILED
    PENDING --LaunchFailed--> FAILED          RUNNING --Killed--> CANCELLED (stop requested) | INTERRUPTED
    PENDING --ShutdownRequested--> INTERRUPTED
    RUNNING --Started | Progress | CheckpointSaved | Evaluated--> RUNNING (counters, metrics, evaluations)
    RUNNING --WorkerExited--> PENDING (a new attempt) | FAILED (MAX_RUN_ATTEMPTS worker deaths)
    RUNNING --ServerRestarted--> PENDING (a new attempt) | INTERRUPTED (AUTO_RESUME off)
    INTERRUPTED | FAILED | CANCELLED --Resumed--> PENDING; SUCCEEDED --Resumed(larger budget)--> PENDING

Each launch opens an Attempt on the record and the transition that ends it closes it with its outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from rl_service.core.models.checkpoints import checkpoint_timesteps
from rl_service.core.runs.events import (
    CheckpointSaved,
    Evaluated,
    Failed,
    Finished,
    Progress,
    Started,
    WorkerEvent,
)
from rl_service.core.runs.records import SERVER_DIED, WORKER_DIED, Attempt, RunRecord, RunState

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
    """The worker process ended without reporting a result; it resumes unless it has died max_attempts times."""

    exitcode: int
    max_attempts: int = 1


@dataclass(frozen=True)
class ServerRestarted:
    """Found PENDING or RUNNING at start-up: the previous server died under it (or was killed past its grace)."""

    auto_resume: bool = True


@dataclass(frozen=True)
class Resumed:
    """Train again from the newest checkpoint; `total_timesteps` (when given) extends the budget."""

    total_timesteps: int | None = None


Command = (Launched | LaunchFailed | StopRequested | ShutdownRequested | Killed | WorkerExited | ServerRestarted
           | Resumed)
RunEvent = Command | WorkerEvent
_Handler = Callable[[RunRecord, Any, float], RunRecord]


def _close(record: RunRecord, outcome: str, now: float, error: str = "") -> tuple[Attempt, ...]:
    """The attempts with the open one (the last, when it has no outcome) ended."""
    if not record.attempts or record.attempts[-1].outcome:
        return record.attempts
    last = replace(record.attempts[-1], end_timesteps=record.timesteps_done, finished_at=now, outcome=outcome,
                   error=error)
    return (*record.attempts[:-1], last)


def _end(record: RunRecord, now: float, **changes: Any) -> RunRecord:
    """A terminal record whose open attempt is closed with the new state and error."""
    ended = record.evolve(finished_at=now, **changes)
    return ended.evolve(attempts=_close(ended, ended.state.name, now, ended.error))


def _launched(record: RunRecord, event: Launched, now: float) -> RunRecord:
    attempt = Attempt(record.attempt, record.timesteps_done, now)
    return record.evolve(state=R, started_at=now, attempts=(*record.attempts, attempt))


def _launch_failed(record: RunRecord, event: LaunchFailed, now: float) -> RunRecord:
    return _end(record, now, state=FAILED, error=f"could not start a worker: {event.error}")


def _cancel_pending(record: RunRecord, event: StopRequested, now: float) -> RunRecord:
    return _end(record, now, state=CANCELLED, stop_requested=True)


def _stop_running(record: RunRecord, event: StopRequested, now: float) -> RunRecord:
    return record.evolve(stop_requested=True)


def _interrupt_pending(record: RunRecord, event: ShutdownRequested, now: float) -> RunRecord:
    return _end(record, now, state=INTERRUPTED, error="interrupted: the server shut down before the run started")


def _unchanged(record: RunRecord, event: Any, now: float) -> RunRecord:
    return record


def _started(record: RunRecord, event: Started, now: float) -> RunRecord:
    # Where the worker really starts: the checkpoint it loaded (timesteps past it are trained again).
    attempts = record.attempts
    if attempts and not attempts[-1].outcome:
        attempts = (*attempts[:-1], replace(attempts[-1], start_timesteps=event.timesteps))
    return record.evolve(timesteps_done=event.timesteps, attempts=attempts)


def _progress(record: RunRecord, event: Progress, now: float) -> RunRecord:
    return record.evolve(timesteps_done=event.timesteps, metrics=event.metrics)


def _checkpoint(record: RunRecord, event: CheckpointSaved, now: float) -> RunRecord:
    return record.evolve(timesteps_done=event.timesteps, last_checkpoint_path=event.path)


def _evaluated(record: RunRecord, event: Evaluated, now: float) -> RunRecord:
    # The worker decides what is best (it wrote best_model.zip), starting from the best this record held.
    best = event.evaluation if event.best else record.best_evaluation
    return record.evolve(last_evaluation=event.evaluation, best_evaluation=best)


def _finished(record: RunRecord, event: Finished, now: float) -> RunRecord:
    # Stopped early without a client's stop request: the server shut down (or died) under it.
    if not event.stopped_early:
        state, error = SUCCEEDED, ""
    elif record.stop_requested:
        state, error = CANCELLED, ""
    else:
        state, error = INTERRUPTED, "interrupted: the server shut down; the final checkpoint and model are kept"
    return _end(record, now, state=state, timesteps_done=event.timesteps, metrics=event.metrics, model_saved=True,
                model_path=event.model_path, error=error,
                last_checkpoint_path=event.checkpoint_path or record.last_checkpoint_path)


def _failed(record: RunRecord, event: Failed, now: float) -> RunRecord:
    return _end(record, now, state=FAILED, error=event.error,
                timesteps_done=max(event.timesteps, record.timesteps_done))


def _killed(record: RunRecord, event: Killed, now: float) -> RunRecord:
    return _end(record, now, state=CANCELLED if record.stop_requested else INTERRUPTED, error=event.reason)


def _requeued(record: RunRecord, attempts: tuple[Attempt, ...]) -> RunRecord:
    """PENDING as the next attempt, its timesteps back at the checkpoint it will resume from (what came after it
    is trained again)."""
    resume_at = checkpoint_timesteps(record.last_checkpoint_path) if record.last_checkpoint_path else None
    return record.evolve(state=P, attempt=record.attempt + 1, attempts=attempts, error="",
                         timesteps_done=resume_at or 0)


def _died(record: RunRecord, outcome: str, why: str, max_attempts: int, now: float) -> RunRecord:
    """A dead worker's run: queued again as its next attempt, or FAILED once it has died max_attempts times."""
    deaths = record.deaths + 1
    attempts = _close(record, outcome, now, why)
    if deaths >= max_attempts:
        error = (f"{why}; the run's worker has died {deaths} time{'s' if deaths > 1 else ''} "
                 f"(MAX_RUN_ATTEMPTS={max_attempts}), so it is not resumed again")
        return record.evolve(state=FAILED, finished_at=now, error=error, attempts=attempts)
    return _requeued(record, attempts)


def _exited(record: RunRecord, event: WorkerExited, now: float) -> RunRecord:
    why = f"the worker process exited with code {event.exitcode} without reporting a result"
    return _died(record, WORKER_DIED, why, event.max_attempts, now)


def _restarted_running(record: RunRecord, event: ServerRestarted, now: float) -> RunRecord:
    why = "the server stopped while the run was in progress"
    attempts = _close(record, SERVER_DIED, now, why)
    if not event.auto_resume:
        return record.evolve(state=INTERRUPTED, finished_at=now, error=f"interrupted: {why}", attempts=attempts)
    return _requeued(record, attempts)


def _restarted_pending(record: RunRecord, event: ServerRestarted, now: float) -> RunRecord:
    if event.auto_resume:
        return record  # still queued
    return _end(record, now, state=INTERRUPTED, error="interrupted: the server stopped before the run started")


def _resumed(record: RunRecord, event: Resumed, now: float) -> RunRecord:
    total = event.total_timesteps or record.total_timesteps
    if record.state is SUCCEEDED and total <= record.timesteps_done:
        raise InvalidTransition(f"run {record.run_id} SUCCEEDED at {record.timesteps_done} timesteps; resuming it "
                                "needs a larger total_timesteps")
    return record.evolve(state=P, total_timesteps=total, error="", stop_requested=False, finished_at=0.0,
                         model_saved=False, attempt=record.attempt + 1)


TRANSITIONS: dict[tuple[RunState, type], _Handler] = {
    (P, Launched): _launched,
    (P, LaunchFailed): _launch_failed,
    (P, StopRequested): _cancel_pending,
    (P, ShutdownRequested): _interrupt_pending,
    (R, StopRequested): _stop_running,
    (R, ShutdownRequested): _unchanged,  # the worker is asked to stop; its Finished says INTERRUPTED
    (R, Started): _started,
    (R, Progress): _progress,
    (R, CheckpointSaved): _checkpoint,
    (R, Evaluated): _evaluated,
    (R, Finished): _finished,
    (R, Failed): _failed,
    (R, Killed): _killed,
    (R, WorkerExited): _exited,
    (R, ServerRestarted): _restarted_running,
    (P, ServerRestarted): _restarted_pending,
    (INTERRUPTED, Resumed): _resumed,
    (FAILED, Resumed): _resumed,
    (CANCELLED, Resumed): _resumed,
    (SUCCEEDED, Resumed): _resumed,
}
"""(state, event type) -> handler; every pair not listed raises InvalidTransition."""

EVENT_TYPES: tuple[type, ...] = (Launched, LaunchFailed, StopRequested, ShutdownRequested, Killed, WorkerExited,
                                 ServerRestarted, Resumed, Started, Progress, CheckpointSaved, Evaluated, Finished,
                                 Failed)


def apply(record: RunRecord, event: RunEvent, now: float) -> RunRecord:
    """The record after `event` at time `now`; InvalidTransition if the record's state does not allow it."""
    handler = TRANSITIONS.get((record.state, type(event)))
    if handler is None:
        raise InvalidTransition(f"run {record.run_id}: {type(event).__name__} is not allowed in state "
                                f"{record.state.name}")
    return handler(record, event, now)
