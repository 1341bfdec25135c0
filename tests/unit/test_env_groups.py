"""env_groups: double-buffered rollouts equal lockstep ones bit for bit (PPO on Discrete and Box actions, A2C, TRPO
with gSDE, MaskablePPO with masks), nothing is in flight when train() runs, and what cannot be grouped is refused."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from sb3_contrib import TRPO, MaskablePPO
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor, VecNormalize

from rl_service.core.algorithms.env_groups import use_env_groups
from rl_service.infra.external_env.adapter import FakeExternalEnvAdapter, StepResult
from rl_service.infra.external_env.vec_env import ExternalVecEnv
from tests.support.envs import MASKED_ENV_ID

BUFFER_FIELDS = ("observations", "actions", "rewards", "episode_starts", "values", "log_probs", "advantages",
                 "returns")


class InFlightWatcher(FakeExternalEnvAdapter):
    """A fake simulation that records, at each step sent, how many steps were already in flight."""

    def __init__(self, env_id: str, num_envs: int) -> None:
        super().__init__([lambda: gym.make(env_id) for _ in range(num_envs)], name=env_id)
        self.outstanding = 0
        self.max_outstanding = 0
        self.subset_steps = 0

    def send_step(self, actions: np.ndarray, env_ids: Any = None) -> None:
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        self.subset_steps += env_ids is not None
        super().send_step(actions, env_ids)

    def receive_step(self) -> StepResult:
        self.outstanding -= 1
        return super().receive_step()


class Recorder(BaseCallback):
    """Copies every rollout buffer when filled, and checks that nothing is in flight when training starts."""

    def __init__(self, adapter: InFlightWatcher) -> None:
        super().__init__()
        self.adapter = adapter
        self.rollouts: list[dict[str, np.ndarray]] = []
        self.steps_seen = 0

    def _on_step(self) -> bool:
        self.steps_seen += 1
        return True

    def _on_rollout_end(self) -> None:
        buffer = self.model.rollout_buffer
        names = BUFFER_FIELDS + (("action_masks",) if hasattr(buffer, "action_masks") else ())
        self.rollouts.append({name: np.array(getattr(buffer, name), copy=True) for name in names})
        # on_rollout_end is the last thing before train(): nothing may be in flight (train() would be off-policy).
        assert self.adapter.outstanding == 0


def run(cls: type[Any], env_id: str, groups: int, n_envs: int = 8, rollouts: int = 3, normalize: bool = False,
        **kwargs: Any) -> tuple[Recorder, Any, InFlightWatcher]:
    """Train `rollouts` rollouts with a fixed seed; the recorder holds every rollout buffer."""
    th.set_num_threads(1)
    adapter = InFlightWatcher(env_id, n_envs)
    env: Any = VecMonitor(ExternalVecEnv(adapter))
    if normalize:
        env = VecNormalize(env, norm_obs=False, norm_reward=True)
    env.seed(7)
    model = cls("MlpPolicy", env, seed=3, device="cpu", **kwargs)
    use_env_groups(model, groups)
    recorder = Recorder(adapter)
    model.learn(total_timesteps=rollouts * n_envs * model.n_steps, callback=recorder)
    return recorder, model, adapter


def assert_same_runs(cls: type[Any], env_id: str, n_envs: int = 8, **kwargs: Any) -> InFlightWatcher:
    lockstep, lock_model, _ = run(cls, env_id, 1, n_envs, **kwargs)
    grouped, group_model, adapter = run(cls, env_id, 2, n_envs, **kwargs)
    assert adapter.subset_steps > 0 and adapter.max_outstanding == 2, "both groups were in flight"
    assert len(grouped.rollouts) == len(lockstep.rollouts) == 3
    assert grouped.steps_seen == lockstep.steps_seen, "callbacks run once per vector step"
    for index, (ours, theirs) in enumerate(zip(grouped.rollouts, lockstep.rollouts, strict=True)):
        for name, expected in theirs.items():
            np.testing.assert_array_equal(ours[name], expected, err_msg=f"rollout {index}: {name}")
    for (name, ours), (_, theirs) in zip(group_model.policy.state_dict().items(),
                                         lock_model.policy.state_dict().items(), strict=True):
        assert th.equal(ours, theirs), f"trained weights differ: {name}"
    assert group_model.num_timesteps == lock_model.num_timesteps
    return adapter


def test_ppo_discrete_rollouts_equal_lockstep() -> None:
    assert_same_runs(PPO, "CartPole-v1", n_steps=32, batch_size=64, n_epochs=2)


def test_ppo_box_rollouts_equal_lockstep_with_timeouts_bootstrapped() -> None:
    # Pendulum ends every episode by truncation at 200 steps: the final observations' values are bootstrapped.
    assert_same_runs(PPO, "Pendulum-v1", n_steps=64, batch_size=64, n_epochs=1)


def test_ppo_box_with_odd_group_sizes() -> None:
    # 3 + 3 rows: forward passes over 3 rows round differently from 6 (why every forward takes all the rows).
    assert_same_runs(PPO, "Pendulum-v1", n_envs=6, n_steps=40, batch_size=48, n_epochs=1)


def test_a2c_with_reward_normalisation() -> None:
    assert_same_runs(A2C, "CartPole-v1", n_steps=5, normalize=True)


def test_trpo_with_gsde_noise_resampled_mid_rollout() -> None:
    assert_same_runs(TRPO, "Pendulum-v1", n_steps=32, batch_size=64, use_sde=True, sde_sample_freq=4,
                     n_critic_updates=2)


def test_maskable_ppo_rollouts_and_masks_equal_lockstep() -> None:
    assert_same_runs(MaskablePPO, MASKED_ENV_ID, n_steps=32, batch_size=64, n_epochs=2)


def test_the_masks_were_not_trivial() -> None:
    recorder, _, _ = run(MaskablePPO, MASKED_ENV_ID, 2, rollouts=1, n_steps=16, batch_size=64, n_epochs=1)
    masks = recorder.rollouts[0]["action_masks"]
    assert masks.shape == (16, 8, 8) and (masks.sum(axis=-1) == 2).all(), "two legal actions per step"


class StopAfter(BaseCallback):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def _on_step(self) -> bool:
        return self.n_calls < self.steps


def test_a_stop_mid_rollout_leaves_nothing_in_flight() -> None:
    adapter = InFlightWatcher("CartPole-v1", 4)
    env = ExternalVecEnv(adapter)
    model = PPO("MlpPolicy", env, seed=1, n_steps=16, batch_size=32, n_epochs=1, device="cpu")
    use_env_groups(model, 2)
    model.learn(total_timesteps=1000, callback=StopAfter(5))
    assert model.num_timesteps == 5 * 4
    assert adapter.outstanding == 0 and env.groups_in_flight == 0
    env.reset()  # usable again: no half-assembled vector step left


def test_saved_models_hold_no_trace_of_the_collector(tmp_path: Any) -> None:
    _, model, _ = run(PPO, "CartPole-v1", 2, n_envs=4, rollouts=1, n_steps=16, batch_size=32, n_epochs=1)
    model.save(tmp_path / "model.zip")
    loaded = PPO.load(tmp_path / "model.zip", device="cpu")
    assert "collect_rollouts" not in loaded.__dict__
    use_env_groups(model, 1)
    assert "collect_rollouts" not in model.__dict__, "env_groups 1 restores stable-baselines3's own collector"


@pytest.mark.parametrize(("make_env", "message"), [
    (lambda: DummyVecEnv([lambda: gym.make("CartPole-v1")] * 2), "cannot step a subset"),
    (lambda: ExternalVecEnv(FakeExternalEnvAdapter.from_gym_id("CartPole-v1", 2, env_subsets=False)),
     "cannot step a subset"),
    (lambda: ExternalVecEnv(FakeExternalEnvAdapter.from_gym_id("CartPole-v1", 3)), "do not split evenly"),
    (lambda: VecNormalize(ExternalVecEnv(FakeExternalEnvAdapter.from_gym_id("CartPole-v1", 2))),
     "observation normalisation"),
])
def test_what_cannot_be_grouped_is_refused(make_env: Any, message: str) -> None:
    model = PPO("MlpPolicy", make_env(), n_steps=8, batch_size=8, device="cpu")
    with pytest.raises(ValueError, match=message):
        use_env_groups(model, 2)


def test_off_policy_models_are_refused() -> None:
    model = DQN("MlpPolicy", ExternalVecEnv(FakeExternalEnvAdapter.from_gym_id("CartPole-v1", 2)), device="cpu")
    with pytest.raises(TypeError, match="on-policy"):
        use_env_groups(model, 2)  # type: ignore[arg-type]
