"""Run lifecycle: validate, queue, launch workers, apply their events, stop, watch, and act."""

from __future__ import annotations

import functools
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rl_service.core.algorithms import get_algorithm
from rl_service.core.dto import ActResult, RunFilter, RunRecord, RunState, TrainingRequest
from rl_service.core.envs import (
    ExternalEnvironments,
    actions_to_flat,
    env_spaces,
    is_external_env,
    observations_from_flat,
)
from rl_service.core.errors import (
    AlreadyExists,
    CapacityExceeded,
    InvalidHyperparameter,
    InvalidRequest,
    ModelNotReady,
    RunNotFound,
    ServiceShuttingDown,
)
from rl_service.core.events import CheckpointSaved, Failed, Finished, Progress, Started
from rl_service.core.exporters import ExportedModel, ExportSource, export_model, get_export_format, timesteps_of
from rl_service.core.hyperparams import HyperValue, format_value
from rl_service.core.policy_cache import PolicyCache
from rl_service.core.ports import Executor, ModelStore, RunRegistry
from rl_service.core.run_history import HistoryPage, read_history
from rl_service.core.worker import WorkerJob

MIN_CHECKPOINT_INTERVAL = 100
FINISHED_CACHE_SIZE = 10_000
MAX_EXPERIMENT_ID = 128
MAX_SEED = 2**32 - 1


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
    external_envs: ExternalEnvironments | None = None  # grpc:// simulations (None: refused)
    tensorboard_dir: Path | None = None  # each run logs to <tensorboard_dir>/<run_id> when set


