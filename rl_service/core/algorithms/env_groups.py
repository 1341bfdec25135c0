"""Double-buffered rollouts (env_groups = 2): while the simulation steps one group of envs, the policy acts for the
other. `use_env_groups(model, groups)` makes an on-policy model (PPO, A2C, TRPO, MaskablePPO) collect that way.

Exact by construction: with a fixed seed the rollouts equal lockstep ones (stable-baselines3's and sb3-contrib's
collect_rollouts), bit for bit.
- Every forward pass takes all n_envs rows, the other groups' rows holding their last observations: a row's result
  depends only on its own input, and the matrix shapes (so the kernels, so the rounding) are lockstep's. A 4-row
  batch may round differently from an 8-row one (CPU kernels are chosen by shape).
- Sampling replays one draw per vector step: the generator's state is saved before group 0 samples and restored
  before each later group samples, so row i gets the random numbers lockstep gives it. Sampling 4 rows and then 4
  does not consume the generator as 8 rows at once for a Normal (torch's CPU normal_ switches to a vectorised
  Box-Muller at 16 values), though it does for a Categorical (one exponential per logit).
- A vector step is completed (the wrappers' step_wait, callbacks, timeout bootstrapping, one rollout_buffer.add for
  every env) only once every group has answered it; each group's pre-step observations, episode starts, masks and
  outputs are saved when it is launched.
- Nothing is in flight when collect_rollouts returns (so never during train()): the last vector step launches no
  group beyond the rollout, and a stop requested by a callback first receives what was sent.

Observation normalisation is refused with groups: a group acts on observations before the other groups' step is
known, and VecNormalize normalises a whole vector step with statistics that include it. Reward normalisation happens
when the vector step completes, as in lockstep, so it is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper, VecNormalize

from rl_service.core.algorithms.schemas import MAX_ENV_GROUPS

# Set on the model by use_env_groups; kept out of its saved files.
_INSTANCE_ATTRIBUTES = ("collect_rollouts", "_excluded_save_params")


@runtime_checkable
class GroupStepping(Protocol):
    """A VecEnv that steps a subset of its envs without waiting (infra's ExternalVecEnv)."""

    @property
    def supports_groups(self) -> bool:
        """Whether the envs can be stepped by subsets."""

    @property
    def groups_in_flight(self) -> int:
        """Group steps sent and not yet received."""

    def send_group(self, env_ids: np.ndarray, actions: np.ndarray) -> None:
        """Start a step of env_ids."""

    def receive_group(self) -> Any:
        """The oldest group step's answer (env_ids, observations, rewards, dones, infos)."""

    def abandon_vector_step(self) -> None:
        """Forget a vector step some groups answered and others never will (nothing may be in flight)."""


def group_stepping_env(env: VecEnv) -> GroupStepping | None:
    """The group-stepping VecEnv under env's wrappers, or None."""
    while True:
        if isinstance(env, GroupStepping):
            return env
        if not isinstance(env, VecEnvWrapper):
            return None
        env = env.venv


def check_groups_possible(env: VecEnv, groups: int) -> GroupStepping:
    """The group-stepping env under env; ValueError saying why `groups` groups cannot step it."""
    base = group_stepping_env(env)
    if base is None or not base.supports_groups:
        raise ValueError("the environment cannot step a subset of its envs (a simulation speaking protocol "
                         "version 2 can)")
    if env.num_envs % groups:
        raise ValueError(f"{env.num_envs} envs do not split evenly into {groups} groups")
    walker: VecEnv = env
    while isinstance(walker, VecEnvWrapper):
        if isinstance(walker, VecNormalize) and walker.norm_obs:
            raise ValueError("observation normalisation needs whole vector steps; normalise rewards only")
        walker = walker.venv
    return base


def use_env_groups(model: OnPolicyAlgorithm, groups: int) -> None:
    """Make `model` collect rollouts with `groups` groups of envs in flight (1: stable-baselines3's lockstep)."""
    for name in _INSTANCE_ATTRIBUTES:
        model.__dict__.pop(name, None)
    if groups == 1:
        return
    if not isinstance(model, OnPolicyAlgorithm):
        raise TypeError(f"{type(model).__name__} is not an on-policy algorithm")
    if not 1 <= groups <= MAX_ENV_GROUPS:
        raise ValueError(f"env groups must be in [1, {MAX_ENV_GROUPS}], got {groups}")
    env = model.get_env()
    if env is None:
        raise ValueError("the model has no environment")
    check_groups_possible(env, groups)
    collector = GroupedRollouts(model, groups)
    excluded = model._excluded_save_params
    model.__dict__["collect_rollouts"] = collector
    model.__dict__["_excluded_save_params"] = lambda: [*excluded(), *_INSTANCE_ATTRIBUTES]


@dataclass
class _VectorStep:
    """What the groups' launches of one vector step saved: every env's row, filled group by group."""

    observations: np.ndarray
    episode_starts: np.ndarray
    actions: np.ndarray
    clipped_actions: np.ndarray
    values: th.Tensor
    log_probs: th.Tensor
    action_masks: np.ndarray | None = None
    rng_state: th.Tensor | None = field(default=None, repr=False)  # the generator before this step's sampling


class GroupedRollouts:
    """collect_rollouts with groups in flight; called as the model's own (same arguments, same result)."""

    def __init__(self, model: OnPolicyAlgorithm, groups: int) -> None:
        self.model = model
        self.groups = groups
        self.maskable = isinstance(model, MaskablePPO)

    def __call__(self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int,
                 use_masking: bool = True) -> bool:
        """Fill rollout_buffer with n_rollout_steps vector steps; False when a callback stopped training."""
        model = self.model
        assert model._last_obs is not None, "No previous observation was provided"
        base = check_groups_possible(env, self.groups)
        use_masking = self.maskable and use_masking
        if use_masking and not is_masking_supported(env):
            raise ValueError("Environment does not support action masking. Consider using ActionMasker wrapper")
        model.policy.set_training_mode(False)
        rollout_buffer.reset()
        if model.use_sde:
            model.policy.reset_noise(env.num_envs)
        callback.on_rollout_start()

        n = env.num_envs
        size = n // self.groups
        rows = [np.arange(g * size, (g + 1) * size) for g in range(self.groups)]
        current = np.array(model._last_obs, copy=True)  # every env's latest observation, group by group
        starts = np.array(model._last_episode_starts, copy=True)
        launched: dict[int, _VectorStep] = {}

        def launch(group: int, t: int) -> None:
            step = launched.get(t)
            if step is None:
                step = launched[t] = _VectorStep(np.empty_like(current), np.empty_like(starts), np.empty(0),
                                                 np.empty(0), th.empty(0), th.empty(0))
            self._launch(env, base, step, rows[group], group, t, current, starts, use_masking)

        for group in range(self.groups):
            launch(group, 0)
        n_steps = 0
        new_obs: Any = None
        dones: Any = None
        while n_steps < n_rollout_steps:
            t = n_steps
            for group in range(self.groups):
                answer = base.receive_group()
                current[answer.env_ids] = answer.observations
                starts[answer.env_ids] = answer.dones
                if group < self.groups - 1 and t + 1 < n_rollout_steps:
                    launch(group, t + 1)  # the simulation is stepping the later groups meanwhile
            step = launched.pop(t)
            new_obs, rewards, dones, infos = env.step_wait()  # the vector step the groups assembled
            model.num_timesteps += n
            callback.update_locals(_locals(model, env, callback, rollout_buffer, n_rollout_steps, n_steps, step,
                                           new_obs, rewards, dones, infos))
            if not callback.on_step():
                self._drain(base, current, starts)
                return False
            model._update_info_buffer(infos, dones)
            n_steps += 1
            actions = step.actions
            if isinstance(model.action_space, spaces.Discrete):
                actions = actions.reshape(-1, 1)  # as stable-baselines3 stores discrete actions
            _bootstrap_timeouts(model, rewards, dones, infos)
            extra = {"action_masks": step.action_masks} if self.maskable else {}
            rollout_buffer.add(step.observations, actions, rewards, step.episode_starts, step.values,
                               step.log_probs, **extra)
            model._last_obs = new_obs
            model._last_episode_starts = dones
            if t + 1 < n_rollout_steps:
                launch(self.groups - 1, t + 1)
        with th.no_grad():
            values = model.policy.predict_values(obs_as_tensor(new_obs, model.device))
        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        if not self.maskable:  # sb3-contrib's MaskablePPO does not refresh the locals here; PPO, A2C, TRPO do
            callback.update_locals({"values": values, "dones": dones, "new_obs": new_obs})
        callback.on_rollout_end()
        return True

    def _launch(self, env: VecEnv, base: GroupStepping, step: _VectorStep, rows: np.ndarray, group: int, t: int,
                current: np.ndarray, starts: np.ndarray, use_masking: bool) -> None:
        """Act for one group (a forward pass over every env's latest observation) and send its step."""
        model = self.model
        if group == 0 and model.use_sde and model.sde_sample_freq > 0 and t % model.sde_sample_freq == 0:
            model.policy.reset_noise(env.num_envs)  # where lockstep resamples: before the vector step's forward
        step.observations[rows] = current[rows]
        step.episode_starts[rows] = starts[rows]
        masks = None
        with th.no_grad():
            obs_tensor = obs_as_tensor(current, model.device)
            if use_masking:
                masks = get_action_masks(env)
            if group == 0:
                step.rng_state = th.get_rng_state()
            else:  # the draw lockstep makes once for the whole vector step: this group's rows of it
                assert step.rng_state is not None
                th.set_rng_state(step.rng_state)
            if self.maskable:
                actions_t, values, log_probs = model.policy(obs_tensor, action_masks=masks)
            else:
                actions_t, values, log_probs = model.policy(obs_tensor)
        actions = actions_t.cpu().numpy()
        clipped = _env_actions(model, actions)
        if group == 0:
            step.actions, step.clipped_actions = np.empty_like(actions), np.empty_like(clipped)
            step.values, step.log_probs = th.empty_like(values), th.empty_like(log_probs)
            if self.maskable:
                step.action_masks = None if masks is None else np.empty_like(masks)
        step.actions[rows], step.clipped_actions[rows] = actions[rows], clipped[rows]
        step.values[rows], step.log_probs[rows] = values[rows], log_probs[rows]
        if step.action_masks is not None and masks is not None:
            step.action_masks[rows] = masks[rows]
        base.send_group(rows, clipped[rows])

    def _drain(self, base: GroupStepping, current: np.ndarray, starts: np.ndarray) -> None:
        """Receive every group step still in flight (training stops: their transitions are not kept)."""
        while base.groups_in_flight:
            answer = base.receive_group()
            current[answer.env_ids] = answer.observations
            starts[answer.env_ids] = answer.dones
        base.abandon_vector_step()
        self.model._last_obs = current
        self.model._last_episode_starts = starts


def _env_actions(model: OnPolicyAlgorithm, actions: np.ndarray) -> np.ndarray:
    """The actions sent to the env: Box actions unscaled (squashed policies) or clipped, as stable-baselines3 does."""
    if isinstance(model.action_space, spaces.Box):
        if model.policy.squash_output:
            return np.asarray(model.policy.unscale_action(actions))
        clipped: np.ndarray = np.clip(actions, model.action_space.low, model.action_space.high)
        return clipped
    return actions


def _bootstrap_timeouts(model: OnPolicyAlgorithm, rewards: np.ndarray, dones: np.ndarray,
                        infos: list[dict[str, Any]]) -> None:
    """Add the discounted value of a truncated episode's final observation to its reward (SB3 issue #633)."""
    for idx, done in enumerate(dones):
        info = infos[idx]
        if done and info.get("terminal_observation") is not None and info.get("TimeLimit.truncated", False):
            terminal_obs = model.policy.obs_to_tensor(info["terminal_observation"])[0]
            with th.no_grad():
                terminal_value = model.policy.predict_values(terminal_obs)[0]
            rewards[idx] += model.gamma * terminal_value


def _locals(model: OnPolicyAlgorithm, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer,
            n_rollout_steps: int, n_steps: int, step: _VectorStep, new_obs: Any, rewards: np.ndarray,
            dones: np.ndarray, infos: list[dict[str, Any]]) -> dict[str, Any]:
    """What a callback finds in self.locals at on_step, named as in stable-baselines3's collect_rollouts."""
    return {"self": model, "env": env, "callback": callback, "rollout_buffer": rollout_buffer,
            "n_rollout_steps": n_rollout_steps, "n_steps": n_steps, "actions": step.actions,
            "clipped_actions": step.clipped_actions, "values": step.values, "log_probs": step.log_probs,
            "action_masks": step.action_masks, "new_obs": new_obs, "rewards": rewards, "dones": dones,
            "infos": infos}

