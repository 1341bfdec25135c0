"""Policy networks for REINFORCE: small MLPs that TorchScript can compile.

A categorical network maps observations to action probabilities; a Gaussian network maps them to the mean and
standard deviation of a diagonal Gaussian. `forward` is what an exported TorchScript module computes, so a
consumer without rl_service gets the same probabilities (or mean and std) that training used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal


def mlp(in_dim: int, hidden: Sequence[int], activation: type[nn.Module]) -> tuple[nn.Sequential, int]:
    """Hidden layers and the width of the last one."""
    layers: list[nn.Module] = []
    width = in_dim
    for size in hidden:
        layers += [nn.Linear(width, size), activation()]
        width = size
    return nn.Sequential(*layers), width


class CategoricalPolicyNet(nn.Module):
    """Observations (batch, obs_dim) -> action probabilities (batch, n_actions)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: Sequence[int], activation: type[nn.Module]) -> None:
        super().__init__()
        self.body, width = mlp(obs_dim, hidden, activation)
        self.head = nn.Linear(width, n_actions)

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-probabilities."""
        out: torch.Tensor = self.head(self.body(obs))
        return out

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Action probabilities."""
        return torch.softmax(self.logits(obs), dim=-1)


class GaussianPolicyNet(nn.Module):
    """Observations (batch, obs_dim) -> (mean, std), each (batch, act_dim), of a diagonal Gaussian."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: type[nn.Module],
                 log_std_init: float = 0.0) -> None:
        super().__init__()
        self.body, width = mlp(obs_dim, hidden, activation)
        self.head = nn.Linear(width, act_dim)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std_init)))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation."""
        mean = self.head(self.body(obs))
        return mean, self.log_std.exp().expand_as(mean)


PolicyNet = CategoricalPolicyNet | GaussianPolicyNet


def build_policy_net(obs_dim: int, action_space: gym.Space[Any], hidden: Sequence[int],
                     activation: type[nn.Module] = nn.Tanh, log_std_init: float = 0.0) -> PolicyNet:
    """The network for a Discrete (categorical) or Box (diagonal Gaussian) action space."""
    if isinstance(action_space, gym.spaces.Discrete):
        return CategoricalPolicyNet(obs_dim, int(action_space.n), hidden, activation)
    if isinstance(action_space, gym.spaces.Box):
        return GaussianPolicyNet(obs_dim, int(np.prod(action_space.shape)), hidden, activation, log_std_init)
    raise TypeError(f"REINFORCE supports Discrete and Box action spaces, not {type(action_space).__name__}")


def action_distribution(net: PolicyNet, obs: torch.Tensor) -> Distribution:
    """The policy's action distribution for a batch of observations."""
    if isinstance(net, CategoricalPolicyNet):
        return Categorical(logits=net.logits(obs))
    mean, std = net(obs)
    return Independent(Normal(mean, std), 1)


def greedy_actions(net: PolicyNet, obs: torch.Tensor) -> torch.Tensor:
    """The most likely action: argmax for categorical, the mean for Gaussian."""
    if isinstance(net, CategoricalPolicyNet):
        greedy: torch.Tensor = net.logits(obs).argmax(dim=-1)
        return greedy
    mean: torch.Tensor = net(obs)[0]
    return mean
