"""The test suite's own environments, registered on import; a server loads them with GYM_PACKAGES=tests.support.envs.

Production servers never see them (a default server refuses rl_service/CrashAfter-v0 like any unknown id).
Registered under the "rl_service/" namespace so they can never shadow a real Gymnasium id.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

CRASH_ENV_ID = "rl_service/CrashAfter-v0"
MASKED_ENV_ID = "rl_service/MaskedChoice-v0"


class CrashAfterEnv(gym.Env[np.ndarray, np.int64]):
    """A two-action env that raises RuntimeError after `crash_after` steps: exercises the run-failure path."""

    def __init__(self, crash_after: int = 300) -> None:
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.crash_after = crash_after
        self._steps = 0
        self._t = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._t = 0
        return np.zeros(2, dtype=np.float32), {}

    def step(self, action: np.int64) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self._steps += 1
        self._t += 1
        if self._steps > self.crash_after:
            raise RuntimeError(f"CrashAfterEnv: deliberate crash after {self.crash_after} steps")
        obs = np.array([self._t / 10.0, float(action)], dtype=np.float32).clip(-1.0, 1.0)
        return obs, float(action), self._t >= 10, False, {}


class MaskedChoiceEnv(gym.Env[np.ndarray, np.int64]):
    """Eight actions, of which only two (different each step) are legal: an illegal one ends the episode with -1.

    The observation shows the legal actions as 0/1 flags, and the one worth +1 (the other legal one gives 0.1), so a
    policy can learn it; `action_masks()` (sb3-contrib's convention) lists the legal ones. Three in four random
    actions are illegal, so a masked run that never takes one is telling.
    """

    N_ACTIONS = 8

    def __init__(self, episode_length: int = 16) -> None:
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(2 * self.N_ACTIONS,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(self.N_ACTIONS)
        self.episode_length = episode_length
        self.illegal_actions_taken = 0
        self._t = 0
        self._legal = np.zeros(self.N_ACTIONS, dtype=bool)
        self._good = 0

    def _draw(self) -> np.ndarray:
        pair = self.np_random.choice(self.N_ACTIONS, size=2, replace=False)
        self._legal = np.zeros(self.N_ACTIONS, dtype=bool)
        self._legal[pair] = True
        self._good = int(pair[0])
        good = np.zeros(self.N_ACTIONS, dtype=np.float32)
        good[self._good] = 1.0
        return np.concatenate([self._legal.astype(np.float32), good])

    def action_masks(self) -> np.ndarray:
        """True for each action that is legal now."""
        return self._legal.copy()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._t = 0
        return self._draw(), {}

    def step(self, action: np.int64) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self._t += 1
        if not self._legal[int(action)]:
            self.illegal_actions_taken += 1
            return self._draw(), -1.0, True, False, {"illegal_action": True}
        reward = 1.0 if int(action) == self._good else 0.1
        return self._draw(), reward, False, self._t >= self.episode_length, {}


class SpacesEnv(gym.Env[Any, Any]):
    """A do-nothing environment with the given spaces (not registered): enough to build untrained policies."""

    def __init__(self, observation_space: gym.Space[Any], action_space: gym.Space[Any]) -> None:
        self.observation_space = observation_space
        self.action_space = action_space

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        return self.observation_space.sample(), 0.0, False, False, {}


def register() -> None:
    """Register the test environments with Gymnasium (idempotent)."""
    if CRASH_ENV_ID not in gym.registry:
        gym.register(id=CRASH_ENV_ID, entry_point=CrashAfterEnv, max_episode_steps=10)  # type: ignore[arg-type]
    if MASKED_ENV_ID not in gym.registry:
        gym.register(id=MASKED_ENV_ID, entry_point=MaskedChoiceEnv)  # type: ignore[arg-type]


register()
