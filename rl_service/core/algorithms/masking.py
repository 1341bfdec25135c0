"""Action masks (sb3-contrib's convention): an environment lists its legal actions with an `action_masks()` method,
found through Gymnasium's wrappers (`get_wrapper_attr`) and stable-baselines3's VecEnvs (`env_method`)."""

from __future__ import annotations

import functools
from typing import Any

import gymnasium as gym
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported

from rl_service.core.errors import InvalidRequest, quoted

__all__ = ["get_action_masks", "is_masking_supported", "registered_env_has_masks", "require_masks"]


@functools.lru_cache(maxsize=256)
def registered_env_has_masks(env_id: str) -> bool:
    """True when a registered Gymnasium environment (already checked by env_spaces) exposes action_masks()."""
    env = gym.make(env_id)
    try:
        return is_masking_supported(env)
    finally:
        env.close()


def masks_missing(algorithm: str, env_id: str) -> InvalidRequest:
    """The error for an algorithm that needs action masks on an environment without them (field: algorithm)."""
    return InvalidRequest(
        f"algorithm: {algorithm} acts only among the legal actions an environment lists with an action_masks() "
        f"method, and {quoted(env_id)} has none; use PPO, or give the environment action_masks()",
        field="algorithm")


def require_masks(env: Any, algorithm: str, env_id: str) -> None:
    """Raise masks_missing when the (vectorised) environment exposes no action masks."""
    if not is_masking_supported(env):
        raise masks_missing(algorithm, env_id)
