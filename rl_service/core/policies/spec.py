"""A named policy's spec: what a client asks for (observation shape, action space, hyperparameters, seed),
validated into the spec the service keeps, and the network it builds."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from rl_service.core.algorithms.hyperparams import HyperValue, Param, Schema, format_value, merge
from rl_service.core.algorithms.network_size import mlp_parameters
from rl_service.core.algorithms.networks import PolicyNet, build_policy_net
from rl_service.core.algorithms.ppo_update import ValueNet, ppo_init
from rl_service.core.algorithms.registry import ACTIVATIONS
from rl_service.core.errors import InvalidHyperparameter, InvalidRequest, quoted
from rl_service.core.policies.experience import SpaceShape
from rl_service.core.seeds import seed_or_random

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_OBSERVATION_SIZE = 1_000_000
MAX_ACTION_SIZE = 10_000
MAX_SHAPE_DIMS = 8  # dimensions of an observation or a box action (an image stack needs 4)

NAMED_POLICY_SCHEMA = merge((
    Param("learning_rate", "float", 1e-3, 0.0, 1.0, low_exclusive=True, help="Adam step size"),
    Param("gamma", "float", 0.99, 0.0, 1.0, help="discount factor of the Monte-Carlo returns"),
    Param("beta", "float", 0.1, 0.0, 10.0, help="entropy bonus weight"),
    Param("net_arch", "net_arch", (64, 64), help="hidden layer widths"),
    Param("activation_fn", "choice", "tanh", choices=("tanh", "relu"), help="hidden layer activation"),
    Param("max_grad_norm", "float", None, 0.0, 1e6, low_exclusive=True, optional=True,
          help="gradient clipping norm (none: no clipping)"),
    Param("log_std_init", "float", 0.0, -20.0, 2.0, help="initial log standard deviation (Box actions)"),
))

# PPO's usual meanings, stable-baselines3's defaults (no schedules: a named policy has no end of training).
PPO_POLICY_SCHEMA = merge((
    Param("learning_rate", "float", 3e-4, 0.0, 1.0, low_exclusive=True, help="Adam step size (actor and critic)"),
    Param("n_epochs", "int", 10, 1, 1000, help="passes over each batch"),
    Param("batch_size", "int", 64, 1, 1_000_000, help="minibatch size"),
    Param("clip_range", "float", 0.2, 0.0, 10.0, low_exclusive=True, help="clipping of the probability ratio"),
    Param("gamma", "float", 0.99, 0.0, 1.0, help="discount factor"),
    Param("gae_lambda", "float", 0.95, 0.0, 1.0, help="GAE bias/variance trade-off"),
    Param("ent_coef", "float", 0.0, 0.0, 10.0, help="entropy bonus weight"),
    Param("vf_coef", "float", 0.5, 0.0, 100.0, help="value loss weight"),
    Param("max_grad_norm", "float", 0.5, 0.0, 1e6, low_exclusive=True, optional=True,
          help="gradient clipping norm (none: no clipping)"),
    Param("target_kl", "float", None, 0.0, 100.0, low_exclusive=True, optional=True,
          help="stop the epochs early once the approximate KL passes 1.5 x this (none: never)"),
    Param("normalize_advantage", "bool", True, help="normalise advantages within each minibatch"),
    Param("net_arch", "net_arch", (64, 64), help="hidden layer widths of the actor and of the critic"),
    Param("activation_fn", "choice", "tanh", choices=("tanh", "relu"), help="hidden layer activation"),
    Param("log_std_init", "float", 0.0, -20.0, 2.0, help="initial log standard deviation (Box actions)"),
))

# The learning algorithm of a named policy -> its hyperparameter schema.
POLICY_ALGORITHMS: dict[str, Schema] = {"reinforce": NAMED_POLICY_SCHEMA, "ppo": PPO_POLICY_SCHEMA}
DEFAULT_ALGORITHM = "reinforce"


def check_name(value: str, field_name: str) -> str:
    """A policy id or checkpoint name that is safe as a file name; InvalidRequest otherwise."""
    if not NAME_RE.fullmatch(value) or value in (".", ".."):
        raise InvalidRequest(
            f"{field_name}: {quoted(value)} is not a safe name; use 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit", field=field_name)
    return value


@dataclass(frozen=True)
class PolicySpecRequest:
    """A client's spec, before validation."""

    observation_shape: tuple[int, ...]
    discrete_actions: int | None = None
    box_shape: tuple[int, ...] = ()
    box_low: tuple[float, ...] = ()
    box_high: tuple[float, ...] = ()
    hyperparameters: Mapping[str, str] = field(default_factory=dict)
    seed: int | None = None
    algorithm: str = ""  # empty: DEFAULT_ALGORITHM


