"""ExternalVecEnv: any ExternalEnvAdapter as a stable-baselines3 VecEnv, one adapter call per vector step.

Action masks follow sb3-contrib's convention: `env_method("action_masks")` answers each env's legal-action flags
for its current observation, so MaskablePPO's get_action_masks/is_masking_supported work on it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from rl_service.infra.external_env.adapter import ExternalEnvAdapter
from rl_service.infra.external_env.env_batch import MASKS_METHOD


def mask_width(space: gym.Space[Any]) -> int | None:
    """Flags per env in sb3-contrib's masks for the action space; None for spaces it cannot mask (Box)."""
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return int(space.nvec.sum())
    if isinstance(space, gym.spaces.MultiBinary):
        return 2 * int(np.prod(space.shape))  # a legal 0 and a legal 1 per value
    return None


class ExternalVecEnv(VecEnv):
    """The simulation's envs as SB3 sees a DummyVecEnv: auto-reset, infos["terminal_observation"], seeds, masks.

    The masks are those of the last answer (for an env that ended in the last step, its next episode's first
    observation). A simulation that sends none has every action legal: MaskablePPO then acts like PPO. Only
    Discrete masks travel on the wire; for MultiDiscrete and MultiBinary action spaces every action is legal.
    """

    def __init__(self, adapter: ExternalEnvAdapter) -> None:
        self.adapter = adapter
        spec = adapter.spec
        self._actions: np.ndarray | None = None
        super().__init__(spec.num_envs, spec.observation_space, spec.action_space)

    def reset(self) -> VecEnvObs:
        """Reset every env, with the seed given to seed() if there was one (env i gets seed + i)."""
        seed = self._seeds[0] if self._seeds else None
        observations = self.adapter.reset(seed)
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return observations

    def step_async(self, actions: np.ndarray) -> None:
        """Keep the actions for step_wait (the adapter call is synchronous)."""
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        """One message to the simulation for all envs; infos carry final observations as SB3 expects."""
        if self._actions is None:
            raise RuntimeError("step_wait called without step_async")
        result = self.adapter.step(self._actions)
        self._actions = None
        dones = result.terminated | result.truncated
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for i, final in result.final_observations.items():
            info = infos[i]
            info["terminal_observation"] = final
            # SB3 bootstraps from the final observation of an episode cut short, not of one that really ended.
            info["TimeLimit.truncated"] = bool(result.truncated[i] and not result.terminated[i])
            if result.reconnected:
                info["external_env.reconnected"] = True
        return result.observations, result.rewards, dones, infos

    def close(self) -> None:
        """Close the adapter (the simulation keeps running)."""
        self.adapter.close()

    def action_masks(self) -> np.ndarray:
        """(num_envs, flags) bool: each env's legal actions now; all True where the simulation sent none."""
        width = mask_width(self.action_space)
        if width is None:
            raise AttributeError(f"external environment {self.adapter.address}: no action masks for the action "
                                 f"space {self.action_space} (MaskablePPO needs a discrete one)")
        masks = self.adapter.action_masks()
        if masks is None:
            return np.ones((self.num_envs, width), dtype=bool)
        return np.array(masks, dtype=bool)  # a copy: the caller may keep it past the next step

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """render_mode (None), and action_masks (per env, a callable answering its mask) for discrete actions."""
        if attr_name == "render_mode":
            return [None for _ in self._indices(indices)]
        if attr_name == MASKS_METHOD and mask_width(self.action_space) is not None:
            return [partial(self._env_mask, i) for i in self._indices(indices)]
        raise AttributeError(f"external environment {self.adapter.address} has no attribute {attr_name!r}")

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Remote envs' attributes cannot be set."""
        raise AttributeError(f"external environment {self.adapter.address}: cannot set {attr_name!r}")

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        """Only action_masks (no arguments): each env's mask as a bool array; other remote methods cannot be called."""
        if method_name == MASKS_METHOD and not method_args and not method_kwargs:
            masks = self.action_masks()
            return [masks[i] for i in self._indices(indices)]
        raise AttributeError(f"external environment {self.adapter.address}: cannot call {method_name!r}")

    def env_is_wrapped(self, wrapper_class: type[Any], indices: VecEnvIndices = None) -> list[bool]:
        """Remote envs carry no Gymnasium wrappers here."""
        return [False for _ in self._indices(indices)]

    def _env_mask(self, index: int) -> np.ndarray:
        mask: np.ndarray = self.action_masks()[index]
        return mask

    def _indices(self, indices: VecEnvIndices) -> Sequence[int]:
        if indices is None:
            return range(self.num_envs)
        if isinstance(indices, int):
            return [indices]
        return list(indices)
