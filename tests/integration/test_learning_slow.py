"""Learning quality through the service (slow: real budgets). Run with `bash scripts/test.sh -m slow`."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import ServerHandle

# rl-baselines3-zoo's hyperparams/ppo.yml entry for CartPole-v1 (1e5 timesteps).
ZOO_PPO_CARTPOLE = {
    "n_envs": "8", "n_steps": "32", "batch_size": "256", "gae_lambda": "0.8", "gamma": "0.98",
    "n_epochs": "20", "ent_coef": "0.0", "learning_rate": "lin_0.001", "clip_range": "lin_0.2",
}


def evaluate_through_act(server: ServerHandle, run_id: str, episodes: int = 10, seed: int = 1000) -> list[float]:
    """Deterministic episodes on a local CartPole, every action asked of the service's Act."""
    env = gym.make("CartPole-v1")
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            reply = server.stub.Act(pb.ActRequest(run_id=run_id, observation=obs.tolist(), deterministic=True))
            obs, reward, terminated, truncated, _ = env.step(int(reply.action[0]))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


@pytest.mark.slow
def test_ppo_with_zoo_settings_solves_cartpole(server: ServerHandle) -> None:
    run_id = server.start("PPO", total_timesteps=100_000, seed=0, hyperparameters=ZOO_PPO_CARTPOLE,
                          checkpoint_interval=25_000)
    final = server.watch_to_end(run_id, timeout=1800)[-1]
    assert final.state == pb.SUCCEEDED, final.error
    returns = evaluate_through_act(server, run_id)
    print(f"PPO zoo CartPole-v1 100k: mean {np.mean(returns):.1f} over {len(returns)} deterministic episodes "
          f"({final.metrics.steps_per_second:.0f} steps/s)")
    assert float(np.mean(returns)) >= 475, returns