@dataclass(frozen=True)
class PolicySpec:
    """A validated spec with effective hyperparameters (defaults filled in) and the seed used."""

    observation_shape: tuple[int, ...]
    discrete_actions: int | None
    action_shape: tuple[int, ...]
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    hyperparameters: Mapping[str, str]
    seed: int
    algorithm: str = DEFAULT_ALGORITHM

    @property
    def is_ppo(self) -> bool:
        """Whether the policy has a critic and learns with PPO."""
        return self.algorithm == "ppo"

    @property
    def shape(self) -> SpaceShape:
        """Sizes and bounds for batch validation."""
        size = int(np.prod(self.action_shape)) if self.discrete_actions is None else 1
        low = np.asarray(self.action_low, dtype=np.float64) if self.action_low else np.full(size, -np.inf)
        high = np.asarray(self.action_high, dtype=np.float64) if self.action_high else np.full(size, np.inf)
        return SpaceShape(int(np.prod(self.observation_shape)), self.discrete_actions, size, low, high)

    def values(self) -> dict[str, HyperValue]:
        """The hyperparameters parsed back into typed values."""
        return POLICY_ALGORITHMS[self.algorithm].parse(self.hyperparameters)

    def to_json(self) -> str:
        """Canonical JSON (also the identity compared by idempotent creation)."""
        data = asdict(self)
        data["hyperparameters"] = dict(sorted(self.hyperparameters.items()))
        if self.algorithm == DEFAULT_ALGORITHM:
            del data["algorithm"]  # a REINFORCE spec keeps the identity (and files) it had before PPO existed
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PolicySpec:
        """The inverse of to_json."""
        data = json.loads(text)
        return cls(tuple(data["observation_shape"]), data["discrete_actions"], tuple(data["action_shape"]),
                   tuple(data["action_low"]), tuple(data["action_high"]), dict(data["hyperparameters"]),
                   int(data["seed"]), str(data.get("algorithm", DEFAULT_ALGORITHM)))


def _shape_fits(shape: tuple[int, ...], max_size: int) -> bool:
    """1 to MAX_SHAPE_DIMS positive dimensions of at most max_size values in all."""
    # The count first: math.prod of 100,000 dimensions near 2**63 takes seconds (a fuzz case found it). Python
    # ints, not numpy's int64 product, which wraps around ([2] * 64 would count as 0 values).
    return 1 <= len(shape) <= MAX_SHAPE_DIMS and all(d >= 1 for d in shape) and math.prod(shape) <= max_size


def _quoted_shape(shape: tuple[int, ...]) -> str:
    """A shape for an error message: quoted() of its first dimensions (never the whole list), and their count."""
    return f"{quoted(str(list(shape[:MAX_SHAPE_DIMS + 1])))} ({len(shape)} dimensions)"


def build_spec(request: PolicySpecRequest) -> PolicySpec:
    """Validate a client's spec; InvalidRequest names the field at fault."""
    obs_shape = tuple(int(d) for d in request.observation_shape)
    if not _shape_fits(obs_shape, MAX_OBSERVATION_SIZE):
        raise InvalidRequest(f"spec.observation_shape: {_quoted_shape(obs_shape)} must be 1 to {MAX_SHAPE_DIMS} "
                             f"positive dimensions of at most {MAX_OBSERVATION_SIZE} values in all",
                             field="spec.observation_shape")
    if request.discrete_actions is not None:
        if not 2 <= request.discrete_actions <= MAX_ACTION_SIZE:
            raise InvalidRequest(f"spec.discrete_n: {request.discrete_actions} must be in [2, {MAX_ACTION_SIZE}]",
                                 field="spec.discrete_n")
        action_shape: tuple[int, ...] = ()
        low: tuple[float, ...] = ()
        high: tuple[float, ...] = ()
    else:
        action_shape = tuple(int(d) for d in request.box_shape)
        if not _shape_fits(action_shape, MAX_ACTION_SIZE):
            raise InvalidRequest(f"spec: give discrete_n, or box with a shape of 1 to {MAX_SHAPE_DIMS} positive "
                                 f"dimensions of at most {MAX_ACTION_SIZE} values (got {_quoted_shape(action_shape)})",
                                 field="spec.box.shape")
        size = math.prod(action_shape)
        low, high = tuple(float(v) for v in request.box_low), tuple(float(v) for v in request.box_high)
        for name, bound in (("low", low), ("high", high)):
            if bound and (len(bound) != size or any(np.isnan(bound))):
                raise InvalidRequest(f"spec.box.{name}: {len(bound)} values, expected {size} (or none for "
                                     "unbounded), without NaN", field=f"spec.box.{name}")
        if low and high and any(lo > hi for lo, hi in zip(low, high, strict=True)):
            raise InvalidRequest("spec.box: every low must be <= its high", field="spec.box.low")
    algorithm = request.algorithm.strip().lower() or DEFAULT_ALGORITHM
    if algorithm not in POLICY_ALGORITHMS:
        raise InvalidRequest(f"spec.algorithm: unknown algorithm {quoted(request.algorithm)}; use one of "
                             f"{', '.join(sorted(POLICY_ALGORITHMS))}", field="spec.algorithm")
    seed = seed_or_random(request.seed, "spec.seed")
    try:
        values = POLICY_ALGORITHMS[algorithm].parse(request.hyperparameters)
    except InvalidHyperparameter as exc:  # the hyperparameters sit inside the spec in PolicyService's requests
        raise InvalidHyperparameter(f"spec.{exc.message}", field=f"spec.{exc.field}") from None
    effective = {key: format_value(value) for key, value in sorted(values.items())}
    return PolicySpec(obs_shape, request.discrete_actions, action_shape, low, high, effective, seed, algorithm)