class Orchestrator:
    """Owns every run's state in this process; persists each change through the RunRegistry."""

    def __init__(self, config: OrchestratorConfig, registry: RunRegistry, store: ModelStore,
                 executor: Executor, logger: Any) -> None:
        self._config = config
        self._registry = registry
        self._store = store
        self._executor = executor
        self._log = logger
        self._cond = threading.Condition()
        self._live: dict[str, RunRecord] = {}  # PENDING and RUNNING runs
        self._finished: OrderedDict[str, RunRecord] = OrderedDict()  # recently read terminal runs
        self._versions: dict[str, int] = {}
        self._pending: deque[str] = deque()
        self._jobs: dict[str, WorkerJob] = {}
        self._kill_reasons: dict[str, tuple[RunState, str]] = {}
        self._shutting_down = False
        self._closed = False
        self._policies = PolicyCache()
        for record in registry.mark_interrupted("interrupted: the server stopped while the run was in progress"):
            latest = store.latest_checkpoint(record.run_id)  # a worker may have saved after the last event
            if latest is not None and str(latest) != record.last_checkpoint_path:
                registry.update(record.evolve(last_checkpoint_path=str(latest)))
            self._log.warning("run interrupted by a previous shutdown", run_id=record.run_id,
                              experiment_id=record.experiment_id)
        self._pump = threading.Thread(target=self._pump_events, name="worker-events", daemon=True)
        self._pump.start()

    # ----------------------------------------------------------------- commands

    def start_run(self, request: TrainingRequest) -> RunRecord:
        """Validate a request fully, then record it PENDING and launch it when a slot is free."""
        experiment_id = _check_experiment_id(request.experiment_id)
        spec = get_algorithm(request.algorithm)
        if request.total_timesteps <= 0:
            raise InvalidRequest(f"total_timesteps: must be positive, got {request.total_timesteps}",
                                 field="total_timesteps")
        if request.total_timesteps > self._config.max_total_timesteps:
            raise InvalidRequest(
                f"total_timesteps: {request.total_timesteps} exceeds this server's cap of "
                f"{self._config.max_total_timesteps} (MAX_TOTAL_TIMESTEPS)", field="total_timesteps")
        interval = request.checkpoint_interval or self._config.default_checkpoint_interval
        if interval < MIN_CHECKPOINT_INTERVAL:
            raise InvalidRequest(
                f"checkpoint_interval: must be 0 (server default) or at least {MIN_CHECKPOINT_INTERVAL}, "
                f"got {request.checkpoint_interval}", field="checkpoint_interval")
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
            raise InvalidRequest(f"seed: must be in [0, {MAX_SEED}], got {request.seed}", field="seed")
        values = spec.schema.parse(request.hyperparameters)
        external = is_external_env(request.env_id)
        if not external:  # a simulation's n_envs is known only from its spec
            spec.validate(values)
        spaces = env_spaces(request.env_id, self._config.external_envs)
        if external and spaces.num_envs is not None:
            values = _simulation_n_envs(request, values, spaces.num_envs)
            spec.validate(values)
        spec.check_spaces(spaces.action_space, values)

        run_id = f"run-{uuid.uuid4().hex[:12]}"
        model_path = self._store.resolve_model_path(run_id, request.model_output_path)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED)
        effective = {key: format_value(value) for key, value in sorted(values.items())}
        record = RunRecord(
            run_id=run_id, experiment_id=experiment_id, algorithm=spec.name, env_id=request.env_id,
            state=RunState.PENDING, total_timesteps=request.total_timesteps, seed=seed,
            hyperparameters=effective, checkpoint_interval=interval, model_path=str(model_path),
            created_at=time.time(),
        )
        job = WorkerJob(
            run_id=run_id, experiment_id=experiment_id, algorithm=spec.name.lower(), env_id=request.env_id,
            total_timesteps=request.total_timesteps, seed=seed, values=values,
            effective_hyperparameters=effective, checkpoint_interval=interval, model_path=model_path,
            store=self._store, progress_interval=self._config.progress_interval_seconds,
            external_envs=self._config.external_envs,
            tensorboard_dir=self._config.tensorboard_dir,
            torch_threads=self._config.worker_torch_threads, created_at=record.created_at,
        )
        with self._cond:
            if self._shutting_down:
                raise ServiceShuttingDown("the server is shutting down and accepts no new runs")
            if any(r.model_path == record.model_path for r in self._live.values()):
                raise AlreadyExists(f"model_output_path: another active run writes {model_path}",
                                    field="model_output_path")
            running = len(self._live) - len(self._pending)
            if running >= self._config.max_concurrent_runs and len(self._pending) >= self._config.max_queued_runs:
                raise CapacityExceeded(
                    f"run queue is full: {running} runs training and {len(self._pending)} waiting "
                    f"(MAX_CONCURRENT_RUNS={self._config.max_concurrent_runs}, "
                    f"MAX_QUEUED_RUNS={self._config.max_queued_runs}); retry when a run finishes")
            self._registry.insert(record)
            self._live[run_id] = record
            self._versions[run_id] = 0
            self._jobs[run_id] = job
            self._pending.append(run_id)
            self._launch_ready()
            record = self._live[run_id]
        self._log.info("run accepted", run_id=run_id, experiment_id=experiment_id, algorithm=spec.name,
                       env_id=request.env_id, total_timesteps=request.total_timesteps)
        return record

    def stop_run(self, run_id: str) -> RunRecord:
        """Stop gracefully: a pending run is cancelled at once; a running one checkpoints and ends CANCELLED."""
        with self._cond:
            record = self._live.get(run_id)
            if record is None:
                return self.get(run_id)  # finished (or unknown: NOT_FOUND): status unchanged
            if record.state is RunState.PENDING:
                self._pending.remove(run_id)
                self._jobs.pop(run_id, None)
                return self._finish(record.evolve(state=RunState.CANCELLED, stop_requested=True,
                                                  finished_at=time.time()))
            self._set(record.evolve(stop_requested=True))
        self._log.info("stop requested", run_id=run_id, experiment_id=record.experiment_id)
        self._executor.request_stop(run_id)
        deadline = time.monotonic() + self._config.stop_timeout_seconds
        with self._cond:
            while run_id in self._live and time.monotonic() < deadline:
                self._cond.wait(timeout=0.5)
            must_kill = run_id in self._live
            if must_kill:
                self._kill_reasons[run_id] = (
                    RunState.CANCELLED,
                    f"the worker did not stop within {self._config.stop_timeout_seconds:g}s and was killed; "
                    "the last periodic checkpoint is kept")
        if must_kill:
            self._executor.kill(run_id)
            with self._cond:
                self._cond.wait_for(lambda: run_id not in self._live, timeout=10)
        return self.get(run_id)

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
            raise RunNotFound(f"run_id: no run {run_id!r}", field="run_id")
        return record

    def _remember_finished(self, record: RunRecord) -> None:
        """Keep a terminal record in memory: it never changes again, and Act reads it on every call."""
        with self._cond:
            self._finished[record.run_id] = record
            while len(self._finished) > FINISHED_CACHE_SIZE:
                self._finished.popitem(last=False)

    def list_runs(self, run_filter: RunFilter) -> list[RunRecord]:
        """Runs matching the filter, newest first, with live progress for active runs."""
        with self._cond:
            live = dict(self._live)
        return [live.get(r.run_id, r) for r in self._registry.find(run_filter)]

    def watch(self, run_id: str, is_active: Callable[[], bool], poll_seconds: float = 0.5) -> Iterator[RunRecord]:
        """The current record, then each change, ending after the terminal one (or when the client leaves)."""
        record = self.get(run_id)
        yield record
        with self._cond:
            version = self._versions.get(run_id, 0)
        while not record.state.is_terminal:
            with self._cond:
                self._cond.wait_for(functools.partial(self._changed_since, run_id, version), timeout=poll_seconds)
                changed = self._versions.get(run_id, 0) != version
                version = self._versions.get(run_id, 0)
                closed = self._closed
            if not is_active():
                return
            if changed:
                record = self.get(run_id)
                yield record
            elif closed:
                return

    def _changed_since(self, run_id: str, version: int) -> bool:
        return self._versions.get(run_id, 0) != version or self._closed

    def act(self, run_id: str, observations: list[float] | np.ndarray, deterministic: bool,
            single: bool) -> ActResult:
        """Actions from the run's newest model or checkpoint for one (single=True) or many observations."""
        record = self.get(run_id)
        path = _serving_path(record, check_file=False)  # the cache touches the file only when it loads it
        try:
            policy = self._policies.get(run_id, record.algorithm, path, record.timesteps_done)
        except FileNotFoundError:
            raise _not_ready(record) from None
        field = "observation" if single else "observations"
        batch = observations_from_flat(observations, policy.model.observation_space, field)
        if single and len(batch) != 1:
            raise InvalidRequest(
                f"observation: got {len(batch)} observations' worth of values; Act takes one (use ActBatch)",
                field="observation")
        if len(batch) > self._config.max_act_batch:
            raise CapacityExceeded(f"observations: {len(batch)} exceeds MAX_ACT_BATCH={self._config.max_act_batch}",
                                   field="observations")
        actions, _ = policy.model.predict(batch, deterministic=deterministic)
        flat, size = actions_to_flat(actions, policy.model.action_space, len(batch))
        return ActResult(flat, size, len(batch), policy.timesteps)

    def history(self, run_id: str, offset: int = 0, limit: int = 0) -> HistoryPage:
        """One page of the run's episode history as of its latest checkpoint (empty before the first one)."""
        self.get(run_id)
        return read_history(self._store.run_dir(run_id) / "history.json", run_id, offset, limit)

    def export(self, run_id: str, format_name: str) -> ExportedModel:
        """The policy Act would use (final model, else newest checkpoint) exported in a registered format."""
        fmt = get_export_format(format_name)
        record = self.get(run_id)
        path = _serving_path(record)
        source = ExportSource(run_id=run_id, algorithm=record.algorithm,
                              algorithm_cls=get_algorithm(record.algorithm).cls, env_id=record.env_id,
                              path=Path(path), timesteps=timesteps_of(Path(path), record.timesteps_done))
        return export_model(fmt, source)

    # ----------------------------------------------------------------- shutdown

    def shutdown(self, grace_seconds: float) -> None:
        """Refuse new runs, let running ones checkpoint and stop within the grace period, then stop workers."""
        with self._cond:
            self._shutting_down = True
            for run_id in list(self._pending):
                self._pending.remove(run_id)
                self._finish(self._live[run_id].evolve(
                    state=RunState.INTERRUPTED, error="interrupted: the server shut down before the run started",
                    finished_at=time.time()))
            running = list(self._live)
        for run_id in running:
            self._executor.request_stop(run_id)
        deadline = time.monotonic() + grace_seconds
        with self._cond:
            while self._live and time.monotonic() < deadline:
                self._cond.wait(timeout=0.2)
            for run_id in self._live:
                self._kill_reasons[run_id] = (
                    RunState.INTERRUPTED,
                    f"interrupted: killed at shutdown after {grace_seconds:g}s grace; last checkpoint kept")
            leftover = list(self._live)
        for run_id in leftover:
            self._executor.kill(run_id)
        with self._cond:
            self._cond.wait_for(lambda: not self._live, timeout=10)
            self._closed = True
            self._cond.notify_all()
        self._pump.join(timeout=5)
        self._executor.close()
        self._registry.close()

    # ----------------------------------------------------------------- internals

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
                self._finish(self._live[run_id].evolve(state=RunState.FAILED, finished_at=time.time(),
                                                       error=f"could not start a worker: {exc}"))
                continue
            # RUNNING from launch on: the slot is taken even before the worker reports in.
            self._set(self._live[run_id].evolve(state=RunState.RUNNING, started_at=time.time()))

    def _set(self, record: RunRecord) -> RunRecord:
        """Store a changed live record, persist it, wake watchers (caller holds the lock)."""
        self._live[record.run_id] = record
        self._versions[record.run_id] = self._versions.get(record.run_id, 0) + 1
        self._registry.update(record)
        self._cond.notify_all()
        return record

    def _finish(self, record: RunRecord) -> RunRecord:
        """Persist a terminal record, free its slot, launch what waits (caller holds the lock)."""
        self._set(record)
        del self._live[record.run_id]
        self._remember_finished(record)
        self._log.info("run ended", run_id=record.run_id, experiment_id=record.experiment_id,
                       state=record.state.name, timesteps=record.timesteps_done, error=record.error or None)
        self._launch_ready()
        return record

    def _pump_events(self) -> None:
        """Apply worker events and notice workers that died without reporting."""
        while True:
            with self._cond:
                if self._closed:
                    return
            event = self._executor.next_event(timeout=0.2)
            if event is not None:
                self._apply(event)
                continue
            for run_id, exitcode in self._executor.reap():
                while (late := self._executor.next_event(timeout=0)) is not None:
                    self._apply(late)
                self._on_exit(run_id, exitcode)

    def _apply(self, event: Any) -> None:
        with self._cond:
            record = self._live.get(event.run_id)
            if record is None:
                return
            if isinstance(event, Started):
                self._set(record)
            elif isinstance(event, Progress):
                self._set(record.evolve(timesteps_done=event.timesteps, metrics=event.metrics))
            elif isinstance(event, CheckpointSaved):
                self._set(record.evolve(timesteps_done=event.timesteps, last_checkpoint_path=event.path))
            elif isinstance(event, Finished):
                if not event.stopped_early:
                    state = RunState.SUCCEEDED
                elif self._shutting_down and not record.stop_requested:
                    state = RunState.INTERRUPTED
                else:
                    state = RunState.CANCELLED
                error = "interrupted: the server shut down; the final checkpoint and model are kept" \
                    if state is RunState.INTERRUPTED else ""
                self._finish(record.evolve(
                    state=state, timesteps_done=event.timesteps, metrics=event.metrics, model_saved=True,
                    model_path=event.model_path, last_checkpoint_path=event.checkpoint_path or
                    record.last_checkpoint_path, finished_at=time.time(), error=error))
            elif isinstance(event, Failed):
                self._finish(record.evolve(state=RunState.FAILED, error=event.error, finished_at=time.time(),
                                           timesteps_done=max(event.timesteps, record.timesteps_done)))

    def _on_exit(self, run_id: str, exitcode: int) -> None:
        with self._cond:
            record = self._live.get(run_id)
            if record is None:
                return
            state, error = self._kill_reasons.pop(run_id, (
                RunState.FAILED, f"the worker process exited with code {exitcode} without reporting a result"))
            self._finish(record.evolve(state=state, error=error, finished_at=time.time()))


