"""Managed runs' scheduling: accept, queue, launch workers, apply commands and worker events through the state
machine, stop, watch, and shut down. Every state change goes through `state_machine.apply`."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rl_service.core.envs import ExternalEnvironments
from rl_service.core.errors import (
    AlreadyExists,
    CapacityExceeded,
    InvalidRequest,
    RunNotFound,
    RunStateConflict,
    ServiceShuttingDown,
    quoted,
)
from rl_service.core.models.ports import ModelStore
from rl_service.core.models.run_exporters import ExportedModel
from rl_service.core.models.serving import RunServing
from rl_service.core.runs import state_machine
from rl_service.core.runs.history import HistoryPage, read_history
from rl_service.core.runs.jobs import RunJob, job_for
from rl_service.core.runs.ports import Executor, RunRegistry
from rl_service.core.runs.records import ActResult, RunFilter, RunRecord, RunState, TrainingRequest
from rl_service.core.runs.requests import RequestLimits, resume_budget, validate_request
from rl_service.core.runs.state_machine import (
    InvalidTransition,
    Killed,
    Launched,
    LaunchFailed,
    Resumed,
    RunEvent,
    ServerRestarted,
    ShutdownRequested,
    StopRequested,
    WorkerExited,
)
from rl_service.core.watching import ChangeFeed

FINISHED_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class OrchestratorConfig:
    """The limits and knobs the orchestrator needs (built from Settings by the composition root)."""

    max_concurrent_runs: int = 2
    max_queued_runs: int = 16
    max_total_timesteps: int = 100_000_000
    default_checkpoint_interval: int = 10_000
    progress_interval_seconds: float = 1.0
    worker_torch_threads: int = 1
    stop_timeout_seconds: float = 30.0
    max_act_batch: int = 4096
    external_envs: ExternalEnvironments | None = None  # grpc:// and unix: simulations (None: refused)
    tensorboard_dir: Path | None = None  # each run logs to <tensorboard_dir>/<run_id> when set
    auto_resume: bool = True  # at start-up, resume runs a crash or a shutdown left unfinished
    max_run_attempts: int = 3  # worker deaths after which a run ends FAILED instead of resuming
    save_replay_buffer: bool = True  # off-policy algorithms save their replay buffer with each checkpoint
    max_network_parameters: int = 10_000_000  # parameters of one run's policy, checked before it is built


class Orchestrator:
    """Owns every run's state in this process; persists each change through the RunRegistry."""

    def __init__(self, config: OrchestratorConfig, registry: RunRegistry, store: ModelStore,
                 executor: Executor, logger: Any) -> None:
        self._config = config
        self._limits = RequestLimits(config.max_total_timesteps, config.default_checkpoint_interval,
                                     config.max_network_parameters)
        self._registry = registry
        self._store = store
        self._executor = executor
        self._log = logger
        self._cond = threading.Condition()
        self._live: dict[str, RunRecord] = {}  # PENDING and RUNNING runs
        self._finished: OrderedDict[str, RunRecord] = OrderedDict()  # recently read terminal runs
        self._pending: deque[str] = deque()
        self._jobs: dict[str, RunJob] = {}
        self._feed = ChangeFeed()
        self._shutting_down = False
        self._closed = False
        self._serving = RunServing(config.max_act_batch, store)
        self._recover()
        self._pump = threading.Thread(target=self._pump_events, name="worker-events", daemon=True)
        self._pump.start()
        with self._cond:
            self._launch_ready()

    # ----------------------------------------------------------------- commands

    def start_run(self, request: TrainingRequest, owner: str = "") -> RunRecord:
        """Validate a request fully, then record it PENDING (owned by `owner`, the caller's token name; "" without
        authentication) and launch it when a slot is free."""
        valid = validate_request(request, self._limits, self._config.external_envs)
        run_id = f"run-{uuid.uuid4().hex[:12]}"
        model_path = self._store.resolve_model_path(run_id, request.model_output_path)
        record = RunRecord(
            run_id=run_id, experiment_id=valid.experiment_id, algorithm=valid.spec.name, env_id=request.env_id,
            state=RunState.PENDING, total_timesteps=request.total_timesteps, seed=valid.seed,
            hyperparameters=valid.hyperparameters, checkpoint_interval=valid.checkpoint_interval,
            model_path=str(model_path), created_at=time.time(), owner=owner,
        )
        job = self._job(record, resume=False)
        with self._cond:
            if self._shutting_down:
                raise ServiceShuttingDown("the server is shutting down and accepts no new runs")
            if any(r.model_path == record.model_path for r in self._live.values()):
                raise AlreadyExists(f"model_output_path: another active run writes {model_path}",
                                    field="model_output_path")
            self._check_queue_room()
            self._registry.insert(record)
            self._live[run_id] = record
            self._jobs[run_id] = job
            self._pending.append(run_id)
            self._feed.bump(run_id)  # watchable from now on
            self._launch_ready()
            record = self._live.get(run_id) or self._finished[run_id]
        self._log.info("run accepted", run_id=run_id, owner=owner, experiment_id=valid.experiment_id,
                       algorithm=valid.spec.name, env_id=request.env_id, total_timesteps=request.total_timesteps)
        return record

    def stop_run(self, run_id: str) -> RunRecord:
        """Stop gracefully: a pending run is cancelled at once; a running one checkpoints and ends CANCELLED."""
        with self._cond:
            record = self._live.get(run_id)
            if record is None:
                return self.get(run_id)  # finished (or unknown: NOT_FOUND): status unchanged
            self._transition(run_id, StopRequested())
            if record.state is RunState.PENDING:
                return self.get(run_id)
        self._log.info("stop requested", run_id=run_id, experiment_id=record.experiment_id)
        self._executor.request_stop(run_id)
        deadline = time.monotonic() + self._config.stop_timeout_seconds
        with self._cond:
            while run_id in self._live and time.monotonic() < deadline:
                self._cond.wait(timeout=0.5)
        self._kill_if_live([run_id], f"the worker did not stop within {self._config.stop_timeout_seconds:g}s "
                                     "and was killed; the last periodic checkpoint is kept")
        return self.get(run_id)

    def resume_run(self, run_id: str, total_timesteps: int | None = None) -> RunRecord:
        """Queue a finished run again: it continues from its newest loadable checkpoint as its next attempt."""
        record = self.get(run_id)
        if not record.state.is_terminal:
            raise RunStateConflict(f"run_id: run {run_id} is {record.state.name}; only a finished run resumes",
                                   field="run_id")
        total = resume_budget(record, total_timesteps, self._config.max_total_timesteps)
        if self._store.latest_checkpoint(run_id) is None:
            raise RunStateConflict(f"run_id: run {run_id} has no checkpoint to resume from (it ended "
                                   f"{record.state.name} before its first one); start a new run", field="run_id")
        with self._cond:
            if self._shutting_down:
                raise ServiceShuttingDown("the server is shutting down and accepts no runs")
            if run_id in self._live:
                raise RunStateConflict(f"run_id: run {run_id} is already queued again", field="run_id")
            self._check_queue_room()
            resumed = state_machine.apply(record, Resumed(total), time.time())
            self._finished.pop(run_id, None)
            self._enqueue(resumed)
            self._launch_ready()
            resumed = self._live.get(run_id) or self.get(run_id)
        self._log.info("run resumed", run_id=run_id, experiment_id=record.experiment_id, attempt=resumed.attempt,
                       total_timesteps=total)
        return resumed

    def delete_run(self, run_id: str) -> None:
        """Remove a finished run: its checkpoints, models, history and record."""
        record = self.get(run_id)
        with self._cond:
            if run_id in self._live or not record.state.is_terminal:
                raise RunStateConflict(f"run_id: run {run_id} is {self._live.get(run_id, record).state.name}; "
                                       "stop it before deleting it", field="run_id")
            self._registry.delete(run_id)
            self._finished.pop(run_id, None)
        self._serving.forget(run_id)
        self._store.delete_run(run_id, Path(record.model_path))
        self._log.info("run deleted", run_id=run_id, experiment_id=record.experiment_id)

    # ----------------------------------------------------------------- queries

    def get(self, run_id: str) -> RunRecord:
        """A run's current record; RunNotFound if no run has this id."""
        if not run_id:
            raise InvalidRequest("run_id is required", field="run_id")
        with self._cond:
            record = self._live.get(run_id) or self._finished.get(run_id)
        if record is None:
            record = self._registry.get(run_id)
            if record is not None and record.state.is_terminal:
                self._remember_finished(record)
        if record is None:
            raise RunNotFound(f"run_id: no run {quoted(run_id)}", field="run_id")
        return record

    def list_runs(self, run_filter: RunFilter) -> list[RunRecord]:
        """Runs matching the filter, newest first, with live progress for active runs."""
        with self._cond:
            live = dict(self._live)
        return [live.get(r.run_id, r) for r in self._registry.find(run_filter)]

    def watch(self, run_id: str, is_active: Callable[[], bool], poll_seconds: float = 0.5) -> Iterator[RunRecord]:
        """The current record, then each change, ending after the terminal one (or when the client leaves)."""
        since = self._feed.revision(run_id)
        record = self.get(run_id)
        yield record
        if record.state.is_terminal:
            return
        for _ in self._feed.changes(run_id, since, is_active, poll_seconds):
            record = self.get(run_id)
            yield record
            if record.state.is_terminal:
                return

    def act(self, run_id: str, observations: list[float] | np.ndarray, deterministic: bool, single: bool,
            action_mask: np.ndarray | None = None, model: str = "") -> ActResult:
        """Actions from the run's chosen model ("latest" or "best") for one (single=True) or many observations."""
        return self._serving.act(self.get(run_id), observations, deterministic, single, action_mask, model)

    def history(self, run_id: str, offset: int = 0, limit: int = 0) -> HistoryPage:
        """One page of the run's episode history as of its latest checkpoint (empty before the first one)."""
        self.get(run_id)
        return read_history(self._store.run_dir(run_id) / "history.json", run_id, offset, limit)

    def export(self, run_id: str, format_name: str, model: str = "") -> ExportedModel:
        """The policy Act would use for the same model choice, exported in a registered format."""
        return self._serving.export(self.get(run_id), format_name, model)

    # ----------------------------------------------------------------- shutdown

    def shutdown(self, grace_seconds: float) -> None:
        """Refuse new runs, let running ones checkpoint and stop within the grace period, then stop workers."""
        with self._cond:
            self._shutting_down = True
            for run_id in list(self._live):  # pending runs end INTERRUPTED; running ones are asked to stop
                self._transition(run_id, ShutdownRequested())
            running = list(self._live)
        for run_id in running:
            self._executor.request_stop(run_id)
        deadline = time.monotonic() + grace_seconds
        with self._cond:
            while self._live and time.monotonic() < deadline:
                self._cond.wait(timeout=0.2)
            leftover = list(self._live)
        self._kill_if_live(leftover, f"interrupted: killed at shutdown after {grace_seconds:g}s grace; "
                                     "last checkpoint kept")
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._feed.close()
        self._pump.join(timeout=5)
        self._executor.close()
        self._registry.close()

    # ----------------------------------------------------------------- internals

    def _recover(self) -> None:
        """At start-up: runs a crash left in flight, and (AUTO_RESUME) runs a shutdown interrupted, queue again in
        their original order; the rest end as the state machine says."""
        found = [*self._registry.find(RunFilter(state=RunState.PENDING)),
                 *self._registry.find(RunFilter(state=RunState.RUNNING))]
        if self._config.auto_resume:
            found += self._registry.find(RunFilter(state=RunState.INTERRUPTED))
        now = time.time()
        for record in sorted(found, key=lambda r: (r.created_at, r.run_id)):
            latest = self._store.latest_checkpoint(record.run_id)  # a worker may have saved after its last event
            if latest is not None:
                record = record.evolve(last_checkpoint_path=str(latest))
            event = Resumed() if record.state is RunState.INTERRUPTED else ServerRestarted(self._config.auto_resume)
            recovered = state_machine.apply(record, event, now)
            self._log.warning("run found unfinished at start-up", run_id=record.run_id,
                              experiment_id=record.experiment_id, was=record.state.name, now=recovered.state.name)
            if recovered.state is RunState.PENDING:
                self._enqueue(recovered)
            else:
                self._registry.update(recovered)
                self._store.record_attempts(recovered.run_id, recovered.attempt_dicts())

    def _check_queue_room(self) -> None:
        """CapacityExceeded when every slot is busy and the queue is full (caller holds the lock)."""
        running = len(self._live) - len(self._pending)
        if running >= self._config.max_concurrent_runs and len(self._pending) >= self._config.max_queued_runs:
            raise CapacityExceeded(
                f"run queue is full: {running} runs training and {len(self._pending)} waiting "
                f"(MAX_CONCURRENT_RUNS={self._config.max_concurrent_runs}, "
                f"MAX_QUEUED_RUNS={self._config.max_queued_runs}); retry when a run finishes")

    def _job(self, record: RunRecord, resume: bool) -> RunJob:
        """The worker's job for a run's next attempt."""
        config = self._config
        return job_for(record, resume, config.progress_interval_seconds, config.worker_torch_threads,
                       config.tensorboard_dir, config.save_replay_buffer)

    def _enqueue(self, record: RunRecord, first: bool = False) -> None:
        """Queue a PENDING run to resume (caller holds the lock, or is __init__)."""
        self._registry.update(record)
        self._live[record.run_id] = record
        self._jobs[record.run_id] = self._job(record, resume=True)
        if first:
            self._pending.appendleft(record.run_id)
        else:
            self._pending.append(record.run_id)
        self._feed.bump(record.run_id)

    def _kill_if_live(self, run_ids: list[str], reason: str) -> None:
        """End runs whose workers did not stop in time: recorded first, so a late exit is not read as a crash."""
        killed = []
        with self._cond:
            for run_id in run_ids:
                if run_id in self._live:
                    self._transition(run_id, Killed(reason))
                    killed.append(run_id)
        for run_id in killed:
            self._executor.kill(run_id)

    def _transition(self, run_id: str, event: RunEvent) -> RunRecord:
        """Apply an event to a live run through the state machine and keep the result (caller holds the lock)."""
        before = self._live[run_id]
        record = state_machine.apply(before, event, time.time())
        if record.state.is_terminal:
            return self._finish(record)
        if record.state is RunState.PENDING and before.state is RunState.RUNNING:  # its worker died: next attempt
            self._log.warning("worker died; the run resumes", run_id=run_id, experiment_id=record.experiment_id,
                              attempt=record.attempt, deaths=record.deaths)
            self._store.record_attempts(run_id, record.attempt_dicts())
            self._enqueue(record, first=True)
            self._cond.notify_all()
            self._launch_ready()
            return record
        return self._set(record)

    def _launch_ready(self) -> None:
        """Start pending runs while slots are free (caller holds the lock)."""
        while self._pending and not self._shutting_down:
            running = len(self._live) - len(self._pending)
            if running >= self._config.max_concurrent_runs:
                return
            run_id = self._pending.popleft()
            job = self._jobs.pop(run_id)
            try:
                self._executor.launch(run_id, job)
            except Exception as exc:
                self._transition(run_id, LaunchFailed(str(exc)))
                continue
            # RUNNING from launch on: the slot is taken even before the worker reports in.
            self._transition(run_id, Launched())

    def _set(self, record: RunRecord) -> RunRecord:
        """Store a changed live record, persist it, wake watchers (caller holds the lock)."""
        self._live[record.run_id] = record
        self._registry.update(record)
        self._feed.bump(record.run_id)
        self._cond.notify_all()
        return record

    def _finish(self, record: RunRecord) -> RunRecord:
        """Persist a terminal record, free its slot, launch what waits (caller holds the lock)."""
        if record.run_id in self._pending:  # cancelled or interrupted before it started
            self._pending.remove(record.run_id)
            self._jobs.pop(record.run_id, None)
        self._remember_finished(record)
        self._set(record)
        del self._live[record.run_id]
        self._store.record_attempts(record.run_id, record.attempt_dicts())
        self._feed.forget(record.run_id)  # a terminal record never changes again
        self._log.info("run ended", run_id=record.run_id, experiment_id=record.experiment_id,
                       state=record.state.name, timesteps=record.timesteps_done, error=record.error or None)
        self._launch_ready()
        return record

    def _remember_finished(self, record: RunRecord) -> None:
        """Keep a terminal record in memory: it never changes again, and Act reads it on every call."""
        with self._cond:
            self._finished[record.run_id] = record
            while len(self._finished) > FINISHED_CACHE_SIZE:
                self._finished.popitem(last=False)

    def _pump_events(self) -> None:
        """Apply worker events and notice workers that died without reporting."""
        while True:
            with self._cond:
                if self._closed:
                    return
            event = self._executor.next_event(timeout=0.2)
            if event is not None:
                self._apply_from_worker(event.run_id, event)
                continue
            # Reaped and applied under the lock that launches hold: an exit reaped here is the process of the run's
            # current launch, never one a resume replaced in between (that exit would read as the new one's death).
            with self._cond:
                for run_id, exitcode in self._executor.reap():
                    while (late := self._executor.next_event(timeout=0)) is not None:
                        self._apply_from_worker(late.run_id, late)
                    self._apply_from_worker(run_id, WorkerExited(exitcode, self._config.max_run_attempts))

    def _apply_from_worker(self, run_id: str, event: RunEvent) -> None:
        """A worker's event for a live run; one for a run already ended (killed, say) is dropped."""
        with self._cond:
            if run_id not in self._live:
                return
            if isinstance(event, WorkerExited) and self._live[run_id].state is RunState.PENDING:
                return  # a resumed run waiting for a slot: the exit is its previous attempt's process ending
            try:
                self._transition(run_id, event)
            except InvalidTransition as exc:
                self._log.error("worker event out of order; dropped", run_id=run_id, error=str(exc))
