"""EXECUTOR=ray: each run is a Ray actor reserving RAY_CPUS_PER_RUN CPUs on whichever node has them.

The orchestrator keeps its queue and limits; this executor only places, watches and ends actors, behind the same
Executor port as the local process pool. Jobs and events cross as JSON text (ray_worker.py). One pump thread per
run long-polls its actor's events onto one local queue; when the actor ends, its last events are queued before
its exit is reported through reap(), as the local executor reports a dead process:

- the train call returned: exit 0 (the worker sent Finished or Failed);
- the actor died (its node was lost, its process crashed or was killed): exit -1, and the orchestrator starts
  the run's next attempt from its newest checkpoint, wherever Ray finds room (MAX_RUN_ATTEMPTS applies).

Actors are never detached: the server's driver owns them, so Ray ends them when the server's process ends, even
by kill -9. Ray's own restarts are off (max_restarts=0): a new attempt is the orchestrator's decision.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any

from rl_service.core.runs.events import WorkerEvent, event_from_dict
from rl_service.core.runs.jobs import RunJob
from rl_service.infra.logging_setup import get_logger
from rl_service.infra.ray_runtime import RayConnection, connect
from rl_service.infra.ray_worker import RunActor, actor_config
from rl_service.infra.shared_storage import shared_roots, write_markers

POLL_SECONDS = 0.5  # how long one events() call waits in the actor for something to report
EXIT_FINISHED = 0
EXIT_LOST = -1  # the actor died without a result: its node, its process, or a kill


class _Run:
    """One run's actor, the call training it, and the thread carrying its events."""

    def __init__(self, actor: Any, training: Any) -> None:
        self.actor = actor
        self.training = training
        self.thread: threading.Thread | None = None


class RayExecutor:
    """Runs as Ray actors on a cluster (RAY_ADDRESS) or a local instance bound to loopback."""

    def __init__(self, settings: Any, connection: RayConnection | None = None) -> None:
        import ray

        self._ray = ray
        self._log = get_logger("ray_executor")
        self._connection = connection or connect(settings.ray_address)
        roots = shared_roots(settings.data_dir, settings.models_root, settings.checkpoint_root)
        self._config = actor_config(settings, roots, write_markers(roots))
        self._actor_class = ray.remote(RunActor).options(
            num_cpus=settings.ray_cpus_per_run, max_restarts=0, max_task_retries=0, max_concurrency=4)
        self._events: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._exited: list[tuple[str, int]] = []
        self._closing = False
        self._log.info("ray executor ready", local_instance=self._connection.started_local,
                       node_ip=self._connection.node_ip, start_seconds=round(self._connection.seconds, 2),
                       cpus_per_run=settings.ray_cpus_per_run)

    @property
    def connection(self) -> RayConnection:
        """The driver's connection (benchmarks read its start-up time)."""
        return self._connection

    def launch(self, run_id: str, job: RunJob) -> None:
        """Create the run's actor and start training; Ray places it once a node has the CPUs."""
        actor = self._actor_class.remote(self._config)
        run = _Run(actor, actor.train.remote(json.dumps(job.to_dict())))  # type: ignore[attr-defined]
        run.thread = threading.Thread(target=self._pump, args=(run_id, run), name=f"ray-events-{run_id}",
                                      daemon=True)
        with self._lock:
            self._runs[run_id] = run
        run.thread.start()

    def request_stop(self, run_id: str) -> None:
        """One remote call: the actor's worker sees the flag at its next progress report."""
        run = self._run(run_id)
        if run is not None:
            run.actor.stop.remote()

    def kill(self, run_id: str) -> None:
        """ray.kill the actor at once (its pump reports the exit)."""
        run = self._run(run_id)
        if run is not None:
            self._ray.kill(run.actor, no_restart=True)

    def next_event(self, timeout: float) -> WorkerEvent | None:
        """The next event of any run, or None after `timeout` seconds; a malformed one is logged and dropped."""
        try:
            text = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            return None
        try:
            return event_from_dict(json.loads(text))
        except ValueError as exc:
            self._log.error("dropped a malformed worker event", error=str(exc)[:200])
            return None

    def reap(self) -> list[tuple[str, int]]:
        """Runs whose actor ended since the last call: 0 when training returned, -1 when the actor died."""
        with self._lock:
            ended, self._exited = self._exited, []
        return ended

    def active(self) -> set[str]:
        """Run ids with a live actor."""
        with self._lock:
            return set(self._runs)

    def close(self) -> None:
        """Kill what is left, then disconnect (a local Ray instance this server started stops with it)."""
        with self._lock:
            self._closing = True
            runs = list(self._runs.values())
        for run in runs:
            self._ray.kill(run.actor, no_restart=True)
        for run in runs:
            if run.thread is not None:
                run.thread.join(timeout=10)
        self._connection.close()

    def _run(self, run_id: str) -> _Run | None:
        with self._lock:
            return self._runs.get(run_id)

    def _pump(self, run_id: str, run: _Run) -> None:
        """Carry the actor's events to the queue until it ends, then record how it ended."""
        ray = self._ray
        exitcode = EXIT_LOST
        try:
            while True:
                batch, finished = ray.get(run.actor.events.remote(POLL_SECONDS))
                for text in batch:
                    self._events.put(text)
                if finished:
                    ray.get(run.training)  # raises if train itself failed in a way run_worker could not report
                    exitcode = EXIT_FINISHED
                    break
        except Exception as exc:  # RayActorError and friends: the node, the process, or a kill
            with self._lock:
                closing = self._closing
            if not closing:
                self._log.warning("run actor ended without a result", run_id=run_id,
                                  error=f"{type(exc).__name__}: {str(exc)[:300]}")
        if exitcode == EXIT_FINISHED:
            ray.kill(run.actor, no_restart=True)  # its CPUs go back now, not when the handle is collected
        with self._lock:
            # A run relaunched (resumed) while this actor was ending has a new entry: this exit is not its.
            if self._runs.get(run_id) is run:
                del self._runs[run_id]
                self._exited.append((run_id, exitcode))