def _simulation_n_envs(request: TrainingRequest, values: dict[str, HyperValue], hosted: int
                       ) -> dict[str, HyperValue]:
    """An external simulation decides how many envs step together; a client's different n_envs is refused."""
    if any(key.strip().lower() == "n_envs" for key in request.hyperparameters) and values.get("n_envs") != hosted:
        raise InvalidHyperparameter(
            f"hyperparameters['n_envs']: the simulation at {request.env_id} hosts {hosted} envs; omit n_envs or "
            f"set it to {hosted}", field="hyperparameters.n_envs")
    return {**values, "n_envs": hosted}


def _serving_path(record: RunRecord, check_file: bool = True) -> str:
    """The file Act and exports use: the final model, else the newest checkpoint; ModelNotReady if neither."""
    path = record.model_path if record.model_saved else record.last_checkpoint_path
    if not path or (check_file and not Path(path).exists()):
        raise _not_ready(record)
    return path


def _not_ready(record: RunRecord) -> ModelNotReady:
    return ModelNotReady(f"run_id: run {record.run_id} has no checkpoint or model yet (state {record.state.name}); "
                         "wait for its first checkpoint", field="run_id")


def _check_experiment_id(experiment_id: str) -> str:
    value = experiment_id.strip() or "default"
    if len(value) > MAX_EXPERIMENT_ID or not value.isprintable():
        raise InvalidRequest(
            f"experiment_id: at most {MAX_EXPERIMENT_ID} printable characters", field="experiment_id")
    return value
