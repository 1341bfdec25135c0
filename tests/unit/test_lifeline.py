"""process_lifeline with real processes: the death signal, workers dying with a killed server, the exit watchdog."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rl_service.core.runs.events import Started, WorkerEvent
from rl_service.core.runs.jobs import RunJob
from rl_service.infra.data_dir_lock import DataDirInUse, DataDirLock

ROOT = Path(__file__).resolve().parents[2]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")


def stubborn_worker(job: RunJob, services: object, emit: Callable[[WorkerEvent], None],
                    should_stop: Callable[[], bool]) -> None:
    """Reports in, then never stops by itself."""
    emit(Started(job.run_id, os.getpid()))
    while True:
        time.sleep(0.1)


def descendants(pid: int) -> set[int]:
    """Every live descendant of `pid` (children, grandchildren...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_all_dead(pids: set[int], timeout: float) -> tuple[set[int], float]:
    """Poll until none of `pids` is alive or `timeout` passes: the survivors, and the seconds it took."""
    start = time.monotonic()
    while (survivors := {p for p in pids if alive(p)}) and time.monotonic() - start < timeout:
        time.sleep(0.01)
    return survivors, time.monotonic() - start


@contextlib.contextmanager
def reaped(pids: set[int]) -> Iterator[None]:
    """Whatever a failed assertion leaves, kill it at the end."""
    try:
        yield
    finally:
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@linux_only
def test_the_death_signal_kills_a_child_whose_parent_is_killed() -> None:
    parent = python("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import os, time; "
                                  "from rl_service.infra.process_lifeline import die_with_parent; "
                                  "die_with_parent(os.getppid()); print('armed', flush=True); time.sleep(60)"],
                                 stdout=subprocess.PIPE, text=True)
        child.stdout.readline()
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    with reaped({child}):
        parent.kill()
        parent.wait()
        survivors, _ = wait_all_dead({child}, timeout=5)
        assert not survivors


@linux_only
def test_a_parent_gone_before_the_death_signal_was_set_kills_at_once() -> None:
    # Expecting a parent other than the real one is what a child sees when its parent died before prctl.
    result = subprocess.run([sys.executable, "-c", "import os; from rl_service.infra.process_lifeline import "
                             "die_with_parent; die_with_parent(os.getpid()); print('survived')"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL and "survived" not in result.stdout


@linux_only
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_workers_and_the_fork_server_die_with_a_killed_server_and_free_the_lock(
        tmp_path: Path, start_method: str) -> None:
    # forkserver: the death-signal chain; spawn: the portable lifeline alone (no death signal in its workers).
    server = python("""
        import sys, time
        from pathlib import Path
        from rl_service.core.runs.events import Started
        from rl_service.core.runs.jobs import RunJob
        from rl_service.infra.data_dir_lock import DataDirLock
        from rl_service.infra.process_executor import LocalProcessExecutor
        from tests.unit.test_lifeline import stubborn_worker

        lock = DataDirLock.acquire(Path(sys.argv[2]))
        executor = LocalProcessExecutor(stubborn_worker, None, sys.argv[1], ("tests.unit.test_lifeline",),
                                        log_level="ERROR", lock_fd=lock.fd)
        job = RunJob(run_id="run-x", experiment_id="e", algorithm="ppo", env_id="CartPole-v1", total_timesteps=10,
                     seed=1, hyperparameters={}, checkpoint_interval=100, model_path="/m/model.zip")
        executor.launch("run-x", job)
        while not isinstance(event := executor.next_event(timeout=60), Started):
            pass
        print(event.pid, flush=True)
        time.sleep(120)
    """, start_method, str(tmp_path))
    assert server.stdout is not None
    line = server.stdout.readline()
    assert line.strip().isdigit(), server.stderr.read() if server.stderr else ""
    worker = int(line)
    family = descendants(server.pid)
    with reaped(family):
        assert worker in family and len(family) >= 2  # the worker, the fork server or the resource tracker
        with pytest.raises(DataDirInUse, match=f"pid {server.pid}"):
            DataDirLock.acquire(tmp_path, wait_seconds=0.2)
        server.kill()
        server.wait()
        survivors, seconds = wait_all_dead(family, timeout=10)
        assert not survivors, f"alive {seconds:.2f}s after the server's SIGKILL: {survivors}"
        DataDirLock.acquire(tmp_path, wait_seconds=0).release()  # nothing of the dead server holds it


def watchdog(stuck: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", "from rl_service.infra.logging_setup import configure_logging; "
         "from rl_service.infra.process_lifeline import exit_later; configure_logging('INFO', 'json'); "
         f"exit_later(1.0, 'shutdown overran its deadline; exiting'); {stuck}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    return result, time.monotonic() - started


def test_the_watchdog_ends_a_process_stuck_past_its_deadline() -> None:
    result, seconds = watchdog("import threading; threading.Event().wait()")
    assert result.returncode == 1
    assert '"shutdown overran its deadline; exiting"' in result.stderr and '"deadline_seconds": 1.0' in result.stderr
    assert seconds < 10


def test_the_watchdog_ends_a_process_whose_stuck_call_holds_the_gil() -> None:
    # Catastrophic backtracking runs in C without releasing the GIL: only faulthandler's watchdog can act.
    result, seconds = watchdog("import re; re.match(r'(a|aa)*c', 'a' * 80)")
    assert result.returncode == 1
    assert "Timeout" in result.stderr and "in match" in result.stderr  # the stack of what hung
    assert seconds < 15


def test_the_watchdog_lets_a_process_that_finishes_in_time_exit_normally() -> None:
    result, seconds = watchdog("print('done')")
    assert result.returncode == 0 and result.stdout == "done\n" and "overran" not in result.stderr
    assert seconds < 10
