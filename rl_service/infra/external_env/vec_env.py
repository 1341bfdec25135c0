"""ExternalVecEnv: any ExternalEnvAdapter as a stable-baselines3 VecEnv, one adapter call per vector step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from rl_service.infra.external_env.adapter import ExternalEnvAdapter


class ExternalVecEnv(VecEnv):
    """The simulation's envs as SB3 sees a DummyVecEnv: auto-reset, infos["terminal_observation"], seeds."""

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

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """Only render_mode (None) is known about remote envs."""
        if attr_name == "render_mode":
            return [None for _ in self._indices(indices)]
        raise AttributeError(f"external environment {self.adapter.address} has no attribute {attr_name!r}")

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Remote envs' attributes cannot be set."""
        raise AttributeError(f"external environment {self.adapter.address}: cannot set {attr_name!r}")

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        """Remote envs' methods cannot be called."""
        raise AttributeError(f"external environment {self.adapter.address}: cannot call {method_name!r}")

    def env_is_wrapped(self, wrapper_class: type[Any], indices: VecEnvIndices = None) -> list[bool]:
        """Remote envs carry no Gymnasium wrappers here."""
        return [False for _ in self._indices(indices)]

    def _indices(self, indices: VecEnvIndices) -> Sequence[int]:
        if indices is None:
            return range(self.num_envs)
        if isinstance(indices, int):
            return [indices]
        return list(indices)
