"""Environments: Gymnasium ids or external simulations (grpc://host:port, unix:PATH), space inspection, and
observation/action flattening for Act.

External simulations are reached through the ExternalEnvironments interface, implemented in infra
(rl_service.infra.external_env) and handed in by the composition root: core never imports grpc.
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env
from stable_baselines3.common.vec_env import VecEnv

from rl_service.core.errors import (
    InvalidObservation,
    InvalidRequest,
    PermissionDenied,
    UnknownEnvironment,
    UnsupportedSpace,
    quoted,
)

_OBSERVATION_SPACES = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)
# A simulation's address: grpc://host:port, grpcs://host:port (TLS), or unix:PATH (a unix domain socket, gRPC's
# naming).
EXTERNAL_ENV_PREFIXES = ("grpc://", "grpcs://", "unix:")


@dataclass(frozen=True)
class EnvSpaces:
    """An environment's spaces, read once from a throwaway instance."""

    observation_space: gym.Space[Any]
    action_space: gym.Space[Any]
    # External simulations only: how many envs the simulation steps together (it decides, not n_envs).
    num_envs: int | None = None
    # External simulations only: whether it steps a subset of its envs (protocol version 2), as env_groups needs.
    env_subsets: bool = False


class ExternalEnvironments(Protocol):
    """Reaches simulations over the environment protocol; implemented in infra, picklable (workers get a copy)."""

    def spaces(self, address: str) -> EnvSpaces:
        """Check the address (host allow-list or socket directory, before any contact), then ask for its spec."""

    def make_vec_env(self, address: str, n_envs: int, seed: int) -> VecEnv:
        """A VecEnv over the simulation's n_envs envs, with episode statistics in infos["episode"]."""


def is_external_env(env_id: str) -> bool:
    """True when env_id is a simulation's address (grpc:// or grpcs://host:port, unix:PATH), not a Gymnasium id.

    Checked before check_env_id, which refuses every id holding ':' as a module path.
    """
    return env_id.strip().lower().startswith(EXTERNAL_ENV_PREFIXES)


def _require_external(external: ExternalEnvironments | None, env_id: str) -> ExternalEnvironments:
    if external is None:
        raise PermissionDenied(f"env_id: {quoted(env_id)} is an external environment, and this server has none "
                               "configured", field="env_id")
    return external


def check_env_id(env_id: str) -> None:
    """Refuse ids that are empty, not registered, or that would make Gymnasium import a module."""
    if not env_id.strip():
        raise InvalidRequest("env_id is required, e.g. 'CartPole-v1'", field="env_id")
    # "module:Env-v0" makes gym.make import an arbitrary module: that would execute code a client chose.
    if ":" in env_id:
        raise UnknownEnvironment(
            f"env_id: {quoted(env_id)} names a module to import; only registered Gymnasium ids are accepted",
            field="env_id",
        )
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownEnvironment(f"env_id: {quoted(env_id)} is not a registered Gymnasium environment{hint}",
                                 field="env_id")


def env_spaces(env_id: str, external: ExternalEnvironments | None = None) -> EnvSpaces:
    """The spaces of a registered environment (cached), or of a simulation (asked every time: it may change)."""
    if is_external_env(env_id):
        spaces = _require_external(external, env_id).spaces(env_id)
        check_observation_space(spaces.observation_space)
        return spaces
    return _registered_env_spaces(env_id)


@functools.lru_cache(maxsize=256)
def _registered_env_spaces(env_id: str) -> EnvSpaces:
    """The spaces of a registered environment (cached: ids are immutable once registered)."""
    check_env_id(env_id)
    try:
        env = gym.make(env_id)
    except Exception as exc:  # a missing optional dependency (box2d, mujoco, ...) surfaces here
        raise UnknownEnvironment(
            f"env_id: {quoted(env_id)} is registered but cannot be created on this server: {exc}", field="env_id"
        ) from None
    try:
        spaces = EnvSpaces(env.observation_space, env.action_space)
    finally:
        env.close()
    check_observation_space(spaces.observation_space)
    return spaces


