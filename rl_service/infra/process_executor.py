"""Runs each training job in its own OS process (multiprocessing), so runs use every core, a crash cannot take
the server down, and a stuck run can always be killed."""

from __future__ import annotations

import multiprocessing
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rl_service.infra.logging_setup import configure_logging


class LocalProcessExecutor:
    """One process per job; events from all workers arrive on one queue."""

    def __init__(self, target: Callable[..., None], start_method: str = "forkserver",
                 preload: Sequence[str] = (), log_level: str = "INFO", log_format: str = "json") -> None:
        self._ctx: Any = multiprocessing.get_context(start_method)
        if start_method == "forkserver" and preload:
            # The fork server imports torch and stable-baselines3 once; each worker then starts in milliseconds.
            self._ctx.set_forkserver_preload(list(preload))
            # Start it now, in the background, so the first StartTraining does not wait for the imports.
            from multiprocessing import forkserver

            forkserver.ensure_running()
        self._target = target
        self._logging = (log_level, log_format)
        self._events: Any = self._ctx.Queue()
        self._lock = threading.Lock()
        self._processes: dict[str, Any] = {}
        self._stops: dict[str, Any] = {}

    def launch(self, run_id: str, job: Any) -> None:
        """Start a process running target(job, events, stop_event)."""
        stop = self._ctx.Event()
        process = self._ctx.Process(target=_bootstrap, args=(self._target, self._logging, job, self._events, stop),
                                    name=f"rl-run-{run_id}", daemon=True)
        process.start()
        with self._lock:
            self._processes[run_id] = process
            self._stops[run_id] = stop

    def request_stop(self, run_id: str) -> None:
        """Ask the worker to checkpoint and stop at its next step."""
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

    def next_event(self, timeout: float) -> Any | None:
        """The next worker event, or None after `timeout` seconds."""
        try:
            return self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
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


def _bootstrap(target: Callable[..., None], logging: tuple[str, str], job: Any, events: Any, stop: Any) -> None:
    """Child-process entry: configure logging like the server's, then run the job."""
    configure_logging(*logging)
    target(job, events, stop)
