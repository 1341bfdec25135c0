"""The algorithm registry: name -> AlgorithmSpec (class, hyperparameter schema, supported action spaces).

Adding an algorithm is one entry in ALGORITHMS plus its schema (schemas.py); transport never changes. Every class
in the registry meets stable-baselines3's BaseAlgorithm interface: `cls(policy, env, **kwargs)`, `learn`,
`predict`, `save`, and the classmethod `load`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from sb3_contrib import QRDQN, TQC, TRPO, MaskablePPO
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3
from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise
from stable_baselines3.common.utils import LinearSchedule as SB3LinearSchedule

from rl_service.core.algorithms.hyperparams import HyperValue, LinearSchedule, Schema
from rl_service.core.algorithms.normalize import NormalizeOptions
from rl_service.core.algorithms.reinforce import Reinforce
from rl_service.core.algorithms.schemas import (
    A2C_SCHEMA,
    DDPG_SCHEMA,
    DQN_SCHEMA,
    MASKABLE_PPO_SCHEMA,
    POLICY_KEYS,
    PPO_SCHEMA,
    QRDQN_SCHEMA,
    REINFORCE_SCHEMA,
    SAC_SCHEMA,
    SERVICE_KEYS,
    TD3_SCHEMA,
    TQC_SCHEMA,
    TRPO_SCHEMA,
)
from rl_service.core.errors import InvalidHyperparameter, UnknownAlgorithm, UnsupportedSpace, quoted

__all__ = ["ACTIVATIONS", "ALGORITHMS", "POLICY_KEYS", "SERVICE_KEYS", "AlgorithmSpec", "get_algorithm", "to_sb3_value"]

ACTIVATIONS: dict[str, type[torch.nn.Module]] = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}


@dataclass(frozen=True)
class AlgorithmSpec:
    """One registry entry."""

    name: str
    cls: type[Any]
    schema: Schema
    action_spaces: tuple[type[gym.Space[Any]], ...]
    # Cross-field checks on the parsed values; raises InvalidHyperparameter.
    check: Callable[[Mapping[str, HyperValue]], None] = lambda values: None
    source: str = "stable-baselines3"
    # True when it acts only among the legal actions an environment's action_masks() lists (sb3-contrib's way).
    needs_action_masks: bool = False
    # True when it can keep two groups of a simulation's envs in flight (env_groups; core/algorithms/env_groups.py).
    env_groups: bool = False

    def validate(self, values: Mapping[str, HyperValue]) -> None:
        """Every cross-field check: the algorithm's own, then the evaluation keys every algorithm shares."""
        self.check(values)
        _check_evaluation(values)
        self.check_env_groups(values)

    def check_env_groups(self, values: Mapping[str, HyperValue]) -> None:
        """env_groups > 1 needs an algorithm that supports it and n_envs that split evenly into the groups."""
        groups = self.check_env_groups_supported(values)
        n_envs = int(values.get("n_envs") or 1)  # type: ignore[arg-type]
        if n_envs % groups:
            raise InvalidHyperparameter(
                f"hyperparameters['env_groups']: n_envs = {n_envs} does not split evenly into {groups} groups",
                field="hyperparameters.env_groups")

    def check_env_groups_supported(self, values: Mapping[str, HyperValue]) -> int:
        """The number of env groups asked; InvalidHyperparameter, listing those that can, for more than one group
        with an algorithm that steps in lockstep only."""
        groups = int(values.get("env_groups") or 1)  # type: ignore[arg-type]
        if groups > 1 and not self.env_groups:
            names = ", ".join(spec.name for spec in ALGORITHMS.values() if spec.env_groups)
            raise InvalidHyperparameter(
                f"hyperparameters['env_groups']: {self.name} steps its envs in lockstep; {groups} groups in flight "
                f"are supported by {names} only", field="hyperparameters.env_groups")
        return groups

    def constructor_kwargs(self, values: Mapping[str, HyperValue],
                           action_space: gym.Space[Any] | None = None) -> dict[str, Any]:
        """Parsed values turned into the class's keyword arguments (schedules, policy_kwargs, action noise).

        The action noise needs the action space's size; without one (a schema check) none is built.
        """
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in SERVICE_KEYS or key in POLICY_KEYS:
                continue
            kwargs[key] = to_sb3_value(value)
        net_arch = values.get("net_arch")
        activation = str(values.get("activation_fn") or "tanh")
        layers = list(net_arch) if isinstance(net_arch, tuple) else [64, 64]
        policy_kwargs: dict[str, Any] = {"net_arch": layers, "activation_fn": ACTIVATIONS[activation]}
        for key in sorted(POLICY_KEYS & values.keys()):
            if key == "log_std_init" and not isinstance(action_space, gym.spaces.Box | None):
                continue  # a discrete policy has no log-std to initialise
            policy_kwargs[key] = values[key]
        kwargs["policy_kwargs"] = policy_kwargs
        noise = values.get("action_noise")
        if noise not in (None, "none") and isinstance(action_space, gym.spaces.Box):
            std = float(values.get("action_noise_std") or 0.0)  # type: ignore[arg-type]
            size = int(np.prod(action_space.shape))
            noise_cls = NormalActionNoise if noise == "normal" else OrnsteinUhlenbeckActionNoise
            kwargs["action_noise"] = noise_cls(mean=np.zeros(size), sigma=std * np.ones(size))
        return kwargs

    def check_spaces(self, action_space: gym.Space[Any], values: Mapping[str, HyperValue],
                     observation_space: gym.Space[Any] | None = None) -> None:
        """Raise UnsupportedSpace when this algorithm (so configured) cannot act in the action space, or
        InvalidHyperparameter for a setting the spaces do not allow."""
        if not isinstance(action_space, self.action_spaces):
            accepted = ", ".join(s.__name__ for s in self.action_spaces)
            raise UnsupportedSpace(
                f"env_id: {self.name} cannot act in a {type(action_space).__name__} action space; "
                f"it supports {accepted}",
                field="env_id",
            )
        if values.get("use_sde") and not isinstance(action_space, gym.spaces.Box):
            raise InvalidHyperparameter(
                f"hyperparameters['use_sde']: state-dependent exploration needs a Box action space, "
                f"and this environment's is {type(action_space).__name__}",
                field="hyperparameters.use_sde",
            )
        options = values.get("normalize")
        if (isinstance(options, NormalizeOptions) and options.norm_obs and observation_space is not None
                and not isinstance(observation_space, gym.spaces.Box)):
            raise InvalidHyperparameter(
                f"hyperparameters['normalize']: observations can be normalised only in a Box observation space, "
                f"and this environment's is {type(observation_space).__name__}; use "
                '{"norm_obs": false} to normalise rewards only, or false',
                field="hyperparameters.normalize",
            )


