"""ExternalVecEnv over FakeExternalEnvAdapter: the same transitions as stable-baselines3's DummyVecEnv."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

from rl_service.core.errors import EnvironmentUnavailable
from rl_service.infra.external_env.adapter import FakeExternalEnvAdapter
from rl_service.infra.external_env.env_batch import EnvBatch, ResetNeeded
from rl_service.infra.external_env.vec_env import ExternalVecEnv
from tests.support.envs import CRASH_ENV_ID


def short_cartpole() -> gym.Env:  # type: ignore[type-arg]
    return gym.make("CartPole-v1", max_episode_steps=15)  # truncations as well as terminations


def test_transitions_match_dummy_vec_env() -> None:
    n = 4
    external = ExternalVecEnv(FakeExternalEnvAdapter([short_cartpole] * n))
    reference = DummyVecEnv([short_cartpole] * n)
    external.seed(11)
    reference.seed(11)
    np.testing.assert_array_equal(external.reset(), reference.reset())
    rng = np.random.default_rng(0)
    ended = truncations = 0
    for _ in range(200):
        actions = rng.integers(0, 2, size=n)
        obs_a, rew_a, done_a, info_a = external.step(actions)
        obs_b, rew_b, done_b, info_b = reference.step(actions)
        np.testing.assert_array_equal(obs_a, obs_b)
        np.testing.assert_array_equal(rew_a, rew_b)
        np.testing.assert_array_equal(done_a, done_b)
        assert rew_a.dtype == np.float32 and done_a.dtype == bool
        for a, b in zip(info_a, info_b, strict=True):
            assert ("terminal_observation" in a) == ("terminal_observation" in b)
            if "terminal_observation" in a:
                ended += 1
                np.testing.assert_array_equal(a["terminal_observation"], b["terminal_observation"])
                assert a["TimeLimit.truncated"] == b["TimeLimit.truncated"]
                truncations += a["TimeLimit.truncated"]
    assert ended > 10 and truncations > 0


def test_seed_applies_to_the_next_reset_only() -> None:
    adapter = FakeExternalEnvAdapter.from_gym_id("CartPole-v1", 2)
    env = ExternalVecEnv(adapter)
    env.seed(5)
    first = env.reset()
    env.reset()
    env.seed(5)
    np.testing.assert_array_equal(env.reset(), first)
    assert adapter.resets == [5, None, 5]


def test_vec_monitor_reports_episodes() -> None:
    env = VecMonitor(ExternalVecEnv(FakeExternalEnvAdapter([short_cartpole] * 2)))
    env.reset()
    episodes = []
    for _ in range(40):
        _, _, _, infos = env.step(np.zeros(2, dtype=np.int64))
        episodes += [info["episode"] for info in infos if "episode" in info]
    assert episodes and all(e["l"] <= 15 and e["r"] == e["l"] for e in episodes)


def test_remote_attributes_are_not_reachable() -> None:
    env = ExternalVecEnv(FakeExternalEnvAdapter.from_gym_id("CartPole-v1", 2))
    assert env.render_mode is None
    assert env.env_is_wrapped(gym.Wrapper) == [False, False]
    with pytest.raises(AttributeError, match="fake://CartPole-v1"):
        env.get_attr("gravity")
    with pytest.raises(AttributeError):
        env.env_method("render")
    env.close()
    assert env.adapter.closed  # type: ignore[attr-defined]


def test_adapter_errors_reach_the_learner() -> None:
    def fail(step: int) -> Exception | None:
        return EnvironmentUnavailable("env fake: Step did not answer within 1s") if step == 3 else None

    env = ExternalVecEnv(FakeExternalEnvAdapter([short_cartpole] * 2, fail_step=fail))
    env.reset()
    env.step(np.zeros(2, dtype=np.int64))
    env.step(np.zeros(2, dtype=np.int64))
    with pytest.raises(EnvironmentUnavailable, match="did not answer"):
        env.step(np.zeros(2, dtype=np.int64))


def test_env_batch_needs_a_reset_before_stepping_and_after_a_failure() -> None:
    batch = EnvBatch.from_gym_id(CRASH_ENV_ID, 2)
    with pytest.raises(ResetNeeded):
        batch.step(np.zeros(2, dtype=np.int64))
    batch.reset(seed=1)
    with pytest.raises(RuntimeError, match="deliberate crash"):
        for _ in range(1000):
            batch.step(np.zeros(2, dtype=np.int64))
    with pytest.raises(ResetNeeded):
        batch.step(np.zeros(2, dtype=np.int64))


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_ppo_learns_through_the_adapter(env_id: str) -> None:
    env = VecMonitor(ExternalVecEnv(FakeExternalEnvAdapter.from_gym_id(env_id, 2)))
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=128)
    assert model.num_timesteps == 128
    assert model.action_space == env.action_space
