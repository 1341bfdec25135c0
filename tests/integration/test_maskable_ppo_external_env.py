"""sb3-contrib's MaskablePPO trains through the project's external VecEnv against a real reference env-server hosting
rl_service/MaskedChoice-v0 and never takes an illegal action; PPO, which ignores masks, takes many.

The server runs in this process, so each hosted env's own count of illegal actions is read directly; the client side
sees the same thing as rewards: an illegal action is the only way to get -1.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sb3_contrib import MaskablePPO
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback

from rl_service.envserver.reference_server import EnvServerHandle, serve_gym
from rl_service.infra.external_env.connector import GrpcExternalEnvironments
from tests.support.envs import MASKED_ENV_ID

NUM_ENVS = 4
STEPS = 512  # two rollouts of n_steps x NUM_ENVS
SMALL = {"n_steps": 64, "batch_size": 64, "n_epochs": 2, "seed": 3, "device": "cpu"}


class _RewardLog(BaseCallback):
    """Every reward the learner received, as the client saw it."""

    def __init__(self) -> None:
        super().__init__()
        self.rewards: list[float] = []

    def _on_step(self) -> bool:
        self.rewards.extend(np.asarray(self.locals["rewards"]).tolist())
        return True


@pytest.fixture
def masked_sim() -> Iterator[EnvServerHandle]:
    handle = serve_gym(MASKED_ENV_ID, NUM_ENVS)
    yield handle
    handle.stop()


def illegal_actions_taken(handle: EnvServerHandle) -> int:
    """The hosted envs' own count of illegal actions."""
    return sum(env.unwrapped.illegal_actions_taken for env in handle.servicer.batch.envs)


def learn(algorithm: type[BaseAlgorithm], handle: EnvServerHandle) -> tuple[BaseAlgorithm, list[float]]:
    env = GrpcExternalEnvironments().make_vec_env(handle.address, NUM_ENVS, seed=3)  # as a run's worker builds it
    log = _RewardLog()
    try:
        model = algorithm("MlpPolicy", env, **SMALL)
        model.learn(total_timesteps=STEPS, callback=log)
    finally:
        env.close()
    return model, log.rewards


def test_maskable_ppo_never_takes_an_illegal_action(masked_sim: EnvServerHandle) -> None:
    model, rewards = learn(MaskablePPO, masked_sim)
    assert model.num_timesteps == STEPS and len(rewards) == STEPS
    assert illegal_actions_taken(masked_sim) == 0
    assert min(rewards) > 0, "only an illegal action is rewarded -1"
    assert masked_sim.servicer.steps_served == STEPS // NUM_ENVS
    # Acting after training: predict() with the masks env_method("action_masks") answers picks legal actions.
    env = GrpcExternalEnvironments().make_vec_env(masked_sim.address, NUM_ENVS, seed=5)
    try:
        observations = env.reset()
        for _ in range(20):
            masks = env.env_method("action_masks")
            actions, _ = model.predict(observations, action_masks=np.stack(masks))
            assert all(mask[action] for mask, action in zip(masks, actions, strict=True))
            observations, _, _, _ = env.step(actions)
    finally:
        env.close()
    assert illegal_actions_taken(masked_sim) == 0


def test_ppo_without_masks_takes_illegal_actions(masked_sim: EnvServerHandle) -> None:
    # The control: the same simulation, the same masks on the wire, an algorithm that ignores them.
    _, rewards = learn(PPO, masked_sim)
    illegal = illegal_actions_taken(masked_sim)
    assert illegal > 0 and rewards.count(-1.0) == illegal

