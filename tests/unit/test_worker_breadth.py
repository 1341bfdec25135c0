"""The worker's learning-breadth parts, in-process with tiny budgets: off-policy replay buffers of the new algorithms,
normalisation statistics beside every checkpoint and model (and back on resume), evaluations with the best model and
stop_at_reward, and action masks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import structlog
from stable_baselines3.common.vec_env import VecNormalize

from rl_service.core.algorithms.normalize import parse_normalize
from rl_service.core.algorithms.registry import ALGORITHMS
from rl_service.core.envs import make_vec_env
from rl_service.core.models.checkpoints import BEST_MODEL_NAME
from rl_service.core.models.normalization import load_stats, stats_path
from rl_service.core.runs import normalizing
from rl_service.core.runs.events import CheckpointSaved, Evaluated, Failed, Finished
from rl_service.core.runs.records import Evaluation
from rl_service.core.runs.resume import restore
from tests.support.envs import MASKED_ENV_ID, MaskedChoiceEnv
from tests.unit.test_worker import TINY_RAW, Stop, make_job, resume, run

COUNTED_ENV_ID = "rl_service/MaskedChoiceCounted-v0"
SAC_RAW = {"learning_starts": "16", "buffer_size": "500", "batch_size": "16", "net_arch": "16"}
NORMALIZED_PPO = {"n_steps": "64", "batch_size": "32", "n_epochs": "1", "net_arch": "16", "normalize": "true"}


class CountedMaskedChoice(MaskedChoiceEnv):
    """MaskedChoiceEnv whose instances are remembered, so a test can read their illegal-action counters."""

    instances: list[CountedMaskedChoice] = []

    def __init__(self) -> None:
        super().__init__()
        CountedMaskedChoice.instances.append(self)


@pytest.fixture(autouse=True)
def counted_env() -> Iterator[None]:
    if COUNTED_ENV_ID not in gym.registry:
        gym.register(id=COUNTED_ENV_ID, entry_point=CountedMaskedChoice)  # type: ignore[arg-type]
    CountedMaskedChoice.instances.clear()
    yield
    structlog.contextvars.clear_contextvars()


def _stats_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.normalize.safetensors"))


# ------------------------------------------------------------------ replay buffers


def test_a_resumed_sac_keeps_its_replay_buffer(tmp_path: Path) -> None:
    made = make_job(tmp_path, algorithm="sac", env_id="Pendulum-v1", raw=SAC_RAW, total_timesteps=400,
                    checkpoint_interval=100)
    first = run(made, Stop(after=250))
    stopped = first.events[-1]
    assert isinstance(stopped, Finished) and stopped.stopped_early
    checkpoint = first.store.latest_checkpoint("run-test")
    assert checkpoint is not None and first.store.replay_buffer(checkpoint) is not None
    restored = restore(ALGORITHMS["sac"].cls, first.store, "run-test", make_vec_env("Pendulum-v1", 1, 0),
                       structlog.get_logger())
    assert restored is not None
    # As for DQN: the step a stop lands in is counted before its transition is stored.
    assert restored.model.replay_buffer.size() == stopped.timesteps - 1
    second = resume(made)
    assert isinstance(second.events[-1], Finished) and second.events[-1].timesteps >= 400


# ------------------------------------------------------------------ normalisation


def test_statistics_sit_beside_every_checkpoint_and_the_model_and_round_trip(tmp_path: Path) -> None:
    job, store = make_job(tmp_path, raw=NORMALIZED_PPO, total_timesteps=700, checkpoint_interval=100)
    store = replace(store, keep_checkpoints=2)
    outcome = run((job, store))
    assert isinstance(outcome.events[-1], Finished)
    checkpoints = store.checkpoints("run-test")
    # PPO trains whole rollouts of 64 steps: 704 in all.
    assert [p.name for p in checkpoints] == ["checkpoint_700_steps.zip", "checkpoint_704_steps.zip"]
    # Pruning took the statistics of the pruned checkpoints with them.
    assert _stats_files(checkpoints[0].parent) == sorted(stats_path(p).name for p in checkpoints)
    model_stats = stats_path(outcome.model_path)
    assert model_stats.is_file() and not list(outcome.model_path.parent.glob(".*.tmp"))
    final, last = load_stats(model_stats), load_stats(stats_path(checkpoints[-1]))
    assert final.norm_obs and final.norm_reward and final.gamma == 0.99 and final.clip_obs == 10.0
    # The final model and the last checkpoint were saved at the same step: the same statistics.
    np.testing.assert_array_equal(final.obs_mean, last.obs_mean)
    assert final.obs_count == last.obs_count > 704  # every step's observation (and the resets) updated them
    assert final.obs_mean.shape == (4,) and np.all(final.obs_var > 0)
    # Statistics restored into a VecNormalize and read out again are the same numbers.
    env = normalizing.wrap(make_vec_env("CartPole-v1", 1, 0), parse_normalize("true"), 0.99)
    assert isinstance(env, VecNormalize)
    normalizing.restore_stats(env, outcome.model_path)
    again = normalizing.stats_of(env)
    assert again is not None
    np.testing.assert_array_equal(again.obs_var, final.obs_var)
    assert (again.obs_count, again.ret_var, again.ret_count) == (final.obs_count, final.ret_var, final.ret_count)


def test_a_resumed_normalized_run_continues_its_statistics(tmp_path: Path) -> None:
    made = make_job(tmp_path, raw=NORMALIZED_PPO, total_timesteps=600, checkpoint_interval=100)
    first = run(made, Stop(after=250))
    assert isinstance(first.events[-1], Finished) and first.events[-1].stopped_early
    checkpoint = first.store.latest_checkpoint("run-test")
    assert checkpoint is not None
    saved = load_stats(stats_path(checkpoint))
    env = normalizing.wrap(make_vec_env("CartPole-v1", 1, 0), parse_normalize("true"), 0.99)
    restored = restore(ALGORITHMS["ppo"].cls, first.store, "run-test", env, structlog.get_logger())
    assert restored is not None and restored.checkpoint == checkpoint
    assert isinstance(env, VecNormalize) and env.obs_rms.count == saved.obs_count > 200
    np.testing.assert_array_equal(env.obs_rms.mean, saved.obs_mean)
    assert restored.model.get_vec_normalize_env() is env
    second = resume(made)
    assert isinstance(second.events[-1], Finished) and not second.events[-1].stopped_early
    final = load_stats(stats_path(second.model_path))
    assert final.obs_count > saved.obs_count + 300, "the statistics continued rather than starting over"


def test_a_checkpoint_without_its_statistics_is_skipped_on_resume(tmp_path: Path) -> None:
    made = make_job(tmp_path, raw=NORMALIZED_PPO, total_timesteps=600, checkpoint_interval=100)
    run(made, Stop(after=250))
    store = made[1]
    older, newest = store.checkpoints("run-test")[-2:]
    stats_path(newest).unlink()
    env = normalizing.wrap(make_vec_env("CartPole-v1", 1, 0), parse_normalize("true"), 0.99)
    restored = restore(ALGORITHMS["ppo"].cls, store, "run-test", env, structlog.get_logger())
    assert restored is not None and restored.checkpoint == older


def test_observations_only_leave_rewards_raw(tmp_path: Path) -> None:
    outcome = run(make_job(tmp_path, raw={**NORMALIZED_PPO, "normalize": "obs"}, total_timesteps=128,
                           checkpoint_interval=100))
    stats = load_stats(stats_path(outcome.model_path))
    assert stats.norm_obs and not stats.norm_reward
    # Episode rewards are the environment's own (CartPole: one per step), normalised or not.
    episodes = outcome.history()["episodes"]
    assert episodes and all(e["reward"] == e["length"] for e in episodes)


def test_unnormalized_runs_write_no_statistics(tmp_path: Path) -> None:
    outcome = run(make_job(tmp_path, total_timesteps=128, checkpoint_interval=100))
    assert not _stats_files(outcome.store.checkpoint_run_dir("run-test"))
    assert not _stats_files(outcome.model_path.parent)


# ------------------------------------------------------------------ evaluations


def test_evaluations_report_and_keep_the_best_model(tmp_path: Path) -> None:
    raw = {**NORMALIZED_PPO, "eval_freq": "100", "n_eval_episodes": "3"}
    outcome = run(make_job(tmp_path, raw=raw, total_timesteps=450, checkpoint_interval=1000))
    evaluations = outcome.events.of(Evaluated)
    assert [e.evaluation.timesteps for e in evaluations] == [100, 200, 300, 400, 500]  # 512 steps: whole rollouts
    assert all(e.evaluation.episodes == 3 and e.evaluation.mean_reward == e.evaluation.mean_length
               for e in evaluations)  # raw CartPole rewards, though the run normalises them
    assert evaluations[0].best
    best_so_far = -np.inf
    for event in evaluations:
        assert event.best == (event.evaluation.mean_reward > best_so_far)
        best_so_far = max(best_so_far, event.evaluation.mean_reward)
    best_path = outcome.store.run_dir("run-test") / BEST_MODEL_NAME
    assert best_path.is_file() and stats_path(best_path).is_file()
    best = [e.evaluation for e in evaluations if e.best][-1]
    model = ALGORITHMS["ppo"].cls.load(best_path, device="cpu")
    assert model.num_timesteps == best.timesteps
    assert outcome.metadata()["training"] == "completed"


def test_evaluations_are_deterministic_for_a_seed(tmp_path: Path) -> None:
    raw = {**TINY_RAW, "eval_freq": "64", "n_eval_episodes": "2"}
    first = run(make_job(tmp_path / "a", raw=raw, total_timesteps=128, checkpoint_interval=1000))
    second = run(make_job(tmp_path / "b", raw=raw, total_timesteps=128, checkpoint_interval=1000))
    assert [e.evaluation for e in first.events.of(Evaluated)] == [e.evaluation for e in second.events.of(Evaluated)]


def test_stop_at_reward_ends_the_run_as_a_success_before_its_budget(tmp_path: Path) -> None:
    raw = {**TINY_RAW, "eval_freq": "64", "n_eval_episodes": "2", "stop_at_reward": "1"}
    outcome = run(make_job(tmp_path, raw=raw, total_timesteps=5000, checkpoint_interval=1000))
    finished = outcome.events[-1]
    assert isinstance(finished, Finished) and not finished.stopped_early
    assert finished.timesteps == 64 < 5000  # CartPole's every episode returns at least 1
    assert [e.timesteps for e in outcome.events.of(CheckpointSaved)] == [64]
    assert outcome.model_path.is_file()
    assert outcome.metadata()["training"] == "reached stop_at_reward"


def test_a_resumed_run_keeps_its_best(tmp_path: Path) -> None:
    raw = {**TINY_RAW, "eval_freq": "64", "n_eval_episodes": "2"}
    job, store = make_job(tmp_path, raw=raw, total_timesteps=256, checkpoint_interval=64)
    # The best of earlier attempts (in the job, from the run's record) is out of reach: nothing new is best.
    unbeatable = Evaluation(1e9, 0.0, 64, 2).to_dict()
    outcome = run((replace(job, best_evaluation=unbeatable), store))
    evaluations = outcome.events.of(Evaluated)
    assert len(evaluations) == 4 and not any(e.best for e in evaluations)
    assert not (store.run_dir("run-test") / BEST_MODEL_NAME).exists()


# ------------------------------------------------------------------ action masks


def test_maskable_ppo_never_takes_an_illegal_action_and_ppo_does(tmp_path: Path) -> None:
    raw = {"n_steps": "64", "batch_size": "32", "n_epochs": "1", "net_arch": "16", "eval_freq": "128"}
    masked = run(make_job(tmp_path / "masked", algorithm="maskableppo", env_id=COUNTED_ENV_ID, raw=raw,
                          total_timesteps=256))
    assert isinstance(masked.events[-1], Finished)
    envs = list(CountedMaskedChoice.instances)
    assert len(envs) >= 2, "a training env and an evaluation env"
    assert sum(env.illegal_actions_taken for env in envs) == 0
    assert all(e["length"] == 16 for e in masked.history()["episodes"])  # no episode ended on an illegal action
    assert all(e.evaluation.mean_length == 16 for e in masked.events.of(Evaluated))

    CountedMaskedChoice.instances.clear()
    plain = run(make_job(tmp_path / "plain", algorithm="ppo", env_id=COUNTED_ENV_ID, raw=raw, total_timesteps=256))
    assert isinstance(plain.events[-1], Finished)
    assert sum(env.illegal_actions_taken for env in CountedMaskedChoice.instances) > 10


def test_maskable_ppo_without_masks_fails_clearly(tmp_path: Path) -> None:
    # A registered env is refused at StartTraining; a simulation's masks are known only in the worker.
    outcome = run(make_job(tmp_path, algorithm="maskableppo", raw={"n_steps": "64", "batch_size": "32"}))
    assert len(outcome.events) == 1
    failed = outcome.events[0]
    assert isinstance(failed, Failed)
    assert "MaskablePPO" in failed.error and "action_masks()" in failed.error and "'CartPole-v1'" in failed.error


def test_masks_reach_through_gymnasium_wrappers_and_vec_envs() -> None:
    from rl_service.core.algorithms.masking import get_action_masks, is_masking_supported, registered_env_has_masks

    env = make_vec_env(MASKED_ENV_ID, 2, 0)  # Monitor, TimeLimit-free registration, DummyVecEnv
    try:
        assert is_masking_supported(env)
        env.reset()
        masks = get_action_masks(env)
        assert masks.shape == (2, MaskedChoiceEnv.N_ACTIONS) and np.all(masks.sum(axis=1) == 2)
        wrapped = VecNormalize(env)
        assert is_masking_supported(wrapped)
        np.testing.assert_array_equal(get_action_masks(wrapped), masks)
    finally:
        env.close()
    assert registered_env_has_masks(MASKED_ENV_ID) and not registered_env_has_masks("CartPole-v1")
