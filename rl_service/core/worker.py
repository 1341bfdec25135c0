"""The training worker: runs in its own process, trains one run, reports over a queue, checkpoints via the store.

Cancellation and progress are stable-baselines3 callbacks (returning False from `_on_step` ends `learn`), not
threads poking at the model.
"""

from __future__ import annotations

import os
import platform
import signal
import time
import traceback
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger, TensorBoardOutputFormat

from rl_service.core.algorithms import ALGORITHMS
from rl_service.core.dto import Metrics
from rl_service.core.envs import ExternalEnvironments, make_vec_env
from rl_service.core.errors import EnvironmentUnavailable
from rl_service.core.events import CheckpointSaved, Failed, Finished, Progress, Started, WorkerEvent
from rl_service.core.hyperparams import HyperValue
from rl_service.core.ports import ModelStore

METRICS_WINDOW = 100  # episodes in the moving averages, as stable-baselines3's ep_info_buffer


class EventSink(Protocol):
    """Where the worker sends events (a multiprocessing queue in production)."""

    def put(self, item: WorkerEvent) -> None:
        """Deliver one event."""


class StopSignal(Protocol):
    """Set by the server to ask the worker to stop (a multiprocessing Event in production)."""

    def is_set(self) -> bool:
        """True once a stop was requested."""


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker needs, already validated by the orchestrator."""

    run_id: str
    experiment_id: str
    algorithm: str  # registry key
    env_id: str
    total_timesteps: int
    seed: int
    values: Mapping[str, HyperValue]
    effective_hyperparameters: Mapping[str, str]
    checkpoint_interval: int
    model_path: Path
    store: ModelStore
    progress_interval: float = 1.0
    torch_threads: int = 1
    tensorboard_dir: Path | None = None  # also log to <tensorboard_dir>/<run_id> (stable-baselines3's writer)
    external_envs: ExternalEnvironments | None = None  # reaches grpc:// simulations (settings included)
    created_at: float = field(default_factory=time.time)


def run_worker(job: WorkerJob, events: EventSink, stop: StopSignal) -> None:
    """Process entry point: train, save, report. Never raises; failures become a Failed event."""
    # Ctrl+C in a terminal reaches the whole process group; the server decides how its runs stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Logging was configured by the executor that started this process (infra's job, not core's).
    log = structlog.get_logger().bind(logger="worker", run_id=job.run_id, experiment_id=job.experiment_id)
    trainer = _Trainer(job, events, stop, log)
    try:
        trainer.run()
    except BaseException as exc:  # report everything, including KeyboardInterrupt and SystemExit
        log.error("run failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        if isinstance(exc, EnvironmentUnavailable):
            trainer.save_progress()
        trainer.write_history()
        events.put(Failed(job.run_id, trainer.timesteps, f"{type(exc).__name__}: {exc}"))


class _Trainer:
    """One run's training, with the episode bookkeeping the callback fills in."""

    def __init__(self, job: WorkerJob, events: EventSink, stop: StopSignal, log: Any) -> None:
        self.job = job
        self.events = events
        self.stop = stop
        self.log = log
        self.history: list[dict[str, float]] = []
        self.rewards: deque[float] = deque(maxlen=METRICS_WINDOW)
        self.lengths: deque[float] = deque(maxlen=METRICS_WINDOW)
        self.losses: dict[str, float] = {}
        self.timesteps = 0
        self.started = time.monotonic()
        self.last_checkpoint = ""
        self.last_checkpoint_steps = -1
        # A worker whose server died (SIGKILL, OOM) is re-parented; it then saves and stops instead of
        # training on for a run the restarted server has already marked INTERRUPTED.
        self.parent_pid = os.getppid()
        self.orphaned = False
        self.model: Any = None  # set once built, for save_progress

    def run(self) -> None:
        """Build env and model, learn with callbacks, save the final checkpoint and model."""
        torch.set_num_threads(self.job.torch_threads)
        job = self.job
        spec = ALGORITHMS[job.algorithm]
        logger = _capturing_logger(self.losses, job.tensorboard_dir / job.run_id if job.tensorboard_dir else None)
        env = make_vec_env(job.env_id, _int_value(job.values, "n_envs", 1), job.seed, job.external_envs)
        try:
            model = spec.cls("MlpPolicy", env, seed=job.seed, device="cpu", verbose=0,
                             **spec.constructor_kwargs(job.values))
            model.set_logger(logger)
            self.model = model
            self.write_metadata(model, "running")
            self.events.put(Started(job.run_id, _pid()))
            self.log.info("run started", algorithm=spec.name, env_id=job.env_id, seed=job.seed,
                          total_timesteps=job.total_timesteps)
            self.started = time.monotonic()
            model.learn(total_timesteps=job.total_timesteps, callback=_ServiceCallback(self),
                        log_interval=1, progress_bar=False)
            self.timesteps = int(model.num_timesteps)
            stopped_early = self.timesteps < job.total_timesteps
            if self.last_checkpoint_steps != self.timesteps:
                self.checkpoint(model)
            job.store.save_model(model, job.model_path)
            self.write_metadata(model, "stopped early" if stopped_early else "completed")
            self.write_history()
        finally:
            env.close()
            logger.close()
        self.log.info("run finished", timesteps=self.timesteps, stopped_early=stopped_early,
                      model_path=str(job.model_path))
        self.events.put(Finished(job.run_id, self.timesteps, self.metrics(), str(job.model_path),
                                 self.last_checkpoint, stopped_early))

    def save_progress(self) -> None:
        """Checkpoint what was learnt before a simulation failed: the env broke, not the weights (they only change
        in train(), and a failed rollout never reaches it), so the run keeps its last good policy."""
        if self.model is None or self.timesteps <= max(self.last_checkpoint_steps, 0):
            return
        try:
            self.checkpoint(self.model)
        except Exception as exc:  # the failure being reported matters more than this save
            self.log.error("could not save a checkpoint after the failure", error=f"{type(exc).__name__}: {exc}")

    def on_episode(self, reward: float, length: int) -> None:
        """Record one finished episode."""
        self.rewards.append(reward)
        self.lengths.append(length)
        self.history.append({
            "reward": reward,
            "length": length,
            "time": round(time.monotonic() - self.started, 4),
            "timesteps": self.timesteps,
        })

    def metrics(self) -> Metrics:
        """Moving averages over the last METRICS_WINDOW episodes, throughput and latest losses."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return Metrics(
            mean_episode_reward=sum(self.rewards) / len(self.rewards) if self.rewards else 0.0,
            mean_episode_length=sum(self.lengths) / len(self.lengths) if self.lengths else 0.0,
            episodes_completed=len(self.history),
            steps_per_second=self.timesteps / elapsed,
            losses=dict(self.losses),
        )

    def checkpoint(self, model: Any) -> None:
        """Save a checkpoint and tell the server."""
        path = self.job.store.save_checkpoint(self.job.run_id, model, self.timesteps)
        self.last_checkpoint = str(path)
        self.last_checkpoint_steps = self.timesteps
        self.write_history()
        self.events.put(CheckpointSaved(self.job.run_id, self.timesteps, str(path)))
        self.log.info("checkpoint saved", timesteps=self.timesteps, path=str(path))

    def write_metadata(self, model: Any, training: str) -> None:
        """metadata.json: what was trained, how, with which library versions.

        `training` is the worker's view (running, completed, stopped early); why a run stopped (a user's
        StopTraining or a server shutdown) is the run registry's business, reported by GetTrainingStatus.
        """
        job = self.job
        job.store.write_json(job.store.run_dir(job.run_id) / "metadata.json", {
            "run_id": job.run_id,
            "experiment_id": job.experiment_id,
            "algorithm": job.algorithm.upper(),
            "env_id": job.env_id,
            "seed": job.seed,
            "hyperparameters": dict(job.effective_hyperparameters),
            "total_timesteps": job.total_timesteps,
            "timesteps_done": self.timesteps,
            "checkpoint_interval": job.checkpoint_interval,
            "training": training,
            "model_path": str(job.model_path),
            "observation_space": repr(model.observation_space),
            "action_space": repr(model.action_space),
            "created_at": job.created_at,
            "updated_at": time.time(),
            "versions": library_versions(),
        })

    def write_history(self) -> None:
        """history.json: one entry per finished episode (reward, length, seconds since start, timesteps)."""
        self.job.store.write_json(self.job.store.run_dir(self.job.run_id) / "history.json",
                                  {"run_id": self.job.run_id, "episodes": self.history})


def _int_value(values: Mapping[str, HyperValue], key: str, default: int) -> int:
    value = values.get(key)
    return value if isinstance(value, int) else default


def _pid() -> int:
    return os.getpid()


def library_versions() -> dict[str, str]:
    """Versions that decide whether a saved model reloads and behaves the same."""
    import gymnasium
    import numpy
    import stable_baselines3
    import torch

    import rl_service

    return {
        "python": platform.python_version(),
        "rl_service": rl_service.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "gymnasium": gymnasium.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }


def _capturing_logger(latest: dict[str, float], tensorboard: Path | None = None) -> Any:
    """An SB3 logger keeping the latest "train/*" values in `latest`; it also writes TensorBoard files to a folder."""
    class _Capture(KVWriter):
        def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
            for key, value in key_values.items():
                if key.startswith("train/") and isinstance(value, int | float):
                    latest[key[len("train/"):]] = float(value)

        def close(self) -> None:
            pass

    formats: list[KVWriter] = [_Capture()]
    if tensorboard is not None:
        formats.append(TensorBoardOutputFormat(str(tensorboard)))
    return Logger(folder=None, output_formats=formats)


class _ServiceCallback(BaseCallback):
    """Episode bookkeeping, checkpoints every checkpoint_interval timesteps, progress reports, stop requests."""

    def __init__(self, trainer: _Trainer) -> None:
        super().__init__(verbose=0)
        self.trainer = trainer
        self.next_checkpoint = trainer.job.checkpoint_interval
        self.next_report = 0.0

    def _on_step(self) -> bool:
        trainer = self.trainer
        trainer.timesteps = int(self.num_timesteps)
        for info in self.locals.get("infos", ()):
            episode = info.get("episode")
            if episode is not None:
                trainer.on_episode(float(episode["r"]), int(episode["l"]))
        if trainer.timesteps >= self.next_checkpoint:
            trainer.checkpoint(self.model)
            interval = trainer.job.checkpoint_interval
            self.next_checkpoint = (trainer.timesteps // interval + 1) * interval
        now = time.monotonic()
        if now >= self.next_report:
            self.next_report = now + trainer.job.progress_interval
            trainer.events.put(Progress(trainer.job.run_id, trainer.timesteps, trainer.metrics()))
            if os.getppid() != trainer.parent_pid:
                trainer.orphaned = True
                trainer.log.warning("server process is gone; saving and stopping", timesteps=trainer.timesteps)
        return not (trainer.stop.is_set() or trainer.orphaned)
