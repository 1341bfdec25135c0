"""ExternalVecEnv: any ExternalEnvAdapter as a stable-baselines3 VecEnv, one adapter call per vector step.

Group stepping (env_groups, core/algorithms/env_groups.py): send_group/receive_group step a subset of the envs
through the adapter's send_step/receive_step; once every env has answered once, the assembled vector step is what
the next step_wait returns, so the wrappers above (VecMonitor, VecNormalize) see whole vector steps as in lockstep.

Action masks follow sb3-contrib's convention: `env_method("action_masks")` answers each env's legal-action flags
for its current observation, so MaskablePPO's get_action_masks/is_masking_supported work on it unchanged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from rl_service.infra.external_env.adapter import ExternalEnvAdapter, StepResult
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


@dataclass(frozen=True)
class GroupStep:
    """One answered step of a group of envs: a row per env, in env_ids order."""

    env_ids: np.ndarray  # (k,) int64
    observations: np.ndarray  # (k, *shape): an ended env's next first observation
    rewards: np.ndarray  # (k,) float32
    dones: np.ndarray  # (k,) bool
    infos: list[dict[str, Any]]  # terminal_observation and TimeLimit.truncated, as step_wait's


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
        self._groups_in_flight: deque[np.ndarray] = deque()  # env_ids of the group steps sent, oldest first
        self._answered = np.zeros(self.num_envs, dtype=bool)  # envs answered in the vector step being assembled
        self._assembly: tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]] | None = None
        self._completed: VecEnvStepReturn | None = None  # an assembled vector step for the next step_wait
        # While stepping groups: the adapter's-format masks of every env's current observation (None: all legal).
        self._masks: np.ndarray | None = None
        self._tracking_masks = False

    def reset(self) -> VecEnvObs:
        """Reset every env, with the seed given to seed() if there was one (env i gets seed + i)."""
        self._require_no_group_in_flight("reset")
        seed = self._seeds[0] if self._seeds else None
        observations = self.adapter.reset(seed)
        self._tracking_masks = False
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return observations

    def step_async(self, actions: np.ndarray) -> None:
        """Keep the actions for step_wait (the adapter call is synchronous)."""
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        """One message to the simulation for all envs; infos carry final observations as SB3 expects. After group
        steps that answered every env once, the vector step they assembled instead (no message)."""
        if self._completed is not None and self._actions is None:
            completed, self._completed = self._completed, None
            return completed
        if self._actions is None:
            raise RuntimeError("step_wait called without step_async")
        self._require_no_group_in_flight("step")
        result = self.adapter.step(self._actions)
        self._actions = None
        self._tracking_masks = False
        dones = result.terminated | result.truncated
        return result.observations, result.rewards, dones, _step_infos(result, self.num_envs)

    # ------------------------------------------------------------------------------------ group stepping

    @property
    def supports_groups(self) -> bool:
        """Whether the simulation steps subsets of its envs (protocol version 2)."""
        return self.adapter.supports_env_subsets

    def send_group(self, env_ids: np.ndarray, actions: np.ndarray) -> None:
        """Start a step of the envs in env_ids (one action each) without waiting; receive_group answers it."""
        if not self._tracking_masks:  # the masks of every env's observation now, updated group by group
            current = self.adapter.action_masks()
            self._masks = None if current is None else np.array(current, dtype=bool)
            self._tracking_masks = True
        ids = np.asarray(env_ids, dtype=np.int64)
        self.adapter.send_step(np.asarray(actions), [int(i) for i in ids])
        self._groups_in_flight.append(ids)

    def receive_group(self) -> GroupStep:
        """The answer to the oldest group step sent; when it completes a vector step, step_wait returns that."""
        if not self._groups_in_flight:
            raise RuntimeError("receive_group without a group step in flight")
        ids = self._groups_in_flight.popleft()
        result = self.adapter.receive_step()
        if len(result.observations) != len(ids):
            raise RuntimeError(f"external environment {self.adapter.address}: {len(result.observations)} "
                               f"answers for a step of {len(ids)} envs")
        if self._answered[ids].any():
            raise RuntimeError("an env was stepped twice before every env had stepped once")
        dones = result.terminated | result.truncated
        infos = _step_infos(result, len(ids))
        self._update_masks(ids, result)
        if self._assembly is None:
            self._assembly = (np.empty((self.num_envs, *result.observations.shape[1:]),
                                       dtype=result.observations.dtype),
                              np.empty(self.num_envs, dtype=np.float32), np.zeros(self.num_envs, dtype=bool),
                              [{} for _ in range(self.num_envs)])
        observations, rewards, all_dones, all_infos = self._assembly
        observations[ids], rewards[ids], all_dones[ids] = result.observations, result.rewards, dones
        for row, i in enumerate(ids):
            all_infos[int(i)] = infos[row]
        self._answered[ids] = True
        if self._answered.all():
            self._completed = (observations, rewards, all_dones, all_infos)
            self._assembly = None
            self._answered[:] = False
        return GroupStep(ids, result.observations, result.rewards, dones, infos)

    def abandon_vector_step(self) -> None:
        """Forget the vector step being assembled (training stopped with some groups answered); none in flight."""
        if self._groups_in_flight:
            raise RuntimeError("receive the group steps in flight first")
        self._assembly, self._completed = None, None
        self._answered[:] = False

    @property
    def groups_in_flight(self) -> int:
        """Group steps sent and not yet received."""
        return len(self._groups_in_flight)

    def _update_masks(self, ids: np.ndarray, result: StepResult) -> None:
        if result.action_masks is not None:
            if self._masks is None:  # the first masks seen: the envs not yet answered have every action legal
                self._masks = np.ones((self.num_envs, result.action_masks.shape[1]), dtype=bool)
            self._masks[ids] = result.action_masks
        elif self._masks is not None:
            self._masks[ids] = True  # an answer without masks: every action legal

    def _require_no_group_in_flight(self, what: str) -> None:
        if self._groups_in_flight or self._answered.any():
            raise RuntimeError(f"cannot {what} while group steps are in flight or a vector step is half assembled")

    def close(self) -> None:
        """Close the adapter (the simulation keeps running)."""
        self.adapter.close()

    def action_masks(self) -> np.ndarray:
        """(num_envs, flags) bool: each env's legal actions now; all True where the simulation sent none."""
        width = mask_width(self.action_space)
        if width is None:
            raise AttributeError(f"external environment {self.adapter.address}: no action masks for the action "
                                 f"space {self.action_space} (MaskablePPO needs a discrete one)")
        masks = self._masks if self._tracking_masks else self.adapter.action_masks()
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


def _step_infos(result: StepResult, rows: int) -> list[dict[str, Any]]:
    """One info per row of a step's answer: the final observation of an ended env, as SB3's DummyVecEnv gives."""
    infos: list[dict[str, Any]] = [{} for _ in range(rows)]
    for row, final in result.final_observations.items():
        info = infos[row]
        info["terminal_observation"] = final
        # SB3 bootstraps from the final observation of an episode cut short, not of one that really ended.
        info["TimeLimit.truncated"] = bool(result.truncated[row] and not result.terminated[row])
        if result.reconnected:
            info["external_env.reconnected"] = True
    return infos