def check_observation_space(space: gym.Space[Any]) -> None:
    """Raise UnsupportedSpace for observation spaces the service cannot flatten (Dict, Tuple, ...)."""
    if not isinstance(space, _OBSERVATION_SPACES):
        raise UnsupportedSpace(
            f"env_id: observation space {type(space).__name__} is not supported; "
            "use Box, Discrete, MultiDiscrete or MultiBinary",
            field="env_id",
        )


def flat_size(space: gym.Space[Any]) -> int:
    """How many numbers one flattened element of the space takes."""
    if isinstance(space, gym.spaces.Discrete):
        return 1
    # math.prod of the shape tuple: np.prod costs more than the rest of a small Act put together.
    if isinstance(space, gym.spaces.MultiDiscrete):
        return math.prod(space.nvec.shape)
    if isinstance(space, gym.spaces.MultiBinary | gym.spaces.Box):
        return math.prod(space.shape)
    raise UnsupportedSpace(f"space {type(space).__name__} is not supported")


def observations_from_flat(values: list[float] | np.ndarray, space: gym.Space[Any], field: str) -> np.ndarray:
    """Validate flattened observations and shape them as a batch for `predict`; raises InvalidObservation."""
    array = np.asarray(values, dtype=np.float64)
    size = flat_size(space)
    if array.size == 0 or array.size % size != 0:
        raise InvalidObservation(
            f"{field}: got {array.size} values; the observation space {space} takes {size} per observation",
            field=field,
        )
    count = array.size // size
    shape: tuple[int, ...] = tuple(space.shape or ())
    if isinstance(space, gym.spaces.Box):
        cast = array.astype(space.dtype if space.dtype is not None else np.float32)
        # One check after the cast: NaN and Inf stay so, and 1e39 is finite as float64 but Inf as float32.
        _check_finite(cast if np.issubdtype(cast.dtype, np.floating) else array, field)
        return cast.reshape(count, *shape)
    _check_finite(array, field)
    if not np.all(array == np.round(array)):
        raise InvalidObservation(f"{field}: {type(space).__name__} observations must be whole numbers",
                                 field=field)
    ints = array.astype(np.int64)
    if isinstance(space, gym.spaces.Discrete):
        low, high = int(space.start), int(space.start + space.n - 1)
        _check_int_range(ints, np.full(1, low), np.full(1, high), field)
        return ints.reshape(count)
    if isinstance(space, gym.spaces.MultiDiscrete):
        grid = ints.reshape(count, -1)
        _check_int_range(grid, np.asarray(space.start).reshape(-1), (space.start + space.nvec - 1).reshape(-1), field)
        return ints.reshape(count, *space.nvec.shape)
    _check_int_range(ints.reshape(count, -1), np.zeros(1), np.ones(1), field)
    return ints.reshape(count, *shape)


def _check_finite(array: np.ndarray, field: str) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise InvalidObservation(
            f"{field}: value at index {bad} is {array.reshape(-1)[bad]} after conversion to {array.dtype}; "
            "NaN and Inf are refused", field=field)


def _check_int_range(values: np.ndarray, low: np.ndarray, high: np.ndarray, field: str) -> None:
    outside = (values < low) | (values > high)
    if np.any(outside):
        bad = int(np.flatnonzero(outside.reshape(-1))[0])
        raise InvalidObservation(
            f"{field}: value at index {bad} is {values.reshape(-1)[bad]}, outside the space's range "
            f"[{int(np.min(low))}, {int(np.max(high))}]", field=field)


def actions_to_flat(actions: np.ndarray, space: gym.Space[Any], count: int) -> tuple[list[float], int]:
    """Flatten a batch of actions into floats (discrete ones hold integers) and the size of one action."""
    size = flat_size(space)
    flat = np.asarray(actions, dtype=np.float64).reshape(count * size)
    return flat.tolist(), size


def make_vec_env(env_id: str, n_envs: int, seed: int, external: ExternalEnvironments | None = None) -> VecEnv:
    """A vectorised, Monitor-wrapped environment (episode stats land in infos["episode"])."""
    if is_external_env(env_id):
        return _require_external(external, env_id).make_vec_env(env_id, n_envs, seed)
    check_env_id(env_id)
    return sb3_make_vec_env(env_id, n_envs=n_envs, seed=seed)
