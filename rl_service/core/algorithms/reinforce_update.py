"""REINFORCE: Monte-Carlo policy gradient over complete episodes.

Returns are discounted per episode and normalised within each episode (zero mean, unit variance), the loss is
`-mean(log_prob * normalised_return) - beta * mean(entropy)`, and Adam takes one step per update. Used both by
managed runs (rl_service.core.algorithms.reinforce) and by named policies fed with client experience.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rl_service.core.algorithms.networks import PolicyNet, action_distribution
from rl_service.core.errors import NonFiniteUpdate

RETURN_EPS = 1e-8


@dataclass(frozen=True)
class Episode:
    """One complete episode: observations (T, obs_dim), actions (T,) or (T, act_dim), rewards (T,)."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


@dataclass(frozen=True)
class UpdateStats:
    """What one update did."""

    loss: float
    policy_loss: float
    entropy: float
    episodes: int
    steps: int
    mean_return: float  # undiscounted episode return, averaged over the batch's episodes
    grad_norm: float
    # PPO's (ppo_update.py); None for REINFORCE.
    value_loss: float | None = None
    approx_kl: float | None = None
    clip_fraction: float | None = None
    explained_variance: float | None = None


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = r_t + gamma * G_{t+1}, computed backwards in float64."""
    returns = np.empty(len(rewards), dtype=np.float64)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = float(rewards[t]) + gamma * running
        returns[t] = running
    return returns


def normalized_returns(returns: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance within one episode (all zeros for a one-step episode)."""
    centred = returns - returns.mean()
    normalized: np.ndarray = centred / (returns.std() + RETURN_EPS)
    return normalized


def reinforce_update(net: PolicyNet, optimizer: torch.optim.Optimizer, episodes: Sequence[Episode], gamma: float,
                     beta: float, max_grad_norm: float | None = None) -> UpdateStats:
    """One gradient step on a batch of complete episodes; on a non-finite loss or gradient nothing changes."""
    if not episodes:
        raise ValueError("reinforce_update needs at least one complete episode")
    obs = torch.as_tensor(np.concatenate([e.observations for e in episodes]), dtype=torch.float32)
    actions = torch.as_tensor(np.concatenate([e.actions for e in episodes]))
    advantages = torch.as_tensor(
        np.concatenate([normalized_returns(discounted_returns(e.rewards, gamma)) for e in episodes]),
        dtype=torch.float32)
    distribution = action_distribution(net, obs)
    log_prob = distribution.log_prob(actions)
    entropy = distribution.entropy().mean()
    policy_loss = -(log_prob * advantages).mean()
    loss = policy_loss - beta * entropy
    if not torch.isfinite(loss):
        raise NonFiniteUpdate(f"batch: the REINFORCE loss is {loss.item()} (policy loss {policy_loss.item()}, "
                              f"entropy {entropy.item()}); the update was discarded; {NonFiniteUpdate.HINT}")
    optimizer.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else math.inf))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad()
        raise NonFiniteUpdate(f"batch: the REINFORCE gradient norm is {grad_norm}; the update was discarded; "
                              f"{NonFiniteUpdate.HINT}")
    optimizer.step()
    return UpdateStats(
        loss=float(loss.item()),
        policy_loss=float(policy_loss.item()),
        entropy=float(entropy.item()),
        episodes=len(episodes),
        steps=int(obs.shape[0]),
        mean_return=float(np.mean([e.rewards.sum() for e in episodes])),
        grad_norm=grad_norm,
    )