def network_sizes(spec: PolicySpec) -> dict[str, int]:
    """Parameters of the spec's actor (and critic, for PPO), counted without building them."""
    hidden: tuple[int, ...] = spec.values()["net_arch"]  # type: ignore[assignment]
    shape = spec.shape
    actions = spec.discrete_actions if spec.discrete_actions is not None else shape.action_size
    log_std = 0 if spec.discrete_actions is not None else shape.action_size
    sizes = {"actor": mlp_parameters(shape.observation_size, hidden, actions) + log_std}
    if spec.is_ppo:
        sizes["critic"] = mlp_parameters(shape.observation_size, hidden, 1)
    return sizes


def check_network_sizes(spec: PolicySpec, cap: int) -> None:
    """Refuse a spec whose actor or critic would pass MAX_NETWORK_PARAMETERS, naming net_arch (or the
    observation shape when even one hidden unit is too many)."""
    over = {name: count for name, count in network_sizes(spec).items() if count > cap}
    if not over:
        return
    name, count = max(over.items(), key=lambda item: item[1])
    if max(network_sizes(replace(spec, hyperparameters={**spec.hyperparameters, "net_arch": "1"})).values()) > cap:
        raise InvalidRequest(
            f"spec.observation_shape: {spec.shape.observation_size:,} observation values make the {name} "
            f"{count:,} parameters, and even net_arch 1 passes this server's cap of {cap:,} "
            "(MAX_NETWORK_PARAMETERS)", field="spec.observation_shape")
    raise InvalidHyperparameter(
        f"spec.hyperparameters['net_arch']: {spec.hyperparameters['net_arch']} makes the {name} {count:,} "
        f"parameters for {spec.shape.observation_size:,} observation values, over this server's cap of {cap:,} "
        "(MAX_NETWORK_PARAMETERS); use narrower or fewer layers", field="spec.hyperparameters.net_arch")


def with_seed(spec: PolicySpec, seed: int) -> PolicySpec:
    """The same spec with another seed."""
    return replace(spec, seed=seed)


def new_net(spec: PolicySpec) -> PolicyNet:
    """A fresh network for the spec, its initial weights fixed by the spec's seed."""
    values = spec.values()
    action_space = _action_space(spec)
    # A private RNG stream: the seed fixes the initial weights without touching the process's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = build_policy_net(spec.shape.observation_size, action_space, values["net_arch"],  # type: ignore[arg-type]
                               ACTIVATIONS[str(values["activation_fn"])], float(values["log_std_init"]))  # type: ignore[arg-type]
        if spec.is_ppo:
            ppo_init(net)
    return net


def new_critic(spec: PolicySpec) -> ValueNet | None:
    """A fresh critic for a PPO spec (None for REINFORCE), its weights fixed by the spec's seed."""
    if not spec.is_ppo:
        return None
    values = spec.values()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed + 1)  # not the actor's stream: the two networks start unrelated
        return ValueNet(spec.shape.observation_size, values["net_arch"],  # type: ignore[arg-type]
                        ACTIVATIONS[str(values["activation_fn"])])


def _action_space(spec: PolicySpec) -> Any:
    if spec.discrete_actions is not None:
        return gym.spaces.Discrete(spec.discrete_actions)
    return gym.spaces.Box(-np.inf, np.inf, shape=spec.action_shape, dtype=np.float32)
