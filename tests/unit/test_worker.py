"""rl_service.core.runs.worker.run_worker, called in-process with tiny training budgets."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from stable_baselines3 import PPO

from rl_service.core.algorithms.hyperparams import format_value
from rl_service.core.algorithms.registry import ALGORITHMS
from rl_service.core.envs import make_vec_env
from rl_service.core.models.checkpoints import checkpoint_timesteps
from rl_service.core.runs.events import (
    CheckpointSaved,
    Failed,
    Finished,
    Progress,
    Started,
    event_from_dict,
    event_to_dict,
)
from rl_service.core.runs.jobs import RunJob
from rl_service.core.runs.records import Metrics
from rl_service.core.runs.resume import restore
from rl_service.core.runs.worker import WorkerServices, library_versions, run_worker
from rl_service.infra.model_store import FileModelStore
from tests.support.envs import CRASH_ENV_ID, MASKED_ENV_ID

PPO_RAW = {"n_steps": "64", "batch_size": "32", "n_epochs": "2", "net_arch": "16,16"}
# Tiny settings for every registry entry (keys a schema lacks are dropped).
TINY_RAW = {"n_steps": "32", "batch_size": "16", "n_epochs": "1", "net_arch": "16", "buffer_size": "500",
            "learning_starts": "16", "train_freq": "4", "target_update_interval": "50", "n_critic_updates": "2"}


def env_for(key: str) -> str:
    """An environment the algorithm can act in: Pendulum-v1 for Box actions only, the masked env for MaskablePPO."""
    spec = ALGORITHMS[key]
    if spec.needs_action_masks:
        return MASKED_ENV_ID
    return "CartPole-v1" if any(s.__name__ == "Discrete" for s in spec.action_spaces) else "Pendulum-v1"


class Sink(list[Any]):
    """The worker's emit(): keeps events, each after a round trip through its JSON form (what executors carry)."""

    def __call__(self, event: Any) -> None:
        self.append(event_from_dict(json.loads(json.dumps(event_to_dict(event)))))

    def of(self, kind: type) -> list[Any]:
        return [e for e in self if isinstance(e, kind)]

    def milestones(self) -> list[Any]:
        return [e for e in self if not isinstance(e, Progress)]


@dataclass
class Stop:
    """The worker's should_stop(): True after `after` calls (never for None)."""

    after: int | None = None
    calls: int = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.after is not None and self.calls > self.after


