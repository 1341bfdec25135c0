"""Gymnasium environments stepped together with the protocol's semantics (auto-reset, final observations, masks).

The reference server serves one EnvBatch; FakeExternalEnvAdapter wraps one in-process. Free of torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from rl_service.infra.external_env.codec import AnySpace, EnvSpec, element_dtype, element_shape


class ResetNeeded(RuntimeError):
    """Step was called before the first Reset, or after a step that failed (FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class BatchStep:
    """One step of every env (or of the envs asked, in their order), in the protocol's layout; one row per env."""

    observations: np.ndarray  # (stepped envs, *shape): an ended env's next first observation
    rewards: np.ndarray  # (stepped envs,) float32
    terminated: np.ndarray  # (stepped envs,) bool
    truncated: np.ndarray  # (stepped envs,) bool
    final_observations: np.ndarray  # (ended envs, *shape), in row order
    action_masks: np.ndarray | None = None  # (stepped envs, n) bool for `observations`; None: the envs have none

    @property
    def ended(self) -> np.ndarray:
        """Rows (positions among the stepped envs) whose episode ended in this step."""
        return np.flatnonzero(self.terminated | self.truncated)


class BadEnvIds(ValueError):
    """StepRequest.env_ids names an env twice, one outside [0, num_envs), or not one per action."""


def check_env_ids(env_ids: Sequence[int], num_envs: int, actions: int) -> list[int]:
    """env_ids as a list, checked: distinct, each in [0, num_envs), as many as actions (BadEnvIds otherwise)."""
    ids = [int(i) for i in env_ids]
    if len(ids) != actions:
        raise BadEnvIds(f"env_ids: {len(ids)} ids for {actions} actions; give one id per action")
    outside = [i for i in ids if not 0 <= i < num_envs]
    if outside:
        raise BadEnvIds(f"env_ids: {outside[0]} is outside [0, {num_envs})")
    if len(set(ids)) != len(ids):
        repeated = next(i for i in ids if ids.count(i) > 1)
        raise BadEnvIds(f"env_ids: env {repeated} is named twice; each env may be stepped once per request")
    return ids


MASKS_METHOD = "action_masks"  # sb3-contrib's name for an env's legal-action flags


def action_masks_method(env: gym.Env[Any, Any]) -> Callable[[], Any] | None:
    """The env's `action_masks()` (reached through its wrappers), or None when it has none."""
    try:
        method = env.get_wrapper_attr(MASKS_METHOD)
    except AttributeError:
        method = getattr(env.unwrapped, MASKS_METHOD, None)
    return method if callable(method) else None


class EnvBatch:
    """num_envs Gymnasium envs; reset seeds env i with seed + i; step auto-resets envs that end.

    Envs with a Discrete action space and an `action_masks()` method have their masks read after every reset and
    step (`last_action_masks`); the protocol carries masks for Discrete action spaces only.
    """

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env[Any, Any]]], name: str = "", version: str = "") -> None:
        if not env_fns:
            raise ValueError("an EnvBatch needs at least one env")
        self.envs = [fn() for fn in env_fns]
        first = self.envs[0]
        self.spec = EnvSpec(first.observation_space, first.action_space, len(self.envs), name, version)
        self._obs_dtype = element_dtype(first.observation_space)
        self._obs_shape = element_shape(first.observation_space)
        self.needs_reset = True
        methods = [action_masks_method(env) for env in self.envs]
        self._mask_methods: list[Callable[[], Any]] | None = None
        if isinstance(first.action_space, gym.spaces.Discrete) and all(m is not None for m in methods):
            self._mask_methods = [m for m in methods if m is not None]
        self.last_action_masks: np.ndarray | None = None  # of the observations the last reset or step returned

    @classmethod
    def from_gym_id(cls, env_id: str, num_envs: int, version: str = "",
                    make: Callable[[str], gym.Env[Any, Any]] = gym.make) -> EnvBatch:
        """num_envs instances of a registered Gymnasium id, each built by `make` (e.g. with a step cost)."""
        return cls([lambda: make(env_id) for _ in range(num_envs)], name=env_id, version=version)

    @property
    def num_envs(self) -> int:
        """How many envs step together."""
        return len(self.envs)

    @property
    def observation_space(self) -> AnySpace:
        """Every env's observation space."""
        return self.spec.observation_space

    @property
    def action_space(self) -> AnySpace:
        """Every env's action space."""
        return self.spec.action_space

    @property
    def serves_action_masks(self) -> bool:
        """Whether reset and step report masks (a Discrete action space and `action_masks()` on every env)."""
        return self._mask_methods is not None

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start a new episode in every env; the first observations (their masks in last_action_masks)."""
        observations = np.empty((self.num_envs, *self._obs_shape), dtype=self._obs_dtype)
        self.needs_reset = True  # until every env has reset
        for i, env in enumerate(self.envs):
            observations[i], _ = env.reset(seed=None if seed is None else seed + i)
        self.last_action_masks = self._read_masks()
        self.needs_reset = False
        return observations

    def step(self, actions: np.ndarray, env_ids: Sequence[int] | None = None) -> BatchStep:
        """Step every env (or those in env_ids, in that order; the others are left as they are) with its action;
        an env that ends is reset at once (its final observation kept). Every array holds the stepped envs."""
        if self.needs_reset:
            raise ResetNeeded("Reset is required before Step (at start, and after a step that failed)")
        stepped = range(self.num_envs) if env_ids is None else check_env_ids(env_ids, self.num_envs, len(actions))
        n = len(stepped)
        observations = np.empty((n, *self._obs_shape), dtype=self._obs_dtype)
        rewards = np.empty(n, dtype=np.float32)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        finals = []
        self.needs_reset = True  # an exception below leaves the envs half-stepped
        for row, i in enumerate(stepped):
            env = self.envs[i]
            obs, reward, term, trunc, _ = env.step(actions[row])
            rewards[row] = reward
            terminated[row] = term
            truncated[row] = trunc
            if term or trunc:
                finals.append(obs)
                obs, _ = env.reset()
            observations[row] = obs
        # Read after the auto-resets: an ended env's mask is that of its next episode's first observation.
        masks = self._read_masks(stepped)
        if env_ids is None or masks is None or self.last_action_masks is None:
            self.last_action_masks = masks
        else:  # a new array (callers may hold the old one); the envs not stepped keep their masks
            updated = self.last_action_masks.copy()
            updated[list(stepped)] = masks
            self.last_action_masks = updated
        self.needs_reset = False
        final_observations = np.empty((len(finals), *self._obs_shape), dtype=self._obs_dtype)
        for j, obs in enumerate(finals):
            final_observations[j] = obs
        return BatchStep(observations, rewards, terminated, truncated, final_observations, masks)

    def _read_masks(self, env_ids: Sequence[int] | None = None) -> np.ndarray | None:
        """The action_masks() of every env (or of env_ids, in order) as (envs, n) bool; ValueError for a wrong shape
        or no legal action."""
        if self._mask_methods is None:
            return None
        n = int(self.action_space.n)  # type: ignore[attr-defined]
        ids = range(self.num_envs) if env_ids is None else env_ids
        masks = np.empty((len(ids), n), dtype=bool)
        for row, i in enumerate(ids):
            mask = np.asarray(self._mask_methods[i]())
            if mask.shape != (n,) or mask.dtype.kind not in "biu":
                raise ValueError(f"env {i}: action_masks() returned {mask.dtype.name} of shape {mask.shape}; "
                                 f"expected {n} bools")
            masks[row] = mask.astype(bool)
            if not masks[row].any():
                raise ValueError(f"env {i}: action_masks() leaves no legal action")
        return masks

    def close(self) -> None:
        """Close every env."""
        for env in self.envs:
            env.close()
