"""Evaluations (hyperparameter eval_freq): deterministic episodes on a separate environment instance, seeded from
the run's seed the same way every time, so successive evaluations differ only in the policy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import VecEnv

from rl_service.core.algorithms.masking import get_action_masks
from rl_service.core.runs.records import Evaluation
from rl_service.core.seeds import MAX_SEED

# Steps one evaluation may take at most (an environment whose episodes never end must not stall the run).
MAX_EVALUATION_STEPS = 1_000_000
_EVAL_SEED_OFFSET = 1_000_003  # a prime: the eval stream never starts where attempt seeds (seed + timesteps) do


def evaluation_seed(seed: int) -> int:
    """The evaluation environment's seed for a run seeded `seed`."""
    return (seed + _EVAL_SEED_OFFSET) % (MAX_SEED + 1)


def evaluate(model: Any, env: VecEnv, episodes: int, seed: int, timesteps: int, use_masks: bool) -> Evaluation | None:
    """Mean and std of the raw returns of `episodes` deterministic episodes (None when none finished in time).

    With several envs each finishes its share of the episodes (stable-baselines3's evaluate_policy split), so the
    short episodes of one env do not crowd out the others. Rewards are summed here, as `env` returns them: the
    caller's evaluation env never normalises rewards.
    """
    count = env.num_envs
    targets = np.array([(episodes + i) // count for i in range(count)])
    done_per_env = np.zeros(count, dtype=int)
    running = np.zeros(count)
    lengths_now = np.zeros(count, dtype=int)
    returns: list[float] = []
    lengths: list[int] = []
    env.seed(seed)
    obs = env.reset()
    state = None
    starts = np.ones(count, dtype=bool)
    for _ in range(math.ceil(MAX_EVALUATION_STEPS / count)):
        if np.all(done_per_env >= targets):
            break
        kwargs = {"action_masks": get_action_masks(env)} if use_masks else {}
        actions, state = model.predict(obs, state=state, episode_start=starts, deterministic=True, **kwargs)
        obs, rewards, dones, _ = env.step(actions)
        running += rewards
        lengths_now += 1
        for i in np.flatnonzero(dones):
            if done_per_env[i] < targets[i]:
                returns.append(float(running[i]))
                lengths.append(int(lengths_now[i]))
                done_per_env[i] += 1
            running[i] = 0.0
            lengths_now[i] = 0
        starts = dones
    if not returns:
        return None
    return Evaluation(mean_reward=float(np.mean(returns)), std_reward=float(np.std(returns)), timesteps=timesteps,
                      episodes=len(returns), mean_length=float(np.mean(lengths)))
