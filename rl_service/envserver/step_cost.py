"""StepCost: a Gymnasium wrapper that spends a fixed CPU time per env step, standing in for an expensive simulator.

Used by `rl-service env-server --step-cost-us` and by the simulation-speed benchmark's in-process variants, so a
remote and an in-process run pay the same simulator cost. The cost is busy work, not sleep: a game engine computes
through its step, and sleeping would hand the core to the trainer for free.
"""

from __future__ import annotations

import time
from typing import Any, SupportsFloat

import gymnasium as gym

MAX_STEP_COST_US = 1_000_000.0


class StepCost(gym.Wrapper[Any, Any, Any, Any]):
    """Busy-wait `cost_us` microseconds in every step (reset is free)."""

    def __init__(self, env: gym.Env[Any, Any], cost_us: float) -> None:
        if not 0.0 <= cost_us <= MAX_STEP_COST_US:
            raise ValueError(f"step cost must be in [0, {MAX_STEP_COST_US:g}] microseconds, not {cost_us!r}")
        super().__init__(env)
        self.cost_ns = int(cost_us * 1000)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        """The wrapped env's step, after `cost_us` of busy work."""
        if self.cost_ns:
            deadline = time.perf_counter_ns() + self.cost_ns
            while time.perf_counter_ns() < deadline:
                pass
        return self.env.step(action)


def make_costly(env_id: str, cost_us: float) -> gym.Env[Any, Any]:
    """A registered Gymnasium env, wrapped in StepCost when cost_us > 0."""
    env = gym.make(env_id)
    return StepCost(env, cost_us) if cost_us > 0 else env
