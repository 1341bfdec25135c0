"""The test suite's own environments, registered on import; a server loads them with GYM_PACKAGES=tests.support.envs.

Production servers never see them (a default server refuses rl_service/CrashAfter-v0 like any unknown id).
Registered under the "rl_service/" namespace so they can never shadow a real Gymnasium id.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

CRASH_ENV_ID = "rl_service/CrashAfter-v0"


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


def register() -> None:
    """Register the test environments with Gymnasium (idempotent)."""
    if CRASH_ENV_ID not in gym.registry:
        gym.register(id=CRASH_ENV_ID, entry_point=CrashAfterEnv, max_episode_steps=10)  # type: ignore[arg-type]


register()