def to_sb3_value(value: HyperValue) -> Any:
    """A parsed value in the form stable-baselines3 takes (a schedule becomes a callable it can save)."""
    if isinstance(value, LinearSchedule):
        return SB3LinearSchedule(start=value.start, end=0.0, end_fraction=1.0)
    if isinstance(value, tuple):
        return list(value)
    return value


# A rollout buffer is allocated up front: cap n_steps * n_envs so one request cannot claim gigabytes.
MAX_ROLLOUT = 1_000_000


def _check_on_policy(values: Mapping[str, HyperValue]) -> None:
    n_envs = int(values["n_envs"])  # type: ignore[arg-type]
    n_steps = int(values["n_steps"])  # type: ignore[arg-type]
    if n_envs * n_steps < 2:
        raise InvalidHyperparameter(
            "hyperparameters['n_steps']: n_steps * n_envs must be at least 2 (advantages need two samples)",
            field="hyperparameters.n_steps",
        )
    if n_envs * n_steps > MAX_ROLLOUT:
        raise InvalidHyperparameter(
            f"hyperparameters['n_steps']: n_steps * n_envs = {n_envs * n_steps} exceeds {MAX_ROLLOUT} "
            "transitions per rollout", field="hyperparameters.n_steps")


def _check_off_policy(values: Mapping[str, HyperValue]) -> None:
    if values["gradient_steps"] == 0:
        raise InvalidHyperparameter(
            "hyperparameters['gradient_steps']: 0 would never train; use -1 or a positive count",
            field="hyperparameters.gradient_steps")


