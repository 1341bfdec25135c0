"""The training worker: trains one run, reports through `emit`, checkpoints through the model store.

It runs wherever the executor puts it (a local process now). The executor supplies the two ways out: `emit` for
events and `should_stop` for a stop request (polled at each progress report, so a remote executor needs no call
per environment step); signals and orphan detection are the executor's business. Cancellation and progress are
stable-baselines3 callbacks (returning False from `_on_step` ends `learn`), not threads poking at the model;
evaluations (eval_freq) run from the same callback (the runs/evaluation.py loop and the Evaluator below).
"""

from __future__ import annotations

import os
import platform
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger, TensorBoardOutputFormat

from rl_service.core.algorithms.env_groups import use_env_groups
from rl_service.core.algorithms.hyperparams import HyperValue
from rl_service.core.algorithms.masking import require_masks
from rl_service.core.algorithms.normalize import OFF, NormalizeOptions
from rl_service.core.algorithms.registry import ALGORITHMS
from rl_service.core.envs import ExternalEnvironments, is_external_env, make_vec_env
from rl_service.core.errors import EnvironmentLacksFeature, EnvironmentUnavailable, quoted
from rl_service.core.models.checkpoints import BEST_MODEL_NAME, checkpoint_timesteps
from rl_service.core.models.normalization import NormalizeStats
from rl_service.core.models.ports import ModelStore
from rl_service.core.runs import normalizing
from rl_service.core.runs.evaluation import evaluate, evaluation_seed
from rl_service.core.runs.events import CheckpointSaved, Evaluated, Failed, Finished, Progress, Started, WorkerEvent
from rl_service.core.runs.jobs import RunJob
from rl_service.core.runs.records import Evaluation, Metrics
from rl_service.core.runs.resume import Restored, attempt_seed, has_replay_buffer, restore

METRICS_WINDOW = 100  # episodes in the moving averages, as stable-baselines3's ep_info_buffer

Emit = Callable[[WorkerEvent], None]
ShouldStop = Callable[[], bool]


@dataclass(frozen=True)
class WorkerServices:
    """Server-wide things every worker uses, built once by the composition root (never from a client)."""

    store: ModelStore
    external_envs: ExternalEnvironments | None = None  # reaches grpc:// and unix: simulations (None: refused)


