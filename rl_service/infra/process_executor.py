"""Runs each training job in its own OS process (multiprocessing), so runs use every core, a crash cannot take
the server down, and a stuck run can always be killed.

Jobs go to a worker and events come back as plain versioned dicts (RunJob.to_dict, event_to_dict); the worker
learns it must stop through a should-stop callable built here from its stop flag. A worker whose server is gone
is killed, not asked (process_lifeline.py), and holds the server's data-directory lock while it lives
(data_dir_lock.py).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable, Sequence
from multiprocessing import reduction
from typing import Any

from rl_service.core.runs.events import WorkerEvent, event_from_dict, event_to_dict
from rl_service.core.runs.jobs import RunJob
from rl_service.infra.cpu_placement import CpuPlacement, pin_this_process
from rl_service.infra.logging_setup import configure_logging, get_logger
from rl_service.infra.process_lifeline import FORKSERVER_PRELOAD, SERVER_PID_ENV, arm_worker

# target(job, services, emit, should_stop): rl_service.core.runs.worker.run_worker in production.
WorkerTarget = Callable[[RunJob, Any, Callable[[WorkerEvent], None], Callable[[], bool]], None]


class LocalProcessExecutor:
    """One process per job; events from all workers arrive on one queue."""

    def __init__(self, target: WorkerTarget, services: Any, start_method: str = "forkserver",
                 preload: Sequence[str] = (), log_level: str = "INFO", log_format: str = "json",
                 lock_fd: int | None = None, cpus: Sequence[int] = (), cpus_per_worker: int = 1) -> None:
        self._ctx: Any = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # The fork server imports torch and stable-baselines3 once; each worker then starts in milliseconds.
            # The lifeline module comes first, so the fork server dies with this process even during those imports.
            self._ctx.set_forkserver_preload([FORKSERVER_PRELOAD, *preload])
            os.environ[SERVER_PID_ENV] = str(os.getpid())  # the fork server checks that its parent still lives
            # Start it now, from this (the building) thread, in the background, so the first StartTraining does
            # not wait for the imports. Its death signal fires when this thread ends: build on the main thread.
            from multiprocessing import forkserver

            forkserver.ensure_running()
        self._target = target
        self._services = services  # server configuration (stores, env settings), the same for every worker
        self._preload = tuple(preload)  # imported again by each worker: a no-op under forkserver, needed by spawn
        self._logging = (log_level, log_format)
        self._lock_fd = lock_fd  # every worker holds it open while it lives (the data-directory lock)
        self._placement = CpuPlacement(cpus, cpus_per_worker)  # WORKER_CPUS; empty: workers are not pinned
        self._events: Any = self._ctx.Queue()
        self._lock = threading.Lock()
        self._processes: dict[str, Any] = {}
        self._stops: dict[str, Any] = {}

    def launch(self, run_id: str, job: RunJob) -> None:
        """Start a process training `job`."""
        stop = self._ctx.Event()
        with self._lock:  # ended processes free their CPUs now, even if reap() has not seen them yet
            ended = [key for key, process in self._processes.items() if not process.is_alive()]
        for key in ended:
            self._placement.release(key)
        # A resumed run's earlier process has ended (launch is only called then), so its CPUs are free again.
        cpus = self._placement.take(run_id)
        process = self._ctx.Process(
            target=_bootstrap, name=f"rl-run-{run_id}", daemon=True,
            args=(self._target, self._services, self._preload, self._logging, job.to_dict(), self._events, stop,
                  None if self._lock_fd is None else _PassedFd(self._lock_fd), cpus))
        try:
            process.start()
        except BaseException:
            self._placement.release(run_id)
            raise
        with self._lock:
            previous = self._processes.get(run_id)
            if previous is not None and not previous.is_alive():
                previous.join(timeout=0)  # a resumed run's earlier process, ended but not yet reaped: no zombie
            self._processes[run_id] = process  # from now on only this process's exit is the run's
            self._stops[run_id] = stop

    def request_stop(self, run_id: str) -> None:
        """Ask the worker to checkpoint and stop at its next progress report."""
        with self._lock:
            stop = self._stops.get(run_id)
        if stop is not None:
            stop.set()

    def kill(self, run_id: str) -> None:
        """End the worker process at once."""
        with self._lock:
            process = self._processes.get(run_id)
        if process is not None and process.is_alive():
            process.kill()
            process.join(timeout=5)

    def next_event(self, timeout: float) -> WorkerEvent | None:
        """The next worker event, or None after `timeout` seconds; a malformed one is logged and dropped."""
        try:
            data = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            return None
        try:
            return event_from_dict(data)
        except ValueError as exc:
            get_logger("executor").error("dropped a malformed worker event", error=str(exc))
            return None

    def reap(self) -> list[tuple[str, int]]:
        """Processes that have exited since the last call, with their exit codes."""
        ended = []
        with self._lock:
            for run_id, process in list(self._processes.items()):
                if not process.is_alive():
                    process.join(timeout=0)
                    ended.append((run_id, process.exitcode if process.exitcode is not None else -1))
                    del self._processes[run_id]
                    self._stops.pop(run_id, None)
                    self._placement.release(run_id)
        return ended

    def active(self) -> set[str]:
        """Run ids with a live process."""
        with self._lock:
            return set(self._processes)

    def close(self) -> None:
        """Kill what is left and release the queue."""
        with self._lock:
            processes = list(self._processes.values())
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        self._events.close()
        self._events.join_thread()


class _PassedFd:
    """An fd the worker receives as its own: multiprocessing passes it while pickling the process's arguments."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        # Through the fork server as SCM_RIGHTS, or among spawn's inherited fds: the same open file description.
        return _received_fd, (reduction.DupFd(self.fd),)


def _received_fd(dup: Any) -> int:
    """The worker's end of a _PassedFd."""
    return int(dup.detach())


def _bootstrap(target: WorkerTarget, services: Any, preload: Sequence[str], logging: tuple[str, str],
               job: dict[str, Any], events: Any, stop: Any, lock_fd: int | None,
               cpus: frozenset[int] | None = None) -> None:
    """Child-process entry: die with the server, on its CPUs, logging like the server's, SIGINT left to the
    server, the job."""
    if cpus is not None:
        pin_this_process(cpus)  # one syscall, before any thread starts (the lifeline's, gRPC's), so all inherit it
    arm_worker()
    # lock_fd stays open, never closed, until this process ends: the server's data-directory lock stays held
    # while the worker lives, even once the server is gone.
    # Ctrl+C in a terminal reaches the whole process group; the server decides how its runs stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(*logging)
    for module in preload:
        importlib.import_module(module)

    def emit(event: WorkerEvent) -> None:
        events.put(event_to_dict(event))

    def should_stop() -> bool:
        return bool(stop.is_set())

    target(RunJob.from_dict(job), services, emit, should_stop)
