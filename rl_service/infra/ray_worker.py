"""The Ray actor that trains one run: the worker side of EXECUTOR=ray.

Everything crossing between server and actor is JSON text: the actor's configuration (the share of the settings a
worker needs, and the storage token), the job (RunJob.to_dict) and the events (event_to_dict). Ray never carries
a pickled object of ours, so a server and its workers agree only on those versioned forms.

The actor is threaded (max_concurrency): `train` runs the worker in one thread while `events` (a long poll the
server's pump calls) and `stop` answer in others. The worker's should_stop reads a local flag that `stop` sets,
so a stop request costs one remote call in all, never one per step or per progress report.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import threading
from collections import deque
from typing import Any

from rl_service.core.runs.events import Failed, WorkerEvent, event_to_dict
from rl_service.core.runs.jobs import RunJob
from rl_service.infra.shared_storage import storage_problem

# The settings a worker uses (the model store, environments, logging): rebuilt from these in the actor.
WORKER_SETTINGS = (
    "data_dir", "models_dir", "checkpoint_dir", "keep_checkpoints", "log_level", "log_format", "gym_packages",
    "tensorboard_dir", "max_message_bytes", "external_env_allowed_hosts", "external_env_socket_dir",
    "external_env_ca_file", "env_step_timeout_seconds", "env_connect_timeout_seconds", "env_connect_retries",
    "env_retry_backoff_seconds", "env_transport", "max_network_parameters",
)
CONFIG_VERSION = 1


def actor_config(settings: Any, roots: dict[str, str], token: str) -> str:
    """The actor's configuration as JSON: the worker settings, the shared roots and their token."""
    values = settings.model_dump(mode="json", include=set(WORKER_SETTINGS) & set(type(settings).model_fields))
    return json.dumps({"version": CONFIG_VERSION, "settings": values, "roots": roots, "token": token})


def worker_services(settings: Any) -> Any:
    """The WorkerServices a run needs, built from settings exactly as the composition root builds them."""
    from rl_service.core.runs.worker import WorkerServices
    from rl_service.infra.external_env.connector import GrpcExternalEnvironments
    from rl_service.infra.model_store import FileModelStore

    store = FileModelStore(settings.models_root, settings.checkpoint_root, settings.keep_checkpoints)
    return WorkerServices(store, GrpcExternalEnvironments.from_settings(settings))


class RunActor:
    """One run's training on a Ray node; wrapped with ray.remote (and its resources) by the executor."""

    def __init__(self, config_json: str) -> None:
        config = json.loads(config_json)
        if config.get("version") != CONFIG_VERSION:
            raise ValueError(f"actor configuration version {config.get('version')!r}; this worker reads "
                             f"{CONFIG_VERSION}")
        self._config = config
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._events: deque[str] = deque()
        self._finished = False

    def train(self, job_json: str) -> None:
        """Check the shared storage, then train the job; every outcome arrives as events (never raises)."""
        try:
            job = RunJob.from_dict(json.loads(job_json))
            problem = storage_problem(self._config["roots"], self._config["token"], socket.gethostname())
            if problem is not None:
                self._emit(Failed(job.run_id, 0, problem))
                return
            from rl_service.core.runs.worker import run_worker
            from rl_service.infra.logging_setup import configure_logging
            from rl_service.infra.settings import Settings

            settings = Settings(_env_file=None, **self._config["settings"])  # type: ignore[call-arg]
            configure_logging(settings.log_level, settings.log_format)
            for module in settings.gym_modules:  # their Gymnasium registrations, as in the server
                importlib.import_module(module)
            run_worker(job, worker_services(settings), self._emit, self._stop.is_set)
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def events(self, wait_seconds: float) -> tuple[list[str], bool]:
        """Events since the last call (waiting up to `wait_seconds` for one), and whether training has ended."""
        with self._cond:
            if not self._events and not self._finished:
                self._cond.wait(timeout=wait_seconds)
            batch = list(self._events)
            self._events.clear()
            return batch, self._finished and not self._events

    def stop(self) -> None:
        """Ask the worker to checkpoint and stop at its next progress report."""
        self._stop.set()

    def pid(self) -> int:
        """This actor's process id (tests find its process)."""
        return os.getpid()

    def _emit(self, event: WorkerEvent) -> None:
        with self._cond:
            self._events.append(json.dumps(event_to_dict(event)))
            self._cond.notify_all()
