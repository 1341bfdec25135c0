"""The run state machine: every state x every event, allowed or refused, and what each allowed one does."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from rl_service.core.runs.events import CheckpointSaved, Evaluated, Failed, Finished, Progress, Started
from rl_service.core.runs.records import (
    SERVER_DIED,
    WORKER_DIED,
    Attempt,
    Evaluation,
    Metrics,
    RunRecord,
    RunState,
)
from rl_service.core.runs.state_machine import (
    EVENT_TYPES,
    TRANSITIONS,
    InvalidTransition,
    Killed,
    Launched,
    LaunchFailed,
    Resumed,
    ServerRestarted,
    ShutdownRequested,
    StopRequested,
    WorkerExited,
    apply,
)

NOW = 1_000.0
METRICS = Metrics(mean_episode_reward=12.5, episodes_completed=3)
EVENTS: dict[type, Any] = {
    Launched: Launched(),
    LaunchFailed: LaunchFailed("no memory"),
    StopRequested: StopRequested(),
    ShutdownRequested: ShutdownRequested(),
    Killed: Killed("did not stop in 30s"),
    WorkerExited: WorkerExited(-9),
    ServerRestarted: ServerRestarted(),
    Resumed: Resumed(),
    Started: Started("run-1", 4242, 200),
    Progress: Progress("run-1", 300, METRICS),
    CheckpointSaved: CheckpointSaved("run-1", 400, "/c/checkpoint_400_steps.zip"),
    Evaluated: Evaluated("run-1", Evaluation(150.0, 12.5, 300, 5, 150.0), best=True),
    Finished: Finished("run-1", 512, METRICS, "/m/model.zip", "/c/checkpoint_512_steps.zip", stopped_early=False),
    Failed: Failed("run-1", 350, "RuntimeError: boom"),
}
# (state, event) -> the state it leads to; every pair not listed must raise.
EXPECTED: dict[tuple[RunState, type], RunState] = {
    (RunState.PENDING, Launched): RunState.RUNNING,
    (RunState.PENDING, LaunchFailed): RunState.FAILED,
    (RunState.PENDING, StopRequested): RunState.CANCELLED,
    (RunState.PENDING, ShutdownRequested): RunState.INTERRUPTED,
    (RunState.RUNNING, StopRequested): RunState.RUNNING,
    (RunState.RUNNING, ShutdownRequested): RunState.RUNNING,
    (RunState.RUNNING, Started): RunState.RUNNING,
    (RunState.RUNNING, Progress): RunState.RUNNING,
    (RunState.RUNNING, CheckpointSaved): RunState.RUNNING,
    (RunState.RUNNING, Evaluated): RunState.RUNNING,
    (RunState.RUNNING, Finished): RunState.SUCCEEDED,
    (RunState.RUNNING, Failed): RunState.FAILED,
    (RunState.RUNNING, Killed): RunState.INTERRUPTED,
    (RunState.RUNNING, WorkerExited): RunState.FAILED,  # max_attempts=1: the first death is the last
    (RunState.RUNNING, ServerRestarted): RunState.PENDING,  # a server's death is not the run's: it resumes
    (RunState.PENDING, ServerRestarted): RunState.PENDING,
    (RunState.INTERRUPTED, Resumed): RunState.PENDING,
    (RunState.FAILED, Resumed): RunState.PENDING,
    (RunState.CANCELLED, Resumed): RunState.PENDING,
}


def record(state: RunState, **changes: Any) -> RunRecord:
    base = RunRecord(run_id="run-1", experiment_id="e", algorithm="PPO", env_id="CartPole-v1", state=state,
                     total_timesteps=512, seed=1, hyperparameters={}, checkpoint_interval=100,
                     model_path="/m/model.zip", timesteps_done=200, created_at=1.0, started_at=2.0)
    return base.evolve(**changes)


def test_every_event_type_is_covered_by_these_tests() -> None:
    assert set(EVENTS) == set(EVENT_TYPES)
    assert {event for _, event in TRANSITIONS} <= set(EVENT_TYPES)


@pytest.mark.parametrize(("state", "event_type"), list(itertools.product(RunState, EVENT_TYPES)),
                         ids=lambda v: v.name if isinstance(v, RunState) else v.__name__)
def test_every_state_and_event(state: RunState, event_type: type) -> None:
    before = record(state, finished_at=5.0 if state.is_terminal else 0.0,
                    timesteps_done=512 if state is RunState.SUCCEEDED else 200)
    event = EVENTS[event_type]
    if (state, event_type) == (RunState.SUCCEEDED, Resumed):
        with pytest.raises(InvalidTransition, match="larger total_timesteps"):
            apply(before, event, NOW)  # a finished budget resumes only when extended (see below)
        return
    expected = EXPECTED.get((state, event_type))
    if expected is None:
        with pytest.raises(InvalidTransition, match=f"{event_type.__name__} is not allowed in state {state.name}"):
            apply(before, event, NOW)
        return
    after = apply(before, event, NOW)
    assert after.state is expected
    assert after.run_id == before.run_id and after.created_at == before.created_at
    assert (after.finished_at == NOW) == (expected.is_terminal and not state.is_terminal)
    if expected.is_terminal and not state.is_terminal and after.attempts:
        assert after.attempts[-1].finished_at == NOW and after.attempts[-1].outcome, "the open attempt is closed"
    assert before.state is state, "records are immutable"


def test_table_and_expectations_agree() -> None:
    assert set(TRANSITIONS) == {*EXPECTED, (RunState.SUCCEEDED, Resumed)}


def test_launch_starts_the_clock_and_a_failed_launch_says_why() -> None:
    assert apply(record(RunState.PENDING, started_at=0.0), Launched(), NOW).started_at == NOW
    failed = apply(record(RunState.PENDING), LaunchFailed("no memory"), NOW)
    assert failed.error == "could not start a worker: no memory"


def test_stop_cancels_a_pending_run_and_marks_a_running_one() -> None:
    cancelled = apply(record(RunState.PENDING), StopRequested(), NOW)
    assert cancelled.stop_requested and cancelled.error == ""
    marked = apply(record(RunState.RUNNING), StopRequested(), NOW)
    assert marked.stop_requested and marked.state is RunState.RUNNING and marked.finished_at == 0.0


def test_progress_and_checkpoints_move_the_counters() -> None:
    progressed = apply(record(RunState.RUNNING), EVENTS[Progress], NOW)
    assert progressed.timesteps_done == 300 and progressed.metrics == METRICS
    saved = apply(progressed, EVENTS[CheckpointSaved], NOW)
    assert saved.timesteps_done == 400 and saved.last_checkpoint_path == "/c/checkpoint_400_steps.zip"


def test_evaluations_set_the_last_and_only_a_best_one_the_best() -> None:
    first, better, worse = (Evaluation(10.0, 1.0, 100, 5), Evaluation(50.0, 2.0, 200, 5), Evaluation(20.0, 3.0, 300, 5))
    after = apply(record(RunState.RUNNING), Evaluated("run-1", first, best=True), NOW)
    assert after.last_evaluation == first and after.best_evaluation == first
    after = apply(after, Evaluated("run-1", better, best=True), NOW)
    assert after.last_evaluation == better and after.best_evaluation == better
    after = apply(after, Evaluated("run-1", worse, best=False), NOW)
    assert after.last_evaluation == worse and after.best_evaluation == better
    assert after.timesteps_done == 200 and after.state is RunState.RUNNING, "counters move with progress only"
    # A resumed run keeps them: Resumed changes neither.
    ended = apply(after, Failed("run-1", 300, "boom"), NOW)
    resumed = apply(ended, Resumed(), NOW)
    assert resumed.last_evaluation == worse and resumed.best_evaluation == better


@pytest.mark.parametrize(("stopped_early", "stop_requested", "state", "error"), [
    (False, False, RunState.SUCCEEDED, ""),
    (False, True, RunState.SUCCEEDED, ""),  # finished its budget before the stop landed
    (True, True, RunState.CANCELLED, ""),
    (True, False, RunState.INTERRUPTED, "interrupted: the server shut down; the final checkpoint and model are kept"),
])
def test_finished_decides_between_succeeded_cancelled_and_interrupted(
        stopped_early: bool, stop_requested: bool, state: RunState, error: str) -> None:
    event = Finished("run-1", 300, METRICS, "/m/model.zip", "", stopped_early=stopped_early)
    after = apply(record(RunState.RUNNING, stop_requested=stop_requested, last_checkpoint_path="/c/old.zip"),
                  event, NOW)
    assert (after.state, after.error) == (state, error)
    assert after.model_saved and after.model_path == "/m/model.zip" and after.timesteps_done == 300
    assert after.last_checkpoint_path == "/c/old.zip", "an empty checkpoint path keeps the last known one"


def test_failures_keep_the_furthest_timesteps_and_the_reason() -> None:
    failed = apply(record(RunState.RUNNING, timesteps_done=400), Failed("run-1", 350, "RuntimeError: boom"), NOW)
    assert failed.timesteps_done == 400 and failed.error == "RuntimeError: boom"
    exited = apply(record(RunState.RUNNING), WorkerExited(-9), NOW)
    assert exited.error == ("the worker process exited with code -9 without reporting a result; the run's worker "
                            "has died 1 time (MAX_RUN_ATTEMPTS=1), so it is not resumed again")


@pytest.mark.parametrize(("stop_requested", "state"), [(True, RunState.CANCELLED), (False, RunState.INTERRUPTED)])
def test_a_kill_ends_the_run_as_the_stop_that_asked_for_it(stop_requested: bool, state: RunState) -> None:
    after = apply(record(RunState.RUNNING, stop_requested=stop_requested), Killed("did not stop in 30s"), NOW)
    assert after.state is state and after.error == "did not stop in 30s"


def test_shutdown_interrupts_a_pending_run_and_leaves_a_running_one_to_its_worker() -> None:
    pending = apply(record(RunState.PENDING), ShutdownRequested(), NOW)
    assert pending.error == "interrupted: the server shut down before the run started"
    running = record(RunState.RUNNING)
    assert apply(running, ShutdownRequested(), NOW) == running


def test_resume_clears_the_end_and_can_extend_the_budget() -> None:
    ended = record(RunState.INTERRUPTED, error="interrupted", finished_at=5.0, stop_requested=True, model_saved=True)
    resumed = apply(ended, Resumed(), NOW)
    assert (resumed.state, resumed.error, resumed.finished_at, resumed.stop_requested, resumed.model_saved) == (
        RunState.PENDING, "", 0.0, False, False)
    assert resumed.timesteps_done == ended.timesteps_done and resumed.total_timesteps == 512
    assert apply(ended, Resumed(total_timesteps=2048), NOW).total_timesteps == 2048
    succeeded = record(RunState.SUCCEEDED, timesteps_done=512, model_saved=True)
    assert apply(succeeded, Resumed(total_timesteps=1024), NOW).state is RunState.PENDING
    with pytest.raises(InvalidTransition):
        apply(succeeded, Resumed(total_timesteps=512), NOW)


def launched(**changes: Any) -> RunRecord:
    return apply(record(RunState.PENDING, **changes), Launched(), NOW)


def test_a_launch_opens_an_attempt_and_the_end_closes_it_with_its_outcome() -> None:
    running = launched(timesteps_done=0)
    assert running.attempts == (Attempt(1, 0, NOW),)
    progressed = apply(running, Progress("run-1", 300, METRICS), NOW)
    failed = apply(progressed, Failed("run-1", 350, "RuntimeError: boom"), NOW + 5)
    assert failed.attempts == (Attempt(1, 0, NOW, 350, NOW + 5, "FAILED", "RuntimeError: boom"),)
    again = apply(apply(failed, Resumed(), NOW + 6), Launched(), NOW + 7)
    assert again.attempt == 2 and again.attempts[-1] == Attempt(2, 350, NOW + 7)


def test_a_dead_worker_is_requeued_until_its_deaths_reach_the_cap() -> None:
    run = launched()
    for death in (1, 2):
        run = apply(run, WorkerExited(-9, max_attempts=3), NOW)
        assert run.state is RunState.PENDING and run.attempt == death + 1 and run.deaths == death
        assert run.attempts[-1].outcome == WORKER_DIED and run.error == ""
        run = apply(run, Launched(), NOW)
    failed = apply(run, WorkerExited(-9, max_attempts=3), NOW)
    assert failed.state is RunState.FAILED and failed.deaths == 3
    assert failed.error.endswith("has died 3 times (MAX_RUN_ATTEMPTS=3), so it is not resumed again")


def test_a_server_restart_requeues_or_interrupts_a_run_it_found_in_flight() -> None:
    requeued = apply(launched(), ServerRestarted(auto_resume=True), NOW)
    assert requeued.state is RunState.PENDING and requeued.attempts[-1].outcome == SERVER_DIED
    kept = apply(launched(), ServerRestarted(auto_resume=False), NOW)
    assert kept.state is RunState.INTERRUPTED and kept.error.startswith("interrupted: the server stopped")
    queued = record(RunState.PENDING)
    assert apply(queued, ServerRestarted(auto_resume=True), NOW) == queued
    assert apply(queued, ServerRestarted(auto_resume=False), NOW).state is RunState.INTERRUPTED
    # Only the worker's deaths count against MAX_RUN_ATTEMPTS: a run outlives any number of server restarts.
    run = launched()
    for _ in range(5):
        run = apply(apply(run, ServerRestarted(), NOW), Launched(), NOW)
    assert run.deaths == 0 and run.attempt == 6
    died = apply(run, WorkerExited(-9, max_attempts=2), NOW)
    assert died.state is RunState.PENDING and died.deaths == 1