def _check_quantile_critics(values: Mapping[str, HyperValue]) -> None:
    _check_off_policy(values)
    dropped, kept = values["top_quantiles_to_drop_per_net"], values["n_quantiles"]
    if dropped >= kept:  # type: ignore[operator]
        raise InvalidHyperparameter(
            f"hyperparameters['top_quantiles_to_drop_per_net']: {dropped} would drop every one of a critic's "
            f"n_quantiles = {kept}; use fewer than n_quantiles", field="hyperparameters.top_quantiles_to_drop_per_net")


def _check_minibatches(values: Mapping[str, HyperValue]) -> None:
    _check_on_policy(values)
    rollout = int(values["n_envs"]) * int(values["n_steps"])  # type: ignore[arg-type]
    batch = int(values["batch_size"])  # type: ignore[arg-type]
    if batch > rollout:
        raise InvalidHyperparameter(
            f"hyperparameters['batch_size']: {batch} is larger than one rollout "
            f"(n_steps * n_envs = {rollout}); use at most {rollout}",
            field="hyperparameters.batch_size",
        )


def _check_evaluation(values: Mapping[str, HyperValue]) -> None:
    if values.get("stop_at_reward") is not None and not values.get("eval_freq"):
        raise InvalidHyperparameter(
            "hyperparameters['stop_at_reward']: it is checked against evaluations; set eval_freq too",
            field="hyperparameters.stop_at_reward")


_ALL_ACTIONS: tuple[type[gym.Space[Any]], ...] = (
    gym.spaces.Box,
    gym.spaces.Discrete,
    gym.spaces.MultiDiscrete,
    gym.spaces.MultiBinary,
)
_DISCRETE_ACTIONS = (gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)
_BOX = (gym.spaces.Box,)
_CONTRIB = "sb3-contrib"

ALGORITHMS: dict[str, AlgorithmSpec] = {
    "ppo": AlgorithmSpec("PPO", PPO, PPO_SCHEMA, _ALL_ACTIONS, _check_minibatches, env_groups=True),
    "a2c": AlgorithmSpec("A2C", A2C, A2C_SCHEMA, _ALL_ACTIONS, _check_on_policy, env_groups=True),
    "dqn": AlgorithmSpec("DQN", DQN, DQN_SCHEMA, (gym.spaces.Discrete,), _check_off_policy),
    "sac": AlgorithmSpec("SAC", SAC, SAC_SCHEMA, _BOX, _check_off_policy),
    "td3": AlgorithmSpec("TD3", TD3, TD3_SCHEMA, _BOX, _check_off_policy),
    "ddpg": AlgorithmSpec("DDPG", DDPG, DDPG_SCHEMA, _BOX, _check_off_policy),
    "tqc": AlgorithmSpec("TQC", TQC, TQC_SCHEMA, _BOX, _check_quantile_critics, _CONTRIB),
    "qrdqn": AlgorithmSpec("QRDQN", QRDQN, QRDQN_SCHEMA, (gym.spaces.Discrete,), _check_off_policy, _CONTRIB),
    "trpo": AlgorithmSpec("TRPO", TRPO, TRPO_SCHEMA, _ALL_ACTIONS, _check_minibatches, _CONTRIB, env_groups=True),
    "maskableppo": AlgorithmSpec("MaskablePPO", MaskablePPO, MASKABLE_PPO_SCHEMA, _DISCRETE_ACTIONS,
                                 _check_minibatches, _CONTRIB, needs_action_masks=True, env_groups=True),
    "reinforce": AlgorithmSpec("REINFORCE", Reinforce, REINFORCE_SCHEMA, (gym.spaces.Discrete, gym.spaces.Box),
                               source="rl_service"),
}


def get_algorithm(name: str) -> AlgorithmSpec:
    """Look an algorithm up case-insensitively (QR-DQN and Maskable-PPO spelt with or without the hyphen or an
    underscore); a miss lists the valid names."""
    spec = ALGORITHMS.get(name.strip().lower().replace("-", "").replace("_", ""))
    if spec is None:
        valid = ", ".join(s.name for s in ALGORITHMS.values())
        raise UnknownAlgorithm(
            f"algorithm: unknown algorithm {quoted(name)}; choose one of {valid}", field="algorithm"
        )
    return spec
