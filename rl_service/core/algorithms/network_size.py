"""How many parameters a network will have, computed from the spaces and net_arch before anything is built.

One request must not claim gigabytes: a 1,000,000-value observation into a 4096-wide first layer is four billion
weights. Runs and named policies check this count against MAX_NETWORK_PARAMETERS before building a network.
The counts follow what stable-baselines3's MlpPolicy builds (a flattening or one-hot feature extractor, then the
MLPs and heads), and the service's own REINFORCE and named-policy networks (core.algorithms.networks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym

from rl_service.core.errors import InvalidHyperparameter, UnsupportedSpace

# Algorithms whose network is one Q-network (its target is a copy): outputs per action by default.
Q_NETWORK_OUTPUTS = {"DQN": 1, "QRDQN": 200}  # QR-DQN: n_quantiles per action (sb3-contrib default: 200)
SINGLE_POLICY = frozenset({"REINFORCE"})  # one policy network, no critic
# Off-policy actor-critics: (critics, outputs per critic); each critic reads observation features and the action.
# SAC and TQC actors have a mean and a log-std head; TQC's critics output n_quantiles (25 by default) each.
OFF_POLICY_CRITICS = {"SAC": (2, 1), "TD3": (2, 1), "DDPG": (1, 1), "TQC": (2, 25)}
SQUASHED_GAUSSIAN = frozenset({"SAC", "TQC"})
MINIMAL_ARCH = (1,)


def mlp_parameters(in_dim: int, hidden: Sequence[int], out_dim: int) -> int:
    """Weights and biases of Linear layers in_dim -> hidden... -> out_dim."""
    total, width = 0, in_dim
    for size in (*hidden, out_dim):
        total += width * size + size
        width = size
    return total


def features_size(space: gym.Space[Any]) -> int:
    """The width of SB3's preprocessed observation: flattened Box/MultiBinary, one-hot Discrete/MultiDiscrete."""
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return int(space.nvec.sum())
    return int(math.prod(space.shape or (1,)))


def action_outputs(space: gym.Space[Any]) -> int:
    """The width of the action head: logits per choice, or one mean per Box dimension (features_size's rule)."""
    return features_size(space)


def run_network_parameters(algorithm: str, observation_space: gym.Space[Any], action_space: gym.Space[Any],
                           net_arch: Sequence[int], policy_options: Mapping[str, Any] | None = None) -> int:
    """Parameters of a run's policy: actor and critic for actor-critic algorithms (any algorithm not listed).

    policy_options: the run's n_quantiles and n_critics where its algorithm has them (else the defaults above).
    """
    options = policy_options or {}
    features, actions = features_size(observation_space), action_outputs(action_space)
    name = algorithm.upper()
    if name in Q_NETWORK_OUTPUTS:
        per_action = int(options.get("n_quantiles") or Q_NETWORK_OUTPUTS[name]) if name == "QRDQN" else 1
        return mlp_parameters(features, net_arch, actions * per_action)
    if name in OFF_POLICY_CRITICS:
        critics, outputs = OFF_POLICY_CRITICS[name]
        if name == "TQC":
            critics = int(options.get("n_critics") or critics)
            outputs = int(options.get("n_quantiles") or outputs)
        heads = 2 * actions if name in SQUASHED_GAUSSIAN else actions
        actor = mlp_parameters(features, net_arch, heads)
        return actor + critics * mlp_parameters(features + actions, net_arch, outputs)
    log_std = actions if isinstance(action_space, gym.spaces.Box) else 0
    actor = mlp_parameters(features, net_arch, actions) + log_std
    if name in SINGLE_POLICY:
        return actor
    return actor + mlp_parameters(features, net_arch, 1)


def check_run_network(algorithm: str, observation_space: gym.Space[Any], action_space: gym.Space[Any],
                      net_arch: Sequence[int], cap: int, policy_options: Mapping[str, Any] | None = None) -> None:
    """Refuse a run whose policy would pass MAX_NETWORK_PARAMETERS, naming net_arch (or env_id when even one
    hidden unit is too many)."""
    count = run_network_parameters(algorithm, observation_space, action_space, net_arch, policy_options)
    if count <= cap:
        return
    smallest = run_network_parameters(algorithm, observation_space, action_space, MINIMAL_ARCH, policy_options)
    if smallest > cap:
        raise UnsupportedSpace(
            f"env_id: this environment's spaces ({features_size(observation_space)} observation features, "
            f"{action_outputs(action_space)} action outputs) need {smallest:,} parameters even with net_arch 1, "
            f"over this server's cap of {cap:,} (MAX_NETWORK_PARAMETERS)", field="env_id")
    raise InvalidHyperparameter(
        f"hyperparameters['net_arch']: {','.join(map(str, net_arch))} makes a {algorithm} network of {count:,} "
        f"parameters for this environment, over this server's cap of {cap:,} (MAX_NETWORK_PARAMETERS); use "
        "narrower or fewer layers", field="hyperparameters.net_arch")
