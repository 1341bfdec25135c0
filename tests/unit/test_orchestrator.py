"""The orchestrator on in-memory fakes of its ports: no process, no gRPC, no training."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rl_service.core.errors import (
    CapacityExceeded,
    InvalidHyperparameter,
    InvalidRequest,
    RunNotFound,
    RunStateConflict,
    ServiceShuttingDown,
)
from rl_service.core.runs.events import CheckpointSaved, Finished, Progress, Started, WorkerEvent
from rl_service.core.runs.jobs import RunJob
from rl_service.core.runs.orchestrator import Orchestrator, OrchestratorConfig
from rl_service.core.runs.records import (
    SERVER_DIED,
    WORKER_DIED,
    Attempt,
    Metrics,
    RunFilter,
    RunRecord,
    RunState,
    TrainingRequest,
)

WAIT = 5.0


class MemoryRegistry:
    """RunRegistry in a dict."""

    def __init__(self, records: list[RunRecord] = ()) -> None:  # type: ignore[assignment]
        self.records = {r.run_id: r for r in records}
        self.closed = False

    def insert(self, record: RunRecord) -> None:
        assert record.run_id not in self.records
        self.records[record.run_id] = record

    def update(self, record: RunRecord) -> None:
        self.records[record.run_id] = record

    def get(self, run_id: str) -> RunRecord | None:
        return self.records.get(run_id)

    def find(self, run_filter: RunFilter) -> list[RunRecord]:
        found = [r for r in self.records.values() if run_filter.state in (None, r.state)
                 and run_filter.experiment_id in (None, r.experiment_id)]
        return sorted(found, key=lambda r: r.created_at, reverse=True)

    def delete(self, run_id: str) -> None:
        self.records.pop(run_id, None)

    def close(self) -> None:
        self.closed = True


class MemoryStore:
    """ModelStore that only computes paths; `saved` says which checkpoints a run has on "disk"."""

    def __init__(self) -> None:
        self.saved: dict[str, list[Path]] = {}
        self.attempts: dict[str, list[dict[str, Any]]] = {}
        self.deleted: list[str] = []

    def resolve_model_path(self, run_id: str, requested: str) -> Path:
        return Path("/models") / run_id / (requested or "model.zip")

    def run_dir(self, run_id: str) -> Path:
        return Path("/models") / run_id

    def save_model(self, model: Any, path: Path) -> None:
        raise AssertionError("the orchestrator never saves models")

    def save_checkpoint(self, run_id: str, model: Any, timesteps: int) -> Path:
        raise AssertionError("the orchestrator never saves checkpoints")

    def checkpoints(self, run_id: str) -> list[Path]:
        return list(self.saved.get(run_id, []))

    def latest_checkpoint(self, run_id: str) -> Path | None:
        return self.saved[run_id][-1] if self.saved.get(run_id) else None

    def replay_buffer(self, checkpoint: Path) -> Path | None:
        return None

    def record_attempts(self, run_id: str, attempts: list[dict[str, Any]]) -> None:
        self.attempts[run_id] = attempts

    def delete_run(self, run_id: str, model_path: Path) -> None:
        self.deleted.append(run_id)
        self.saved.pop(run_id, None)

    def write_json(self, path: Path, data: Any) -> None:
        raise AssertionError("the orchestrator never writes run files")


class FakeExecutor:
    """Executor whose workers are scripted by the test: it pushes their events and exits."""

    def __init__(self) -> None:
        self.jobs: dict[str, RunJob] = {}
        self.stops: list[str] = []
        self.kills: list[str] = []
        self.events: queue.Queue[WorkerEvent] = queue.Queue()
        self.exits: list[tuple[str, int]] = []
        self.on_stop: Callable[[str], None] = lambda run_id: None
        self.fail_launch = False
        self.closed = False
        self._lock = threading.Lock()

    def launch(self, run_id: str, job: RunJob) -> None:
        if self.fail_launch:
            raise OSError("no processes left")
        self.jobs[run_id] = job

    def request_stop(self, run_id: str) -> None:
        self.stops.append(run_id)
        self.on_stop(run_id)

    def kill(self, run_id: str) -> None:
        self.kills.append(run_id)
        self.exit(run_id, -9)

    def next_event(self, timeout: float) -> WorkerEvent | None:
        try:
            return self.events.get(timeout=timeout) if timeout > 0 else self.events.get_nowait()
        except queue.Empty:
            return None

    def reap(self) -> list[tuple[str, int]]:
        with self._lock:
            ended, self.exits = self.exits, []
        return ended

    def active(self) -> set[str]:
        return set(self.jobs)

    def close(self) -> None:
        self.closed = True

    def finish(self, run_id: str, timesteps: int = 512, stopped_early: bool = False) -> None:
        self.events.put(Finished(run_id, timesteps, Metrics(), f"/models/{run_id}/model.zip",
                                 f"/ckpt/{run_id}/checkpoint_{timesteps}_steps.zip", stopped_early))

    def exit(self, run_id: str, code: int) -> None:
        with self._lock:
            self.exits.append((run_id, code))


class Log:
    """A logger keeping (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **fields: self.lines.append((level, event, fields))


class Harness:
    def __init__(self, **config: Any) -> None:
        self.registry = MemoryRegistry(config.pop("records", []))
        self.store = MemoryStore()
        self.store.saved.update(config.pop("checkpoints", {}))
        self.executor = FakeExecutor()
        self.log = Log()
        settings = {"max_concurrent_runs": 1, "max_queued_runs": 2, "stop_timeout_seconds": 0.5, **config}
        self.orchestrator = Orchestrator(OrchestratorConfig(**settings), self.registry, self.store,
                                         self.executor, self.log)

    def start(self, **hyperparameters: str) -> str:
        request = TrainingRequest(algorithm="PPO", env_id="CartPole-v1", total_timesteps=512, seed=7,
                                  hyperparameters=hyperparameters or {"n_steps": "64"})
        return self.orchestrator.start_run(request).run_id

    def wait_state(self, run_id: str, state: RunState) -> RunRecord:
        deadline = time.monotonic() + WAIT
        while (record := self.orchestrator.get(run_id)).state is not state:
            assert time.monotonic() < deadline, f"{run_id} is {record.state.name}, not {state.name}"
            time.sleep(0.01)
        return record


@pytest.fixture
def harness() -> Iterator[Harness]:
    made = Harness()
    yield made
    made.orchestrator.shutdown(0)


def test_a_run_is_recorded_launched_with_a_plain_job_and_finishes(harness: Harness) -> None:
    run_id = harness.start(n_steps="64", learning_rate="lin_0.001")
    record = harness.orchestrator.get(run_id)
    assert record.state is RunState.RUNNING and record.started_at > 0
    assert harness.registry.records[run_id].state is RunState.RUNNING
    job = harness.executor.jobs[run_id]
    assert RunJob.from_dict(job.to_dict()) == job
    assert job.hyperparameters["learning_rate"] == "lin_0.001" and job.hyperparameters["n_steps"] == "64"
    assert job.hyperparameters == record.hyperparameters and job.seed == 7 and job.algorithm == "ppo"

    harness.executor.events.put(Started(run_id, 99))
    harness.executor.events.put(Progress(run_id, 128, Metrics(mean_episode_reward=20.0)))
    harness.executor.events.put(CheckpointSaved(run_id, 256, "/ckpt/a/checkpoint_256_steps.zip"))
    harness.executor.finish(run_id)
    done = harness.wait_state(run_id, RunState.SUCCEEDED)
    assert done.model_saved and done.timesteps_done == 512 and done.finished_at >= done.started_at
    assert harness.registry.records[run_id] == done


def test_invalid_requests_record_nothing(harness: Harness) -> None:
    with pytest.raises(InvalidHyperparameter) as caught:
        harness.start(learning_rate="abc")
    assert caught.value.field == "hyperparameters.learning_rate"
    assert harness.registry.records == {} and harness.executor.jobs == {}


def test_runs_queue_for_a_slot_and_a_full_queue_is_refused(harness: Harness) -> None:
    first, second, third = harness.start(), harness.start(), harness.start()
    assert [harness.orchestrator.get(r).state for r in (first, second, third)] == [
        RunState.RUNNING, RunState.PENDING, RunState.PENDING]
    with pytest.raises(CapacityExceeded, match="MAX_QUEUED_RUNS=2"):
        harness.start()
    harness.executor.finish(first)
    harness.wait_state(second, RunState.RUNNING)
    assert second in harness.executor.jobs and third not in harness.executor.jobs


def test_stopping_a_pending_run_cancels_it_without_a_worker(harness: Harness) -> None:
    harness.start()
    queued = harness.start()
    stopped = harness.orchestrator.stop_run(queued)
    assert stopped.state is RunState.CANCELLED and stopped.stop_requested
    assert queued not in harness.executor.stops and queued not in harness.executor.jobs


def test_a_stopped_run_that_checkpoints_in_time_ends_cancelled(harness: Harness) -> None:
    run_id = harness.start()
    harness.executor.on_stop = lambda rid: harness.executor.finish(rid, timesteps=300, stopped_early=True)
    record = harness.orchestrator.stop_run(run_id)
    assert record.state is RunState.CANCELLED and record.error == "" and record.timesteps_done == 300
    assert harness.executor.kills == []


def test_a_run_that_ignores_stop_is_killed_and_its_exit_is_not_a_crash(harness: Harness) -> None:
    run_id = harness.start()
    record = harness.orchestrator.stop_run(run_id)  # the fake worker never answers
    assert record.state is RunState.CANCELLED
    assert record.error.startswith("the worker did not stop within 0.5s and was killed")
    assert harness.executor.kills == [run_id]
    time.sleep(0.5)  # the pump reaps the killed worker's exit: it must not turn the run FAILED
    assert harness.orchestrator.get(run_id).state is RunState.CANCELLED


def test_a_worker_that_dies_silently_fails_its_run_when_it_may_not_retry() -> None:
    harness = Harness(max_run_attempts=1)
    try:
        run_id = harness.start()
        harness.executor.exit(run_id, 137)
        record = harness.wait_state(run_id, RunState.FAILED)
        assert record.error.startswith("the worker process exited with code 137 without reporting a result")
    finally:
        harness.orchestrator.shutdown(0)


def test_events_after_the_end_and_out_of_order_are_dropped(harness: Harness) -> None:
    run_id = harness.start()
    harness.executor.finish(run_id)
    harness.wait_state(run_id, RunState.SUCCEEDED)
    harness.executor.events.put(Progress(run_id, 9999, Metrics()))
    harness.executor.events.put(Progress("run-unknown", 1, Metrics()))
    time.sleep(0.3)
    assert harness.orchestrator.get(run_id).timesteps_done == 512


def test_a_launch_failure_fails_the_run_and_frees_the_slot() -> None:
    harness = Harness()
    harness.executor.fail_launch = True
    try:
        record = harness.orchestrator.get(harness.start())
        assert record.state is RunState.FAILED and record.error == "could not start a worker: no processes left"
        harness.executor.fail_launch = False
        assert harness.orchestrator.get(harness.start()).state is RunState.RUNNING
    finally:
        harness.orchestrator.shutdown(0)


def test_shutdown_interrupts_waiting_runs_and_asks_running_ones_to_stop() -> None:
    harness = Harness()
    running, waiting = harness.start(), harness.start()
    harness.executor.on_stop = lambda rid: harness.executor.finish(rid, timesteps=200, stopped_early=True)
    harness.orchestrator.shutdown(grace_seconds=5)
    assert harness.registry.records[waiting].state is RunState.INTERRUPTED
    stopped = harness.registry.records[running]
    assert stopped.state is RunState.INTERRUPTED and stopped.model_saved and stopped.timesteps_done == 200
    assert harness.executor.stops == [running] and harness.executor.kills == []
    assert harness.executor.closed and harness.registry.closed
    with pytest.raises(ServiceShuttingDown):
        harness.start()


def test_shutdown_kills_what_outlives_the_grace_period() -> None:
    harness = Harness()
    run_id = harness.start()
    harness.orchestrator.shutdown(grace_seconds=0.2)
    record = harness.registry.records[run_id]
    assert record.state is RunState.INTERRUPTED and "killed at shutdown after 0.2s grace" in record.error
    assert harness.executor.kills == [run_id]


def test_watch_follows_a_run_to_its_end(harness: Harness) -> None:
    run_id = harness.start()
    seen: list[RunRecord] = []
    watcher = threading.Thread(target=lambda: seen.extend(
        harness.orchestrator.watch(run_id, lambda: True, poll_seconds=0.05)))
    watcher.start()
    time.sleep(0.1)
    harness.executor.events.put(Progress(run_id, 128, Metrics()))
    time.sleep(0.1)
    harness.executor.finish(run_id)
    watcher.join(WAIT)
    assert not watcher.is_alive()
    assert seen[0].state is RunState.RUNNING and seen[-1].state is RunState.SUCCEEDED
    assert 128 in [r.timesteps_done for r in seen]
    assert [r.timesteps_done for r in seen] == sorted(r.timesteps_done for r in seen)


def test_watch_ends_when_the_client_leaves(harness: Harness) -> None:
    run_id = harness.start()
    active = [True]
    stream = harness.orchestrator.watch(run_id, lambda: active[0], poll_seconds=0.05)
    assert next(stream).state is RunState.RUNNING
    active[0] = False
    assert list(stream) == []


def old_record(run_id: str, state: RunState, created_at: float, **changes: Any) -> RunRecord:
    return RunRecord(run_id=run_id, experiment_id="e", algorithm="PPO", env_id="CartPole-v1", state=state,
                     total_timesteps=512, seed=1, hyperparameters={"n_steps": "64"}, checkpoint_interval=100,
                     model_path=f"/models/{run_id}/model.zip", created_at=created_at, **changes)


def test_runs_left_unfinished_resume_at_start_up_in_their_original_order() -> None:
    newest = Path("/ckpt/run-b/checkpoint_300_steps.zip")
    records = [
        old_record("run-b", RunState.RUNNING, 2.0, timesteps_done=250, attempts=(Attempt(1, 0, 2.0),),
                   last_checkpoint_path="/ckpt/run-b/checkpoint_100_steps.zip"),
        old_record("run-a", RunState.PENDING, 1.0),
        old_record("run-c", RunState.INTERRUPTED, 3.0, timesteps_done=100, finished_at=4.0, error="interrupted",
                   attempts=(Attempt(1, 0, 3.0, 100, 4.0, "INTERRUPTED"),)),
        old_record("run-d", RunState.SUCCEEDED, 0.5, timesteps_done=512, finished_at=4.0),
    ]
    harness = Harness(records=records, checkpoints={"run-b": [newest]}, max_concurrent_runs=1, max_queued_runs=8)
    try:
        assert list(harness.executor.jobs) == ["run-a"], "one slot: the oldest goes first"
        assert [harness.orchestrator.get(r).state for r in ("run-a", "run-b", "run-c", "run-d")] == [
            RunState.RUNNING, RunState.PENDING, RunState.PENDING, RunState.SUCCEEDED]
        b = harness.orchestrator.get("run-b")
        assert b.attempt == 2 and b.attempts[0].outcome == SERVER_DIED and b.attempts[0].end_timesteps == 250
        assert b.last_checkpoint_path == str(newest), "the newest checkpoint on disk, saved after the last event"
        harness.executor.finish("run-a")
        harness.wait_state("run-b", RunState.RUNNING)
        job = harness.executor.jobs["run-b"]
        assert job.resume and job.attempt == 2 and job.attempts[0]["outcome"] == SERVER_DIED
        harness.executor.finish("run-b")
        harness.wait_state("run-c", RunState.RUNNING)
        assert harness.executor.jobs["run-c"].attempt == 2
    finally:
        harness.orchestrator.shutdown(0)


def test_without_auto_resume_runs_found_in_flight_end_interrupted() -> None:
    records = [old_record("run-b", RunState.RUNNING, 2.0, attempts=(Attempt(1, 0, 2.0),)),
               old_record("run-c", RunState.INTERRUPTED, 3.0, error="interrupted")]
    harness = Harness(records=records, auto_resume=False)
    try:
        b = harness.orchestrator.get("run-b")
        assert b.state is RunState.INTERRUPTED and b.error.startswith("interrupted: the server stopped")
        assert harness.store.attempts["run-b"][0]["outcome"] == SERVER_DIED
        assert harness.orchestrator.get("run-c").state is RunState.INTERRUPTED
        assert harness.executor.jobs == {}
        with pytest.raises(RunNotFound):
            harness.orchestrator.get("run-missing")
    finally:
        harness.orchestrator.shutdown(0)


def test_a_run_whose_worker_keeps_dying_ends_failed_at_the_cap() -> None:
    harness = Harness(max_run_attempts=3)
    try:
        run_id = harness.start()
        for attempt in (2, 3):
            harness.executor.exit(run_id, -11)
            deadline = time.monotonic() + WAIT
            while harness.orchestrator.get(run_id).attempt != attempt:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            harness.wait_state(run_id, RunState.RUNNING)
            assert harness.executor.jobs[run_id].resume and harness.executor.jobs[run_id].attempt == attempt
        harness.executor.exit(run_id, -11)
        failed = harness.wait_state(run_id, RunState.FAILED)
        assert "has died 3 times (MAX_RUN_ATTEMPTS=3)" in failed.error
        assert [a["outcome"] for a in harness.store.attempts[run_id]] == [WORKER_DIED] * 3
    finally:
        harness.orchestrator.shutdown(0)


def test_resume_continues_a_finished_run_as_its_next_attempt(harness: Harness) -> None:
    run_id = harness.start()
    harness.executor.on_stop = lambda rid: harness.executor.finish(rid, timesteps=300, stopped_early=True)
    harness.orchestrator.stop_run(run_id)
    harness.store.saved[run_id] = [Path(f"/ckpt/{run_id}/checkpoint_300_steps.zip")]
    resumed = harness.orchestrator.resume_run(run_id)
    assert resumed.state is RunState.RUNNING and resumed.attempt == 2 and resumed.total_timesteps == 512
    assert harness.executor.jobs[run_id].resume
    harness.executor.finish(run_id)
    done = harness.wait_state(run_id, RunState.SUCCEEDED)
    assert [(a.number, a.outcome) for a in done.attempts] == [(1, "CANCELLED"), (2, "SUCCEEDED")]
    extended = harness.orchestrator.resume_run(run_id, total_timesteps=2048)
    assert extended.total_timesteps == 2048 and extended.attempt == 3


@pytest.mark.parametrize(("total", "message"), [
    (100, "total_timesteps: the run has trained 300 timesteps; give a larger total"),
    (10**12, "exceeds this server's cap"),
])
def test_resume_refuses_a_budget_it_cannot_take_and_writes_nothing(harness: Harness, total: int,
                                                                   message: str) -> None:
    run_id = harness.start()
    harness.executor.on_stop = lambda rid: harness.executor.finish(rid, timesteps=300, stopped_early=True)
    harness.orchestrator.stop_run(run_id)
    harness.store.saved[run_id] = [Path("/ckpt/x/checkpoint_300_steps.zip")]
    before = harness.registry.records[run_id]
    with pytest.raises(InvalidRequest, match=message) as caught:
        harness.orchestrator.resume_run(run_id, total_timesteps=total)
    assert caught.value.field == "total_timesteps" and harness.registry.records[run_id] == before


def test_resume_and_delete_refuse_active_runs_and_runs_without_checkpoints(harness: Harness) -> None:
    running = harness.start()
    for command in (harness.orchestrator.resume_run, harness.orchestrator.delete_run):
        with pytest.raises(RunStateConflict, match="RUNNING"):
            command(running)
    queued = harness.start()
    harness.orchestrator.stop_run(queued)  # cancelled while pending: never trained
    with pytest.raises(RunStateConflict, match="has no checkpoint to resume from"):
        harness.orchestrator.resume_run(queued)
    with pytest.raises(RunNotFound):
        harness.orchestrator.resume_run("run-missing")


def test_delete_removes_the_record_and_the_files(harness: Harness) -> None:
    run_id = harness.start()
    harness.executor.finish(run_id)
    harness.wait_state(run_id, RunState.SUCCEEDED)
    harness.orchestrator.delete_run(run_id)
    assert harness.store.deleted == [run_id] and run_id not in harness.registry.records
    with pytest.raises(RunNotFound):
        harness.orchestrator.get(run_id)


def test_the_exit_of_a_resumed_runs_previous_process_is_not_its_death() -> None:
    harness = Harness(max_concurrent_runs=1)
    try:
        run_id = harness.start()
        harness.executor.on_stop = lambda rid: harness.executor.finish(rid, timesteps=300, stopped_early=True)
        harness.orchestrator.stop_run(run_id)
        harness.wait_state(run_id, RunState.CANCELLED)
        harness.store.saved[run_id] = [Path(f"/ckpt/{run_id}/checkpoint_300_steps.zip")]
        blocker = harness.start()  # takes the only slot, so the resumed run waits PENDING
        assert harness.orchestrator.resume_run(run_id).state is RunState.PENDING
        harness.executor.exit(run_id, 0)  # the first attempt's process ends only now
        deadline = time.monotonic() + 1.0
        while harness.executor.exits and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not harness.executor.exits, "the pump reaped the exit"
        record = harness.orchestrator.get(run_id)
        assert record.state is RunState.PENDING and record.attempt == 2 and record.deaths == 0
        assert not [line for line in harness.log.lines
                    if line[1] in ("worker died; the run resumes", "worker event out of order; dropped")]
        harness.executor.finish(blocker)
        harness.wait_state(run_id, RunState.RUNNING)
    finally:
        harness.orchestrator.shutdown(0)