def run_worker(job: RunJob, services: WorkerServices, emit: Emit, should_stop: ShouldStop) -> None:
    """Train, save, report. Never raises; failures become a Failed event."""
    # Every log line of this process, the environment adapters' included, names the run.
    structlog.contextvars.bind_contextvars(run_id=job.run_id, experiment_id=job.experiment_id)
    log = structlog.get_logger().bind(logger="worker")
    trainer = _Trainer(job, services, emit, should_stop, log)
    try:
        trainer.run()
    except BaseException as exc:  # report everything, including KeyboardInterrupt and SystemExit
        log.error("run failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        if isinstance(exc, EnvironmentUnavailable):
            trainer.save_progress()
        trainer.write_history()
        emit(Failed(job.run_id, trainer.timesteps, f"{type(exc).__name__}: {exc}"))


class _Trainer:
    """One run's training, with the episode bookkeeping the callback fills in."""

    def __init__(self, job: RunJob, services: WorkerServices, emit: Emit, should_stop: ShouldStop, log: Any) -> None:
        self.job = job
        self.store = services.store
        self.external_envs = services.external_envs
        self.emit = emit
        self.should_stop = should_stop
        self.stopping = False
        self.log = log
        self.history: list[dict[str, float]] = []
        self.rewards: deque[float] = deque(maxlen=METRICS_WINDOW)
        self.lengths: deque[float] = deque(maxlen=METRICS_WINDOW)
        self.losses: dict[str, float] = {}
        self.timesteps = 0
        self.started = time.monotonic()
        self.last_checkpoint = ""
        self.last_checkpoint_steps = -1
        self.start_timesteps = 0  # where this attempt began (a resumed run's checkpoint)
        self.time_offset = 0.0  # seconds of training before this attempt, so history times keep rising
        self.model: Any = None  # set once built, for save_progress
        self.evaluator: Evaluator | None = None  # set when eval_freq asks for evaluations
        self.reached_reward = False  # an evaluation reached stop_at_reward: the run ends SUCCEEDED

    def run(self) -> None:
        """Build env and model (or resume them), learn with callbacks, save the final checkpoint and model."""
        torch.set_num_threads(self.job.torch_threads)
        job = self.job
        spec = ALGORITHMS[job.algorithm]
        values = spec.schema.parse(job.hyperparameters)
        tensorboard = Path(job.tensorboard_dir) / job.run_id if job.tensorboard_dir else None
        logger = _capturing_logger(self.losses, tensorboard)
        restored = None
        # The env is built before the checkpoint loads (loading needs it): seed it by where the run resumes.
        newest = self.store.latest_checkpoint(job.run_id) if job.resume else None
        seed = attempt_seed(job.seed, (checkpoint_timesteps(newest) or 0) if newest is not None else 0)
        n_envs = _int_value(values, "n_envs", 1)
        options = values.get("normalize")
        options = options if isinstance(options, NormalizeOptions) else OFF
        gamma = values.get("gamma")
        env = make_vec_env(job.env_id, n_envs, seed, self.external_envs)
        try:
            env = normalizing.wrap(env, options, float(gamma) if isinstance(gamma, float | int) else None)
            if spec.needs_action_masks:  # an external simulation's masks are known only once it is reached
                require_masks(env, spec.name, job.env_id)
            if job.resume:
                restored = restore(spec.cls, self.store, job.run_id, env, self.log)
            if restored is not None:
                model = restored.model
                model.set_random_seed(seed)
                self.resume_from(restored)
            else:
                model = spec.cls("MlpPolicy", env, seed=seed, device="cpu", verbose=0,
                                 **spec.constructor_kwargs(values, env.action_space))
            model.set_logger(logger)
            _use_env_groups(model, _int_value(values, "env_groups", 1), job.env_id)
            self.model = model
            eval_freq = _int_value(values, "eval_freq", 0)
            if eval_freq > 0:
                self.evaluator = Evaluator(self, eval_freq, _int_value(values, "n_eval_episodes", 5),
                                           _float_value(values, "stop_at_reward"), spec.needs_action_masks, n_envs)
            self.write_metadata(model, "running")
            self.emit(Started(job.run_id, os.getpid(), self.start_timesteps))
            self.log.info("run started", algorithm=spec.name, env_id=job.env_id, seed=seed, attempt=job.attempt,
                          start_timesteps=self.start_timesteps, total_timesteps=job.total_timesteps)
            self.started = time.monotonic()
            remaining = job.total_timesteps - self.start_timesteps
            if remaining > 0:
                # stable-baselines3 adds num_timesteps to the total when it does not reset them: pass what is left.
                model.learn(total_timesteps=remaining, callback=_ServiceCallback(self), log_interval=1,
                            progress_bar=False, reset_num_timesteps=restored is None)
            self.timesteps = int(model.num_timesteps)
            # Reaching stop_at_reward ends the run as a success, short of its budget.
            stopped_early = self.timesteps < job.total_timesteps and not self.reached_reward
            if self.last_checkpoint_steps != self.timesteps:
                self.checkpoint(model)
            self.store.save_model(model, Path(job.model_path), self.normalize_stats())
            training = "reached stop_at_reward" if self.reached_reward else (
                "stopped early" if stopped_early else "completed")
            self.write_metadata(model, training)
            self.write_history()
        finally:
            if self.evaluator is not None:
                self.evaluator.close()
            env.close()
            logger.close()
        self.log.info("run finished", timesteps=self.timesteps, stopped_early=stopped_early,
                      reached_reward=self.reached_reward, model_path=job.model_path)
        self.emit(Finished(job.run_id, self.timesteps, self.metrics(), job.model_path, self.last_checkpoint,
                           stopped_early))

    def resume_from(self, restored: Restored) -> None:
        """Continue the counters, the history and the moving averages from a loaded checkpoint."""
        self.timesteps = self.start_timesteps = int(restored.model.num_timesteps)
        self.last_checkpoint, self.last_checkpoint_steps = str(restored.checkpoint), self.timesteps
        self.history = list(restored.episodes)
        self.time_offset = float(self.history[-1]["time"]) if self.history else 0.0
        for episode in self.history[-METRICS_WINDOW:]:
            self.rewards.append(float(episode["reward"]))
            self.lengths.append(float(episode["length"]))

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
            "time": round(self.time_offset + time.monotonic() - self.started, 4),
            "timesteps": self.timesteps,
        })

    def metrics(self) -> Metrics:
        """Moving averages over the last METRICS_WINDOW episodes, throughput and latest losses."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return Metrics(
            mean_episode_reward=sum(self.rewards) / len(self.rewards) if self.rewards else 0.0,
            mean_episode_length=sum(self.lengths) / len(self.lengths) if self.lengths else 0.0,
            episodes_completed=len(self.history),
            steps_per_second=(self.timesteps - self.start_timesteps) / elapsed,
            losses=dict(self.losses),
        )

    def normalize_stats(self) -> NormalizeStats | None:
        """The running normalisation statistics, saved with every checkpoint and model (None: not normalised)."""
        return normalizing.stats_of(self.model.get_vec_normalize_env()) if self.model is not None else None

    def checkpoint(self, model: Any) -> None:
        """Save a checkpoint and tell the server."""
        path = self.store.save_checkpoint(self.job.run_id, model, self.timesteps,
                                          replay_buffer=self.job.save_replay_buffer and has_replay_buffer(model),
                                          normalize=self.normalize_stats())
        self.last_checkpoint = str(path)
        self.last_checkpoint_steps = self.timesteps
        self.write_history()
        self.emit(CheckpointSaved(self.job.run_id, self.timesteps, str(path)))
        self.log.info("checkpoint saved", timesteps=self.timesteps, path=str(path))

    def write_metadata(self, model: Any, training: str) -> None:
        """metadata.json: what was trained, how, with which library versions.

        `training` is the worker's view (running, completed, stopped early); why a run stopped (a user's
        StopTraining or a server shutdown) is the run registry's business, reported by GetTrainingStatus.
        """
        from rl_service.core.models.space_json import spaces_to_json

        job = self.job
        self.store.write_json(self.store.run_dir(job.run_id) / "metadata.json", {
            "run_id": job.run_id,
            "experiment_id": job.experiment_id,
            "algorithm": job.algorithm.upper(),
            "env_id": job.env_id,
            "seed": job.seed,
            "hyperparameters": dict(job.hyperparameters),
            "total_timesteps": job.total_timesteps,
            "timesteps_done": self.timesteps,
            "checkpoint_interval": job.checkpoint_interval,
            "training": training,
            "model_path": job.model_path,
            "observation_space": repr(model.observation_space),
            "action_space": repr(model.action_space),
            # The same spaces in plain JSON: serving rebuilds the policy from them without unpickling the model.
            "spaces": spaces_to_json(model.observation_space, model.action_space),
            "created_at": job.created_at,
            "updated_at": time.time(),
            "attempt": job.attempt,
            # The server rewrites this list with how each attempt ended once this worker is done.
            "attempts": [*job.attempts, {"attempt": job.attempt, "start_timesteps": self.start_timesteps,
                                         "outcome": ""}],
            "versions": library_versions(),
        })

    def write_history(self) -> None:
        """history.json: one entry per finished episode (reward, length, seconds since start, timesteps)."""
        self.store.write_json(self.store.run_dir(self.job.run_id) / "history.json",
                                  {"run_id": self.job.run_id, "episodes": self.history})


def _use_env_groups(model: Any, groups: int, env_id: str) -> None:
    """Keep `groups` groups of the simulation's envs in flight; EnvironmentLacksFeature when it cannot (the
    simulation behind the address may have changed since StartTraining checked it)."""
    if groups == 1:
        return
    try:
        use_env_groups(model, groups)
    except ValueError as exc:
        raise EnvironmentLacksFeature(f"hyperparameters['env_groups']: {groups} groups against {quoted(env_id)}: "
                                      f"{exc}", field="hyperparameters.env_groups") from None


def _int_value(values: Mapping[str, HyperValue], key: str, default: int) -> int:
    value = values.get(key)
    return value if isinstance(value, int) else default


def _float_value(values: Mapping[str, HyperValue], key: str) -> float | None:
    value = values.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class Evaluator:
    """Evaluations every eval_freq timesteps on an environment of their own, and the best model they find."""

    def __init__(self, trainer: _Trainer, freq: int, episodes: int, stop_at: float | None, masks: bool,
                 n_envs: int) -> None:
        self.trainer = trainer
        self.freq = freq
        self.episodes = episodes
        self.stop_at = stop_at
        self.masks = masks
        self.n_envs = n_envs  # an external simulation hosts a fixed number; a Gymnasium env needs only one
        self.seed = evaluation_seed(trainer.job.seed)
        best = trainer.job.best_evaluation
        self.best = Evaluation.from_dict(best) if best is not None else None  # a resumed run's best stays best
        # The same boundaries as an uninterrupted run: a resumed one continues at the next multiple.
        self.next_at = (trainer.start_timesteps // freq + 1) * freq
        self.env: Any = None  # built at the first evaluation

    def due(self, timesteps: int) -> bool:
        """True once the run has passed the next evaluation boundary."""
        return timesteps >= self.next_at

    def run(self, model: Any) -> bool:
        """Evaluate now, report it, keep the model when it is the best; True when it reached stop_at_reward."""
        trainer = self.trainer
        job = trainer.job
        self.next_at = (trainer.timesteps // self.freq + 1) * self.freq
        training_env = model.get_env()
        if self.env is None:
            n_envs = self.n_envs if is_external_env(job.env_id) else 1
            raw = make_vec_env(job.env_id, n_envs, self.seed, trainer.external_envs)
            self.env = normalizing.wrap_for_evaluation(raw, training_env)
        normalizing.sync_for_evaluation(training_env, self.env)
        result = evaluate(model, self.env, self.episodes, self.seed, trainer.timesteps, self.masks)
        if result is None:
            trainer.log.warning("evaluation finished no episode within its step cap", timesteps=trainer.timesteps)
            return False
        best = self.best is None or result.mean_reward > self.best.mean_reward
        if best:
            trainer.store.save_model(model, trainer.store.run_dir(job.run_id) / BEST_MODEL_NAME,
                                     trainer.normalize_stats())
            self.best = result
        trainer.emit(Evaluated(job.run_id, result, best))
        trainer.log.info("evaluated", timesteps=trainer.timesteps, mean_reward=result.mean_reward,
                         std_reward=result.std_reward, best=best)
        return self.stop_at is not None and result.mean_reward >= self.stop_at

    def close(self) -> None:
        """Close the evaluation environment (a simulation's connection included)."""
        if self.env is not None:
            self.env.close()


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
        interval = trainer.job.checkpoint_interval
        # The same boundaries as an uninterrupted run: a resumed one continues at the next multiple.
        self.next_checkpoint = (trainer.start_timesteps // interval + 1) * interval
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
        evaluator = trainer.evaluator
        if evaluator is not None and evaluator.due(trainer.timesteps) and evaluator.run(self.model):
            trainer.reached_reward = True
            return False
        now = time.monotonic()
        if now >= self.next_report:
            self.next_report = now + trainer.job.progress_interval
            trainer.emit(Progress(trainer.job.run_id, trainer.timesteps, trainer.metrics()))
            # Polled with each report, not each step: asking may cost a remote call under another executor.
            trainer.stopping = trainer.stopping or trainer.should_stop()
        return not trainer.stopping