@dataclass
class Outcome:
    job: RunJob
    events: Sink
    store: FileModelStore

    @property
    def model_path(self) -> Path:
        return Path(self.job.model_path)

    def metadata(self) -> dict[str, Any]:
        return json.loads((self.store.run_dir(self.job.run_id) / "metadata.json").read_text())

    def history(self) -> dict[str, Any]:
        return json.loads((self.store.run_dir(self.job.run_id) / "history.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def restore_process_state() -> Iterator[None]:
    """run_worker binds run_id into structlog's context for the whole process: clear it afterwards."""
    yield
    structlog.contextvars.clear_contextvars()


def make_job(tmp: Path, *, algorithm: str = "ppo", env_id: str = "CartPole-v1", total_timesteps: int = 256,
             raw: dict[str, str] | None = None, checkpoint_interval: int = 100, run_id: str = "run-test",
             seed: int = 123) -> tuple[RunJob, FileModelStore]:
    spec = ALGORITHMS[algorithm]
    raw = PPO_RAW if raw is None else raw
    values = spec.schema.parse({k: v for k, v in raw.items() if k in spec.schema.names})
    spec.validate(values)
    store = FileModelStore(tmp / "models", tmp / "checkpoints", keep_checkpoints=5)
    job = RunJob(
        run_id=run_id, experiment_id="exp-unit", algorithm=algorithm, env_id=env_id,
        total_timesteps=total_timesteps, seed=seed,
        hyperparameters={k: format_value(v) for k, v in sorted(values.items())},
        checkpoint_interval=checkpoint_interval, model_path=str(store.resolve_model_path(run_id, "")),
        progress_interval=0.0, created_at=1234.5,
    )
    return job, store


def run(made: tuple[RunJob, FileModelStore], stop: Stop | None = None) -> Outcome:
    job, store = made
    events = Sink()
    run_worker(RunJob.from_dict(json.loads(json.dumps(job.to_dict()))), WorkerServices(store), events,
               stop or Stop())
    return Outcome(job, events, store)


@pytest.fixture(scope="module")
def completed(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    return run(make_job(tmp_path_factory.mktemp("completed")))


# ------------------------------------------------------------------ a run to completion


def test_event_sequence(completed: Outcome) -> None:
    events = completed.events
    assert isinstance(events[0], Started)
    assert events[0].run_id == "run-test"
    assert events[0].pid == os.getpid()
    assert isinstance(events[-1], Finished)
    kinds = [type(e).__name__ for e in events.milestones()]
    assert kinds == ["Started", "CheckpointSaved", "CheckpointSaved", "CheckpointSaved", "Finished"]
    assert [e.timesteps for e in events.of(CheckpointSaved)] == [100, 200, 256]
    assert not events.of(Failed)


def test_progress_events(completed: Outcome) -> None:
    progress = completed.events.of(Progress)
    assert progress, "progress_interval 0 should report on every step"
    steps = [p.timesteps for p in progress]
    assert steps == sorted(steps)
    assert steps[0] >= 1
    assert steps[-1] <= 256
    assert all(p.run_id == "run-test" and isinstance(p.metrics, Metrics) for p in progress)
    first_started = completed.events.index(completed.events.of(Started)[0])
    first_progress = completed.events.index(progress[0])
    assert first_started < first_progress


def test_finished_event(completed: Outcome) -> None:
    finished = completed.events[-1]
    assert isinstance(finished, Finished)
    assert finished.stopped_early is False
    assert finished.timesteps == 256
    assert finished.model_path == str(completed.model_path)
    last = completed.store.latest_checkpoint("run-test")
    assert last is not None
    assert finished.checkpoint_path == str(last)
    assert last.name == "checkpoint_256_steps.zip"
    metrics = finished.metrics
    assert metrics.episodes_completed > 0
    assert metrics.mean_episode_reward > 0
    assert metrics.mean_episode_length == pytest.approx(metrics.mean_episode_reward)  # CartPole: +1 per step
    assert metrics.steps_per_second > 0
    assert "loss" in metrics.losses
    assert "entropy_loss" in metrics.losses


def test_checkpoints_on_disk(completed: Outcome) -> None:
    names = [p.name for p in completed.store.checkpoints("run-test")]
    assert names == ["checkpoint_100_steps.zip", "checkpoint_200_steps.zip", "checkpoint_256_steps.zip"]
    for event in completed.events.of(CheckpointSaved):
        assert Path(event.path).is_file()


def test_model_loads_with_ppo(completed: Outcome) -> None:
    path = completed.model_path
    assert path == completed.store.run_dir("run-test") / "model.zip"
    model = PPO.load(path, device="cpu")
    assert model.num_timesteps == 256
    assert model.n_steps == 64
    assert model.batch_size == 32
    assert model.policy.net_arch == [16, 16]
    action, _ = model.predict([0.0, 0.0, 0.0, 0.0], deterministic=True)
    assert int(action) in (0, 1)


def test_checkpoint_loads_with_ppo(completed: Outcome) -> None:
    first = completed.store.checkpoints("run-test")[0]
    model = PPO.load(first, device="cpu")
    assert model.num_timesteps >= 100


def test_metadata(completed: Outcome) -> None:
    meta = completed.metadata()
    assert meta["run_id"] == "run-test"
    assert meta["experiment_id"] == "exp-unit"
    assert meta["algorithm"] == "PPO"
    assert meta["env_id"] == "CartPole-v1"
    assert meta["seed"] == 123
    assert meta["hyperparameters"] == dict(completed.job.hyperparameters)
    assert meta["hyperparameters"]["n_steps"] == "64"
    assert meta["hyperparameters"]["net_arch"] == "16,16"
    assert meta["total_timesteps"] == 256
    assert meta["timesteps_done"] == 256
    assert meta["checkpoint_interval"] == 100
    assert meta["training"] == "completed"
    assert meta["model_path"] == str(completed.model_path)
    assert meta["created_at"] == 1234.5
    assert "Discrete(2)" in meta["action_space"]
    assert "Box" in meta["observation_space"]
    assert meta["versions"] == library_versions()
    assert set(meta["versions"]) >= {"python", "rl_service", "stable_baselines3", "gymnasium", "torch", "numpy"}


def test_history(completed: Outcome) -> None:
    history = completed.history()
    assert history["run_id"] == "run-test"
    episodes = history["episodes"]
    assert len(episodes) == completed.events[-1].metrics.episodes_completed
    assert len(episodes) > 0
    for episode in episodes:
        assert set(episode) == {"reward", "length", "time", "timesteps"}
        assert episode["length"] >= 1
        assert episode["reward"] == episode["length"]
    assert sum(e["length"] for e in episodes) <= 256
    timesteps = [e["timesteps"] for e in episodes]
    assert timesteps == sorted(timesteps)


def test_every_log_line_of_the_worker_names_the_run(tmp_path: Path) -> None:
    # The environment adapters log from infra with loggers of their own: the run comes from structlog's context.
    structlog.contextvars.clear_contextvars()
    run(make_job(tmp_path, total_timesteps=64, checkpoint_interval=100))
    other = structlog.contextvars.merge_contextvars(None, "info", {"event": "x"})
    assert other["run_id"] == "run-test" and other["experiment_id"] == "exp-unit"


# ------------------------------------------------------------------ stop requests


def test_stop_requested_immediately(tmp_path: Path) -> None:
    outcome = run(make_job(tmp_path), Stop(after=0))
    finished = outcome.events[-1]
    assert isinstance(finished, Finished)
    assert finished.stopped_early is True
    assert 0 < finished.timesteps < 256
    assert not outcome.events.of(Failed)
    model = PPO.load(outcome.model_path, device="cpu")
    assert model.num_timesteps == finished.timesteps
    assert finished.checkpoint_path
    assert Path(finished.checkpoint_path).is_file()
    assert outcome.metadata()["training"] == "stopped early"
    assert outcome.metadata()["timesteps_done"] == finished.timesteps


def test_stop_requested_midway(tmp_path: Path) -> None:
    outcome = run(make_job(tmp_path), Stop(after=150))
    finished = outcome.events[-1]
    assert isinstance(finished, Finished)
    assert finished.stopped_early is True
    assert 100 <= finished.timesteps < 256
    assert [e.timesteps for e in outcome.events.of(CheckpointSaved)] == [100, finished.timesteps]
    assert outcome.model_path.is_file()


def test_no_duplicate_checkpoint_on_a_boundary(tmp_path: Path) -> None:
    outcome = run(make_job(tmp_path, total_timesteps=128, checkpoint_interval=64))
    assert isinstance(outcome.events[-1], Finished)
    assert [e.timesteps for e in outcome.events.of(CheckpointSaved)] == [64, 128]


# ------------------------------------------------------------------ failures


@pytest.mark.filterwarnings("ignore:.*render_mode:UserWarning")
def test_crashing_env_gives_failed_event(tmp_path: Path) -> None:
    outcome = run(make_job(tmp_path, env_id=CRASH_ENV_ID, total_timesteps=512))
    last = outcome.events[-1]
    assert isinstance(last, Failed)
    assert last.run_id == "run-test"
    assert last.error == "RuntimeError: CrashAfterEnv: deliberate crash after 300 steps"
    assert last.timesteps == 300
    assert not outcome.events.of(Finished)
    assert isinstance(outcome.events[0], Started)
    assert [e.timesteps for e in outcome.events.of(CheckpointSaved)] == [100, 200, 300]
    assert not outcome.model_path.exists()
    assert outcome.store.latest_checkpoint("run-test") is not None
    assert outcome.history()["episodes"], "history is written on failure"
    assert outcome.metadata()["training"] == "running"


def test_unknown_env_gives_failed_event_without_started(tmp_path: Path) -> None:
    outcome = run(make_job(tmp_path, env_id="NoSuchEnv-v0"))
    assert len(outcome.events) == 1
    failed = outcome.events[0]
    assert isinstance(failed, Failed)
    assert failed.timesteps == 0
    assert failed.error.startswith("UnknownEnvironment: ")
    assert "NoSuchEnv-v0" in failed.error


# ------------------------------------------------------------------ every algorithm


@pytest.mark.parametrize("key", sorted(ALGORITHMS))
def test_each_algorithm_trains_and_saves(key: str, tmp_path: Path) -> None:
    made = make_job(tmp_path, algorithm=key, env_id=env_for(key), raw=TINY_RAW, total_timesteps=64,
                    checkpoint_interval=100, run_id=f"run-{key}")
    outcome = run(made)
    finished = outcome.events[-1]
    assert isinstance(finished, Finished), outcome.events.milestones()
    assert finished.stopped_early is False
    assert finished.timesteps == 64
    assert [e.timesteps for e in outcome.events.of(CheckpointSaved)] == [64]
    model = ALGORITHMS[key].cls.load(outcome.model_path, device="cpu")
    assert model.num_timesteps == 64
    # write_metadata upper-cases the registry key (MASKABLEPPO for MaskablePPO).
    assert outcome.metadata()["algorithm"] == ALGORITHMS[key].name.upper()


# ------------------------------------------------------------------ resuming


def resume(made: tuple[RunJob, FileModelStore], **changes: Any) -> Outcome:
    job, store = made
    return run((replace(job, resume=True, attempt=2, **changes), store))


@pytest.mark.parametrize("key", sorted(ALGORITHMS))
def test_a_resumed_run_continues_counters_schedule_and_history(key: str, tmp_path: Path) -> None:
    total = 512
    raw = {**TINY_RAW, "learning_rate": "lin_0.001"}
    made = make_job(tmp_path, algorithm=key, env_id=env_for(key), raw=raw, total_timesteps=total,
                    checkpoint_interval=100, run_id=f"run-{key}")
    first = run(made, Stop(after=230))
    stopped = first.events[-1]
    assert isinstance(stopped, Finished) and stopped.stopped_early and 200 <= stopped.timesteps < total
    episodes_before = first.history()["episodes"]

    second = resume(made)
    finished = second.events[-1]
    assert isinstance(finished, Finished) and not finished.stopped_early, second.events.milestones()
    assert finished.timesteps >= total
    # Checkpoints continue on the run's interval boundaries, after the one it resumed from.
    saved = [e.timesteps for e in second.events.of(CheckpointSaved)]
    assert saved[0] == (stopped.timesteps // 100 + 1) * 100 and saved[-1] == finished.timesteps
    # The schedule continues from the run's progress: lin_0.001 at T is 0.001 * (1 - T / total).
    rates = [(p.timesteps, p.metrics.losses["learning_rate"]) for p in second.events.of(Progress)
             if "learning_rate" in p.metrics.losses]
    assert rates, "the algorithm logged its learning rate"
    first_step, first_rate = rates[0]
    expected = 0.001 * (1 - stopped.timesteps / total)
    # Within one update of where it resumed (a fresh schedule would start at 0.001).
    assert abs(first_rate - expected) <= 0.001 * (first_step - stopped.timesteps + 64) / total, rates[:3]
    # The history continues: the first attempt's episodes, then new ones, timesteps never going back.
    episodes = second.history()["episodes"]
    kept = [e for e in episodes_before if e["timesteps"] <= stopped.timesteps]
    assert episodes[:len(kept)] == kept and len(episodes) > len(kept)
    steps = [e["timesteps"] for e in episodes]
    times = [e["time"] for e in episodes]
    assert steps == sorted(steps) and times == sorted(times)
    assert finished.metrics.episodes_completed == len(episodes)
    meta = second.metadata()
    assert meta["attempt"] == 2 and meta["attempts"][-1]["start_timesteps"] == stopped.timesteps


def test_a_resumed_dqn_keeps_its_replay_buffer(tmp_path: Path) -> None:
    made = make_job(tmp_path, algorithm="dqn", raw=TINY_RAW, total_timesteps=400, checkpoint_interval=100)
    first = run(made, Stop(after=250))
    stopped = first.events[-1]
    assert isinstance(stopped, Finished)
    checkpoint = first.store.latest_checkpoint("run-test")
    assert checkpoint is not None and first.store.replay_buffer(checkpoint) is not None
    restored = restore(ALGORITHMS["dqn"].cls, first.store, "run-test", make_vec_env("CartPole-v1", 1, 0),
                       structlog.get_logger())
    assert restored is not None
    # Every transition the stopped model held: stable-baselines3 counts the step a stop lands in before it stores
    # that step's transition, so the stopped model itself held timesteps - 1.
    assert restored.model.replay_buffer.size() == stopped.timesteps - 1
    # Pruning takes a checkpoint's buffer with it.
    buffers = sorted(p.name for p in checkpoint.parent.glob("*.replay_buffer.pkl"))
    assert buffers == sorted(p.with_suffix(".replay_buffer.pkl").name
                             for p in first.store.checkpoints("run-test"))


def test_without_saved_buffers_a_checkpoint_has_none(tmp_path: Path) -> None:
    job, store = make_job(tmp_path, algorithm="dqn", raw=TINY_RAW, total_timesteps=200, checkpoint_interval=100)
    outcome = run((replace(job, save_replay_buffer=False), store))
    assert isinstance(outcome.events[-1], Finished)
    assert list(store.checkpoint_run_dir("run-test").glob("*.pkl")) == []


def test_a_corrupted_newest_checkpoint_is_skipped(tmp_path: Path) -> None:
    made = make_job(tmp_path, total_timesteps=512, checkpoint_interval=100)
    run(made, Stop(after=230))
    store = made[1]
    older, newest = store.checkpoints("run-test")[-2:]
    newest.write_bytes(b"not a zip: cut short by a crash")
    second = resume(made)
    finished = second.events[-1]
    assert isinstance(finished, Finished) and not finished.stopped_early
    saved = [e.timesteps for e in second.events.of(CheckpointSaved)]
    assert saved[0] == (checkpoint_timesteps(older) // 100 + 1) * 100  # type: ignore[operator]


def test_resume_without_any_checkpoint_starts_over(tmp_path: Path) -> None:
    outcome = resume(make_job(tmp_path, total_timesteps=128, checkpoint_interval=64))
    assert isinstance(outcome.events[-1], Finished)
    assert [e.timesteps for e in outcome.events.of(CheckpointSaved)] == [64, 128]
