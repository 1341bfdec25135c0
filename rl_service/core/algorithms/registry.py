"""The algorithm registry: name -> AlgorithmSpec (class, hyperparameter schema, supported action spaces).

Adding an algorithm is one entry in ALGORITHMS plus its schema; transport never changes. Every class in the
registry meets stable-baselines3's BaseAlgorithm interface: `cls(policy, env, **kwargs)`, `learn`, `predict`,
`save`, and the classmethod `load`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import torch
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.utils import LinearSchedule as SB3LinearSchedule

from rl_service.core.algorithms.hyperparams import HyperValue, LinearSchedule, Param, Schema, merge
from rl_service.core.algorithms.reinforce import Reinforce
from rl_service.core.errors import InvalidHyperparameter, UnknownAlgorithm, UnsupportedSpace, quoted

ACTIVATIONS: dict[str, type[torch.nn.Module]] = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}

# Keys every algorithm accepts: how the environment is vectorised and the policy network's shape.
COMMON = (
    Param("n_envs", "int", 1, 1, 64, help="parallel environments stepped together"),
    Param("net_arch", "net_arch", (64, 64), help="hidden layer widths of the policy (and value) network"),
    Param("activation_fn", "choice", "tanh", choices=("tanh", "relu"), help="hidden layer activation"),
)

# Keys PPO and A2C share (on-policy actor-critic), with stable-baselines3's defaults.
ON_POLICY = (
    Param("gamma", "float", 0.99, 0.0, 1.0, help="discount factor"),
    Param("gae_lambda", "float", 0.95, 0.0, 1.0, help="GAE bias/variance trade-off"),
    Param("ent_coef", "float", 0.0, 0.0, 10.0, help="entropy bonus weight"),
    Param("vf_coef", "float", 0.5, 0.0, 10.0, help="value loss weight"),
    Param("max_grad_norm", "float", 0.5, 0.0, 1e6, low_exclusive=True, help="gradient clipping norm"),
    Param("use_sde", "bool", False, help="generalised state-dependent exploration (Box actions only)"),
    Param("sde_sample_freq", "int", -1, -1, 1_000_000, help="resample the SDE noise every n steps (-1: per rollout)"),
)

PPO_SCHEMA = merge(
    COMMON,
    ON_POLICY,
    (
        Param("learning_rate", "float", 3e-4, 0.0, 1.0, low_exclusive=True, schedule=True, help="Adam step size"),
        Param("n_steps", "int", 2048, 1, 1_000_000, help="steps per env per rollout"),
        Param("batch_size", "int", 64, 2, 1_000_000, help="minibatch size"),
        Param("n_epochs", "int", 10, 1, 1000, help="optimisation epochs per rollout"),
        Param("clip_range", "float", 0.2, 0.0, 10.0, low_exclusive=True, schedule=True, help="policy clip range"),
        Param("clip_range_vf", "float", None, 0.0, 1e6, low_exclusive=True, schedule=True, optional=True,
              help="value clip range (none: no clipping)"),
        Param("normalize_advantage", "bool", True, help="normalise advantages per minibatch"),
        Param("target_kl", "float", None, 0.0, 10.0, low_exclusive=True, optional=True,
              help="stop an update's epochs early past this KL (none: never)"),
    ),
)

A2C_SCHEMA = merge(
    COMMON,
    ON_POLICY,
    (
        Param("learning_rate", "float", 7e-4, 0.0, 1.0, low_exclusive=True, schedule=True, help="optimiser step size"),
        Param("n_steps", "int", 5, 1, 1_000_000, help="steps per env per update"),
        Param("gae_lambda", "float", 1.0, 0.0, 1.0, help="GAE bias/variance trade-off"),
        Param("rms_prop_eps", "float", 1e-5, 0.0, 1.0, low_exclusive=True, help="RMSprop epsilon"),
        Param("use_rms_prop", "bool", True, help="RMSprop (true) or Adam (false)"),
        Param("normalize_advantage", "bool", False, help="normalise advantages"),
    ),
)

DQN_SCHEMA = merge(
    COMMON,
    (
        # stable-baselines3's QNetwork uses ReLU; its actor-critic policies use Tanh.
        Param("activation_fn", "choice", "relu", choices=("tanh", "relu"), help="hidden layer activation"),
        Param("learning_rate", "float", 1e-4, 0.0, 1.0, low_exclusive=True, schedule=True, help="Adam step size"),
        # 50k rather than stable-baselines3's 1M: a replay buffer is allocated up front, and 1M transitions of a
        # large observation would take gigabytes the user did not ask for.
        Param("buffer_size", "int", 50_000, 1, 5_000_000, help="replay buffer capacity (transitions)"),
        Param("learning_starts", "int", 100, 0, 100_000_000, help="steps collected before learning starts"),
        Param("batch_size", "int", 32, 1, 1_000_000, help="minibatch size"),
        Param("tau", "float", 1.0, 0.0, 1.0, low_exclusive=True, help="target network soft-update coefficient"),
        Param("gamma", "float", 0.99, 0.0, 1.0, help="discount factor"),
        Param("train_freq", "int", 4, 1, 1_000_000, help="env steps between updates"),
        Param("gradient_steps", "int", 1, -1, 10_000,
              help="gradient steps per update (-1: as many as env steps; 0 is refused)"),
        Param("target_update_interval", "int", 10_000, 1, 100_000_000, help="env steps between target updates"),
        Param("exploration_fraction", "float", 0.1, 0.0, 1.0, help="fraction of training over which epsilon decays"),
        Param("exploration_initial_eps", "float", 1.0, 0.0, 1.0, help="initial epsilon"),
        Param("exploration_final_eps", "float", 0.05, 0.0, 1.0, help="final epsilon"),
        Param("max_grad_norm", "float", 10.0, 0.0, 1e6, low_exclusive=True, help="gradient clipping norm"),
    ),
)

REINFORCE_SCHEMA = merge(
    COMMON,
    (
        Param("learning_rate", "float", 1e-3, 0.0, 1.0, low_exclusive=True, schedule=True, help="Adam step size"),
        Param("gamma", "float", 0.99, 0.0, 1.0, help="discount factor of the Monte-Carlo returns"),
        Param("beta", "float", 0.1, 0.0, 10.0, help="entropy bonus weight"),
        Param("episodes_per_update", "int", 1, 1, 10_000, help="complete episodes per gradient step"),
        Param("max_grad_norm", "float", None, 0.0, 1e6, low_exclusive=True, optional=True,
              help="gradient clipping norm (none: no clipping)"),
        Param("net_arch", "net_arch", (64, 64), help="hidden layer widths of the policy network"),
    ),
)

# Keys consumed by the service itself rather than passed to the algorithm's constructor.
SERVICE_KEYS = frozenset({"n_envs", "net_arch", "activation_fn"})


@dataclass(frozen=True)
class AlgorithmSpec:
    """One registry entry."""

    name: str
    cls: type[Any]
    schema: Schema
    action_spaces: tuple[type[gym.Space[Any]], ...]
    # Cross-field checks on the parsed values; raises InvalidHyperparameter.
    validate: Callable[[Mapping[str, HyperValue]], None] = lambda values: None

    def constructor_kwargs(self, values: Mapping[str, HyperValue]) -> dict[str, Any]:
        """Parsed values turned into the class's keyword arguments (schedules, policy_kwargs)."""
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in SERVICE_KEYS:
                continue
            kwargs[key] = to_sb3_value(value)
        net_arch = values.get("net_arch")
        activation = str(values.get("activation_fn") or "tanh")
        layers = list(net_arch) if isinstance(net_arch, tuple) else [64, 64]
        kwargs["policy_kwargs"] = {"net_arch": layers, "activation_fn": ACTIVATIONS[activation]}
        return kwargs

    def check_spaces(self, action_space: gym.Space[Any], values: Mapping[str, HyperValue]) -> None:
        """Raise UnsupportedSpace when this algorithm (so configured) cannot act in the action space."""
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


