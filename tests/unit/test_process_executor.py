"""LocalProcessExecutor with a real child process and a tiny target: plain-dict jobs and events, stop, kill, the
data-directory lock a worker holds."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rl_service.core.runs.events import Failed, Finished, Started, WorkerEvent
from rl_service.core.runs.jobs import RunJob
from rl_service.core.runs.records import Metrics
from rl_service.infra.data_dir_lock import DataDirInUse, DataDirLock
from rl_service.infra.process_executor import LocalProcessExecutor

JOB = RunJob(run_id="run-x", experiment_id="e", algorithm="ppo", env_id="CartPole-v1", total_timesteps=10, seed=1,
             hyperparameters={"n_steps": "64"}, checkpoint_interval=100, model_path="/m/model.zip")


def polite_worker(job: RunJob, services: object, emit: Callable[[WorkerEvent], None],
                  should_stop: Callable[[], bool]) -> None:
    """Says what it got, then waits for a stop request and finishes."""
    emit(Started(job.run_id, os.getpid()))
    emit(Failed(job.run_id, 0, f"sigint={signal.getsignal(signal.SIGINT)!r} services={services!r} "
                               f"n_steps={job.hyperparameters['n_steps']}"))
    while not should_stop():
        time.sleep(0.01)
    emit(Finished(job.run_id, 5, Metrics(), job.model_path, "", stopped_early=True))


def stubborn_worker(job: RunJob, services: object, emit: Callable[[WorkerEvent], None],
                    should_stop: Callable[[], bool]) -> None:
    """Never stops by itself."""
    emit(Started(job.run_id, os.getpid()))
    while True:
        time.sleep(0.1)


def events_until(executor: LocalProcessExecutor, count: int, timeout: float = 30) -> list[WorkerEvent]:
    found: list[WorkerEvent] = []
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        event = executor.next_event(timeout=0.2)
        if event is not None:
            found.append(event)
    return found


@pytest.fixture
def make_executor() -> Iterator[Callable[..., LocalProcessExecutor]]:
    made: list[LocalProcessExecutor] = []

    def factory(target: Callable[..., None], lock_fd: int | None = None,
                start_method: str = "spawn") -> LocalProcessExecutor:
        executor = LocalProcessExecutor(target, services="server-config", start_method=start_method,
                                        preload=("tests.unit.test_process_executor",), log_level="ERROR",
                                        lock_fd=lock_fd)
        made.append(executor)
        return executor

    yield factory
    for executor in made:
        executor.close()


def test_a_worker_gets_its_job_ignores_sigint_and_stops_when_asked(
        make_executor: Callable[..., LocalProcessExecutor]) -> None:
    executor = make_executor(polite_worker)
    executor.launch(JOB.run_id, JOB)
    started, report = events_until(executor, 2)
    assert isinstance(started, Started) and started.pid != os.getpid()
    assert isinstance(report, Failed)
    assert report.error == "sigint=<Handlers.SIG_IGN: 1> services='server-config' n_steps=64"
    assert executor.active() == {JOB.run_id}
    executor.request_stop(JOB.run_id)
    (finished,) = events_until(executor, 1)
    assert isinstance(finished, Finished) and finished.stopped_early
    deadline = time.monotonic() + 30
    while not (ended := executor.reap()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ended == [(JOB.run_id, 0)] and executor.active() == set()


def test_kill_ends_a_worker_that_does_not_stop(make_executor: Callable[..., LocalProcessExecutor]) -> None:
    executor = make_executor(stubborn_worker)
    executor.launch(JOB.run_id, JOB)
    assert isinstance(events_until(executor, 1)[0], Started)
    executor.request_stop(JOB.run_id)
    executor.kill(JOB.run_id)
    assert executor.reap() == [(JOB.run_id, -signal.SIGKILL)]


def test_a_malformed_event_is_dropped(make_executor: Callable[..., LocalProcessExecutor]) -> None:
    executor = make_executor(polite_worker)
    executor._events.put({"version": 99, "kind": "started"})
    assert executor.next_event(timeout=5) is None


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_a_worker_holds_the_data_dir_lock_until_it_ends(make_executor: Callable[..., LocalProcessExecutor],
                                                       tmp_path: Path, start_method: str) -> None:
    lock = DataDirLock.acquire(tmp_path)
    executor = make_executor(stubborn_worker, lock.fd, start_method)
    executor.launch(JOB.run_id, JOB)
    assert isinstance(events_until(executor, 1)[0], Started)
    lock.release()  # the server lets go (or dies): its worker still holds the same open file description
    holder = f"DATA_DIR {tmp_path} is in use by another server (pid {os.getpid()})"
    with pytest.raises(DataDirInUse, match=re.escape(holder)):
        DataDirLock.acquire(tmp_path, wait_seconds=0.3)
    executor.kill(JOB.run_id)
    DataDirLock.acquire(tmp_path, wait_seconds=5).release()
