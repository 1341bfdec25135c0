"""WORKER_CPUS: the CPU-list syntax, the least-used placement, the setting's checks, and real worker processes
that run on the CPUs they were given."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from rl_service.core.runs.events import Failed, WorkerEvent
from rl_service.core.runs.jobs import RunJob
from rl_service.infra.cpu_placement import CpuPlacement, format_cpu_list, parse_cpu_list
from rl_service.infra.process_executor import LocalProcessExecutor
from rl_service.infra.settings import Settings, describe_validation_error
from tests.unit.test_process_executor import JOB, events_until

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs a machine with two CPUs to pin to")


@pytest.mark.parametrize(("text", "cpus"), [
    ("", ()),
    ("  ", ()),
    ("0", (0,)),
    ("0-3,6", (0, 1, 2, 3, 6)),
    (" 5 , 1-2 ", (5, 1, 2)),
    ("4095", (4095,)),
])
def test_cpu_lists_are_read_in_the_order_given(text: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize(("text", "words"), [
    ("a", "'a' is not a CPU number"),
    ("1-x", "'1-x' is not a CPU number"),
    ("-1", "'-1' is not a CPU number"),
    ("3-1", "'3-1': a range runs from the lower CPU"),
    ("0-4096", "CPU numbers run from 0 to 4095"),
    ("0,,1", "has an empty entry"),
    ("1,0-2", "CPU 1 is listed twice"),
    ("9" * 500, "'99999999999999999999': CPU numbers run"),  # a long value is quoted by its first 20 characters only
])
def test_bad_cpu_lists_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as info:
        parse_cpu_list(text)
    assert len(str(info.value)) < 120


def test_cpu_lists_are_written_back_with_runs_collapsed() -> None:
    assert format_cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert parse_cpu_list(format_cpu_list({0, 1, 2, 5, 7, 8})) == (0, 1, 2, 5, 7, 8)
    assert format_cpu_list({3}) == "3"


def test_each_worker_gets_the_least_used_cpu_and_gives_it_back() -> None:
    placement = CpuPlacement([2, 0, 1])
    assert placement.take("a") == {2}  # ties go to the CPU listed first
    assert placement.take("b") == {0}
    assert placement.take("c") == {1}
    assert placement.take("d") == {2}  # every CPU has one worker: round again
    placement.release("b")
    assert placement.take("e") == {0}  # the freed CPU is the least used
    placement.release("nobody")  # a worker that held nothing: no change
    assert placement.take("f") == {0}  # 0 and 1 have one worker each, 2 has two: 0 is listed before 1


def test_a_key_taking_again_gives_its_cpus_back_first() -> None:
    placement = CpuPlacement([0, 1])
    assert placement.take("run") == {0}
    assert placement.take("run") == {0}  # a resumed run's new process: not counted twice
    assert placement.take("other") == {1}


def test_a_worker_with_several_threads_gets_that_many_cpus() -> None:
    placement = CpuPlacement([0, 1, 2, 3], per_worker=2)
    assert placement.take("a") == {0, 1}
    assert placement.take("b") == {2, 3}
    assert CpuPlacement([0], per_worker=4).take("a") == {0}  # never more than the list holds


def test_no_list_means_no_pinning() -> None:
    assert CpuPlacement([]).take("a") is None


def _error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None)  # type: ignore[call-arg]
    return describe_validation_error(info.value)


@needs_two_cpus
def test_the_setting_is_read_as_a_cpu_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CPUS", f"{CPUS[1]},{CPUS[0]}")
    assert Settings(_env_file=None).worker_cpu_list == (CPUS[1], CPUS[0])  # type: ignore[call-arg]
    monkeypatch.delenv("WORKER_CPUS")
    assert Settings(_env_file=None).worker_cpu_list == ()  # type: ignore[call-arg]


def test_the_setting_refuses_cpus_the_server_may_not_use(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _error(monkeypatch, WORKER_CPUS="4000")
    assert "WORKER_CPUS: " in text and "CPU 4000 is not one this server may run on" in text
    assert f"it may use {format_cpu_list(set(CPUS))}" in text


def test_the_setting_refuses_a_malformed_list(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "WORKER_CPUS: " in _error(monkeypatch, WORKER_CPUS="0-")


def test_the_setting_needs_a_cpu_per_torch_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _error(monkeypatch, WORKER_CPUS=str(CPUS[0]), WORKER_TORCH_THREADS="2")
    assert "WORKER_CPUS lists 1 CPU(s), fewer than WORKER_TORCH_THREADS (2)" in text


def test_the_setting_is_for_the_local_executor_only(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    text = _error(monkeypatch, WORKER_CPUS=str(CPUS[0]), EXECUTOR="ray")
    assert "WORKER_CPUS pins the local executor's processes" in text


def affinity_reporter(job: RunJob, services: object, emit: Callable[[WorkerEvent], None],
                      should_stop: Callable[[], bool]) -> None:
    """Reports the CPUs each of its threads may run on (the lifeline's and one it starts included), then waits to
    be stopped."""
    started = threading.Event()
    finish = threading.Event()
    thread = threading.Thread(target=lambda: (started.set(), finish.wait()))
    thread.start()
    started.wait()
    lists = {format_cpu_list(os.sched_getaffinity(int(task))) for task in os.listdir("/proc/self/task")}
    finish.set()
    thread.join()
    emit(Failed(job.run_id, 0, f"{len(os.listdir('/proc/self/task')) > 1} {' '.join(sorted(lists))}"))
    while not should_stop():
        time.sleep(0.01)


@needs_two_cpus
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_worker_processes_run_on_the_cpus_they_were_given(start_method: str) -> None:
    executor = LocalProcessExecutor(affinity_reporter, services=None, start_method=start_method,
                                    preload=("tests.unit.test_cpu_placement",), log_level="ERROR",
                                    cpus=CPUS[:2])
    try:
        first, second = (dataclasses.replace(JOB, run_id=name) for name in ("r1", "r2"))
        executor.launch("r1", first)
        executor.launch("r2", second)
        reports = {event.run_id: event.error for event in events_until(executor, 2)
                   if isinstance(event, Failed)}
        assert reports == {"r1": f"True {CPUS[0]}", "r2": f"True {CPUS[1]}"}, "every thread on the worker's CPU"
        # Giving a stopped run's CPU to the next run: tests/integration/test_worker_cpus.py (a graceful stop; a
        # SIGKILLed worker may leave the shared event queue locked, see the closing note of session 7).
    finally:
        executor.close()


def test_workers_are_not_pinned_by_default() -> None:
    executor = LocalProcessExecutor(affinity_reporter, services=None, start_method="spawn",
                                    preload=("tests.unit.test_cpu_placement",), log_level="ERROR")
    try:
        executor.launch(JOB.run_id, JOB)
        (report,) = [event for event in events_until(executor, 1) if isinstance(event, Failed)]
        assert report.error == f"True {format_cpu_list(os.sched_getaffinity(0))}"
    finally:
        executor.close()
