"""The ExternalEnvAdapter contract: a batch of envs living elsewhere, reset and stepped all at once.

ExternalVecEnv presents any adapter to stable-baselines3; GrpcExternalEnvAdapter is the real one,
FakeExternalEnvAdapter an in-process stand-in for tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from rl_service.infra.external_env.codec import EnvSpec
from rl_service.infra.external_env.env_batch import EnvBatch


@dataclass(frozen=True)
class StepResult:
    """One step of every env (or of the env_ids asked: one row each, in their order).

    `final_observations` maps the row of an env that ended (its env index in a full step) to its episode's last
    observation.
    """

    observations: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    final_observations: dict[int, np.ndarray] = field(default_factory=dict)
    # True when the connection was lost and restored: every episode was cut (truncated) and restarted.
    reconnected: bool = False
    # The legal actions of `observations` (one row per returned env); None: every action is legal.
    action_masks: np.ndarray | None = None


# Steps a trainer may have sent and not yet received: two groups of envs in flight (double-buffered sampling).
MAX_STEPS_IN_FLIGHT = 2


class ExternalEnvAdapter(ABC):
    """A simulation's envs, seen from the training side.

    Implementations MUST:
    - expose the simulation's spec (spaces, num_envs) before the first call, and never change it;
    - return from reset a (num_envs, *observation shape) array in the observation space's dtype;
    - return from step one StepResult with num_envs observations (an ended env's is the first of its next
      episode), float32 rewards, bool terminated and truncated, and a final observation for exactly the envs
      that ended;
    - check everything the simulation sends (counts, shapes, NaN, Inf, action masks) and raise
      EnvironmentProtocolError naming the field, rather than pass bad numbers to training;
    - answer action_masks() with the masks of the observations the last reset or step returned (None when that
      answer carried none: every action is legal);
    - bound every call in time and raise EnvironmentUnavailable naming the address and the cause when the
      simulation cannot be reached or does not answer, never block forever;
    - with env_ids (protocol version 2, supports_env_subsets): step only those envs, every array of the
      StepResult holding them alone, in env_ids order;
    - answer send_step/receive_step in the order sent, with up to MAX_STEPS_IN_FLIGHT steps outstanding;
    - after restoring a lost connection (every env reset), report each env truncated (reconnected=True) in the
      next answer that holds it, so a trainer stepping groups never pairs an old observation with a new episode;
    - be usable from one thread at a time; close is idempotent.
    """

    @property
    @abstractmethod
    def spec(self) -> EnvSpec:
        """The simulation's spaces and number of envs."""

    @property
    @abstractmethod
    def address(self) -> str:
        """Where the simulation lives, for messages."""

    @abstractmethod
    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start new episodes in every env (env i seeded with seed + i); the first observations."""

    @abstractmethod
    def step(self, actions: np.ndarray, env_ids: Sequence[int] | None = None) -> StepResult:
        """Step every env (or the envs in env_ids) with its action, auto-resetting the ones that end."""

    @property
    def supports_env_subsets(self) -> bool:
        """Whether step takes env_ids (the simulation speaks protocol version 2)."""
        return False

    def send_step(self, actions: np.ndarray, env_ids: Sequence[int] | None = None) -> None:
        """Start a step without waiting for its answer (receive_step returns it). This default steps at once;
        an adapter that can overlap the simulation with the caller's work overrides both methods."""
        pending: deque[StepResult] = self.__dict__.setdefault("_sent_steps", deque())
        if len(pending) >= MAX_STEPS_IN_FLIGHT:
            raise RuntimeError(f"at most {MAX_STEPS_IN_FLIGHT} steps may be in flight")
        pending.append(self.step(actions, env_ids))

    def receive_step(self) -> StepResult:
        """The answer to the oldest step sent and not yet received."""
        pending: deque[StepResult] = self.__dict__.setdefault("_sent_steps", deque())
        if not pending:
            raise RuntimeError("receive_step without a step in flight")
        return pending.popleft()

    @abstractmethod
    def close(self) -> None:
        """Release the connection; the simulation keeps running."""

    def action_masks(self) -> np.ndarray | None:
        """(num_envs, n) bool: the legal actions of the last observations; None: every action is legal."""
        return None


class FakeExternalEnvAdapter(ExternalEnvAdapter):
    """In-process Gymnasium envs behind the adapter contract, for tests; counts calls, can fail on demand."""

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env[Any, Any]]], name: str = "fake",
                 fail_step: Callable[[int], Exception | None] | None = None, env_subsets: bool = True) -> None:
        self._batch = EnvBatch(env_fns, name=name)
        self._fail_step = fail_step
        self._env_subsets = env_subsets  # False: behave as a protocol version 1 simulation
        self.resets: list[int | None] = []
        self.steps = 0
        self.closed = False

    @classmethod
    def from_gym_id(cls, env_id: str, num_envs: int, env_subsets: bool = True) -> FakeExternalEnvAdapter:
        """num_envs instances of a registered Gymnasium id."""
        return cls([lambda: gym.make(env_id) for _ in range(num_envs)], name=env_id, env_subsets=env_subsets)

    @property
    def supports_env_subsets(self) -> bool:
        """Whether step takes env_ids (as a protocol version 2 simulation does)."""
        return self._env_subsets

    @property
    def spec(self) -> EnvSpec:
        """The envs' spaces and count."""
        return self._batch.spec

    @property
    def address(self) -> str:
        """A made-up address naming the fake."""
        return f"fake://{self._batch.spec.name}"

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Reset every env."""
        self.resets.append(seed)
        return self._batch.reset(seed)

    def step(self, actions: np.ndarray, env_ids: Sequence[int] | None = None) -> StepResult:
        """Step every env (or those in env_ids); raises what fail_step returns for this step's number (from 1).

        With env_ids, final_observations is keyed by row (position in env_ids), as every other array of the result.
        """
        if env_ids is not None and not self._env_subsets:
            raise NotImplementedError(f"{self.address} speaks protocol version 1: it steps every env at once")
        self.steps += 1
        if self._fail_step is not None and (error := self._fail_step(self.steps)) is not None:
            raise error
        result = self._batch.step(np.asarray(actions), env_ids)
        finals = {int(row): result.final_observations[j] for j, row in enumerate(result.ended)}
        return StepResult(result.observations, result.rewards, result.terminated, result.truncated, finals,
                          action_masks=result.action_masks)

    def action_masks(self) -> np.ndarray | None:
        """The masks the envs' action_masks() gave after the last reset or step (None without the method)."""
        return self._batch.last_action_masks

    def close(self) -> None:
        """Close the envs."""
        if not self.closed:
            self.closed = True
            self._batch.close()
