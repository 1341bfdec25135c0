"""ExternalVecEnv over FakeExternalEnvAdapter: the same transitions as stable-baselines3's DummyVecEnv, and action
masks as sb3-contrib's MaskablePPO reads them."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

from rl_service.core.errors import EnvironmentUnavailable
from rl_service.infra.external_env.adapter import FakeExternalEnvAdapter
from rl_service.infra.external_env.env_batch import EnvBatch, ResetNeeded
from rl_service.infra.external_env.vec_env import ExternalVecEnv
from tests.support.envs import CRASH_ENV_ID, MASKED_ENV_ID, MaskedChoiceEnv


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


# ----------------------------------------------------------------------------------------------- action masks
# MaskedChoice shows its legal actions as the first N_ACTIONS observation values: each mask can be checked
# against the observation it belongs to.


class _BoxWithMasks(gym.Env[np.ndarray, np.ndarray]):
    observation_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def action_masks(self) -> np.ndarray:
        return np.ones(1, dtype=bool)


class _MultiDiscreteChoice(gym.Env[np.ndarray, np.ndarray]):
    observation_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
    action_space = gym.spaces.MultiDiscrete([3, 4])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        return np.zeros(1, dtype=np.float32), 0.0, True, False, {}



def masked_choice_batch(num_envs: int) -> ExternalVecEnv:
    return ExternalVecEnv(FakeExternalEnvAdapter.from_gym_id(MASKED_ENV_ID, num_envs))


def shown_legal(observations: np.ndarray) -> np.ndarray:
    return observations[:, :MaskedChoiceEnv.N_ACTIONS] > 0.5


def test_masks_belong_to_the_returned_observations_also_after_an_auto_reset() -> None:
    env = VecMonitor(masked_choice_batch(3))  # as the worker wraps it
    env.seed(4)
    observations = env.reset()
    assert is_masking_supported(env)
    rng = np.random.default_rng(0)
    telling = 0  # auto-resets where the final observation's legal actions differ from the next episode's
    for _ in range(60):
        masks = get_action_masks(env)
        assert masks.shape == (3, MaskedChoiceEnv.N_ACTIONS) and masks.dtype == bool
        np.testing.assert_array_equal(masks, shown_legal(observations))
        per_env = env.env_method("action_masks", indices=[2, 0])
        np.testing.assert_array_equal(per_env[0], masks[2])
        np.testing.assert_array_equal(per_env[1], masks[0])
        observations, _, dones, infos = env.step(rng.integers(0, MaskedChoiceEnv.N_ACTIONS, size=3))
        for i in np.flatnonzero(dones):
            final = shown_legal(infos[i]["terminal_observation"][None])[0]
            telling += not np.array_equal(final, shown_legal(observations)[i])
    assert telling > 10  # random actions are mostly illegal: episodes end often


def test_get_attr_answers_a_mask_callable_per_env() -> None:
    env = masked_choice_batch(2)
    observations = env.reset()
    callables = env.get_attr("action_masks")
    assert len(callables) == 2 and env.has_attr("action_masks")
    np.testing.assert_array_equal(callables[1](), shown_legal(observations)[1])
    kept = env.action_masks()
    env.step(np.zeros(2, dtype=np.int64))
    np.testing.assert_array_equal(kept, shown_legal(observations))  # a copy: a later step leaves it unchanged


@pytest.mark.parametrize(("make", "width"), [(lambda: gym.make("CartPole-v1"), 2), (_MultiDiscreteChoice, 7)],
                         ids=["Discrete", "MultiDiscrete"])
def test_a_simulation_without_masks_has_every_action_legal(make: Callable[[], gym.Env[Any, Any]], width: int) -> None:
    env = VecMonitor(ExternalVecEnv(FakeExternalEnvAdapter([make, make])))
    env.reset()
    assert is_masking_supported(env)
    np.testing.assert_array_equal(get_action_masks(env), np.ones((2, width), dtype=bool))


def test_box_actions_have_no_masks() -> None:
    env = VecMonitor(ExternalVecEnv(FakeExternalEnvAdapter.from_gym_id("Pendulum-v1", 2)))
    env.reset()
    assert not is_masking_supported(env)
    with pytest.raises(AttributeError, match="no action masks for the action space Box"):
        env.env_method("action_masks")
    with pytest.raises(AttributeError, match="cannot call 'action_masks'"):
        ExternalVecEnv(FakeExternalEnvAdapter.from_gym_id("CartPole-v1", 1)).env_method("action_masks", 1)


def test_maskable_ppo_through_the_adapter_takes_no_illegal_action() -> None:
    adapter = FakeExternalEnvAdapter.from_gym_id(MASKED_ENV_ID, 2)
    model = MaskablePPO("MlpPolicy", VecMonitor(ExternalVecEnv(adapter)), n_steps=32, batch_size=32, n_epochs=1,
                        seed=0, device="cpu")
    model.learn(total_timesteps=256)
    assert model.num_timesteps == 256
    assert [env.unwrapped.illegal_actions_taken for env in adapter._batch.envs] == [0, 0]  # type: ignore[attr-defined]


def test_env_batch_reads_masks_through_wrappers_for_discrete_actions_only() -> None:
    batch = EnvBatch.from_gym_id(MASKED_ENV_ID, 2)  # gym.make wraps it (order enforcing, checker)
    assert batch.serves_action_masks and batch.last_action_masks is None
    observations = batch.reset(seed=3)
    assert batch.last_action_masks is not None
    np.testing.assert_array_equal(batch.last_action_masks, shown_legal(observations))
    step = batch.step(np.zeros(2, dtype=np.int64))
    assert step.action_masks is batch.last_action_masks
    np.testing.assert_array_equal(step.action_masks, shown_legal(step.observations))
    assert not EnvBatch.from_gym_id("CartPole-v1", 1).serves_action_masks
    assert not EnvBatch([lambda: _BoxWithMasks()]).serves_action_masks  # masks travel for Discrete only


@pytest.mark.parametrize(("mask", "message"), [
    (np.zeros(8, dtype=bool), "env 0: action_masks() leaves no legal action"),
    (np.ones(3, dtype=bool), "env 0: action_masks() returned bool of shape (3,); expected 8 bools"),
    (np.ones(8, dtype=np.float32), "returned float32 of shape (8,)"),
])
def test_env_batch_refuses_a_broken_action_masks(mask: np.ndarray, message: str) -> None:
    env = MaskedChoiceEnv()
    env.action_masks = lambda: mask  # type: ignore[method-assign]
    batch = EnvBatch([lambda: env])
    with pytest.raises(ValueError, match=re.escape(message)):
        batch.reset(seed=0)
    assert batch.needs_reset