def _check_dqn(values: Mapping[str, HyperValue]) -> None:
    if values["gradient_steps"] == 0:
        raise InvalidHyperparameter(
            "hyperparameters['gradient_steps']: 0 would never train; use -1 or a positive count",
            field="hyperparameters.gradient_steps")


def _check_ppo(values: Mapping[str, HyperValue]) -> None:
    _check_on_policy(values)
    rollout = int(values["n_envs"]) * int(values["n_steps"])  # type: ignore[arg-type]
    batch = int(values["batch_size"])  # type: ignore[arg-type]
    if batch > rollout:
        raise InvalidHyperparameter(
            f"hyperparameters['batch_size']: {batch} is larger than one rollout "
            f"(n_steps * n_envs = {rollout}); use at most {rollout}",
            field="hyperparameters.batch_size",
        )


_ALL_ACTIONS: tuple[type[gym.Space[Any]], ...] = (
    gym.spaces.Box,
    gym.spaces.Discrete,
    gym.spaces.MultiDiscrete,
    gym.spaces.MultiBinary,
)

ALGORITHMS: dict[str, AlgorithmSpec] = {
    "ppo": AlgorithmSpec("PPO", PPO, PPO_SCHEMA, _ALL_ACTIONS, _check_ppo),
    "a2c": AlgorithmSpec("A2C", A2C, A2C_SCHEMA, _ALL_ACTIONS, _check_on_policy),
    "dqn": AlgorithmSpec("DQN", DQN, DQN_SCHEMA, (gym.spaces.Discrete,), _check_dqn),
    "reinforce": AlgorithmSpec("REINFORCE", Reinforce, REINFORCE_SCHEMA, (gym.spaces.Discrete, gym.spaces.Box)),
}


def get_algorithm(name: str) -> AlgorithmSpec:
    """Look an algorithm up case-insensitively; a miss lists the valid names."""
    spec = ALGORITHMS.get(name.strip().lower())
    if spec is None:
        valid = ", ".join(s.name for s in ALGORITHMS.values())
        raise UnknownAlgorithm(
            f"algorithm: unknown algorithm {quoted(name)}; choose one of {valid}", field="algorithm"
        )
    return spec
