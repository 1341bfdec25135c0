"""A test env that tells whether another process was stepping at the same time (registered on import).

Step k of an instance leaves the marker "<pid>.<k>" in $RL_SERVICE_TEST_RENDEZVOUS_DIR, then waits (at most
$RL_SERVICE_TEST_RENDEZVOUS_SECONDS) for another process's marker of the same step; its observation is 1.0 if one
came, 0.0 if the wait ran out. Two env-server workers whose k-th steps run at the same time both answer 1.0 at once;
steps one after the other make the first wait in vain and answer 0.0 (the wait bounds a failure; nothing is timed).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

RENDEZVOUS_ENV_ID = "rl_service/Rendezvous-v0"
DIR_VARIABLE = "RL_SERVICE_TEST_RENDEZVOUS_DIR"
SECONDS_VARIABLE = "RL_SERVICE_TEST_RENDEZVOUS_SECONDS"


class RendezvousEnv(gym.Env[np.ndarray, np.int64]):
    """Observation [1.0] when another process reached the same step, [0.0] when none did in time; never ends."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self._steps = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action: np.int64) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self._steps += 1
        where = Path(os.environ[DIR_VARIABLE])
        (where / f"{os.getpid()}.{self._steps}").touch()
        deadline = time.monotonic() + float(os.environ.get(SECONDS_VARIABLE, "60"))
        met = False
        while not met and time.monotonic() < deadline:
            met = any(path.name != f"{os.getpid()}.{self._steps}" for path in where.glob(f"*.{self._steps}"))
            if not met:
                time.sleep(0.005)
        return np.array([float(met)], dtype=np.float32), 0.0, False, False, {}


if RENDEZVOUS_ENV_ID not in gym.registry:
    gym.register(RENDEZVOUS_ENV_ID, entry_point=RendezvousEnv)  # type: ignore[arg-type]
