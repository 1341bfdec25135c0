"""One model file made ready to serve: weights read without unpickling, the policy rebuilt, compiled into the
CompiledActor that Act, ActBatch and every export run."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from rl_service.core.models.actor_cores import ActorParts, Sampler, actor_parts
from rl_service.core.models.actor_program import check_inputs, script_actor
from rl_service.core.models.compiled_actor import MASKABLE_KINDS, ActionHead, CompiledActor, ObservationNormalizer
from rl_service.core.models.normalization import NormalizeStats, load_stats, stats_path
from rl_service.core.models.policy_weights import (
    IncompatibleModel,
    PolicyBuild,
    load_weights,
    read_policy_state,
    rebuild_policy,
)


@dataclass(frozen=True)
class ServedPolicy:
    """A compiled actor, how it samples, and the spaces it acts in."""

    actor: CompiledActor
    sampler: Sampler
    observation_space: gym.Space[Any]
    action_space: gym.Space[Any]
    trained_with_masks: bool  # MaskablePPO: its ONNX export takes the mask as a second input
    normalized: bool  # raw observations are normalised with the run's statistics first
    # A separate copy of the actor with the same weights, for exports: tracing and exporting never touch the one
    # Act is running (deepcopy cannot copy every policy: gSDE keeps non-leaf tensors).
    fresh_actor: Callable[[], CompiledActor]
    # The actor as TorchScript (actor_program.py): what deterministic Act runs and the torchscript export holds,
    # at about half the eager module's per-call cost; None when scripting failed (Act then runs the eager actor).
    program: torch.jit.ScriptModule | None = None
    program_error: str = ""

    @property
    def maskable(self) -> bool:
        """True when requests may carry action masks (Discrete action spaces)."""
        return self.actor.head.kind in MASKABLE_KINDS

    def act(self, observations: np.ndarray, mask: np.ndarray | None, deterministic: bool) -> np.ndarray:
        """Actions for a batch of checked observations (and a checked [batch, n] bool mask)."""
        obs = torch.as_tensor(observations, dtype=torch.float32)
        mask_tensor = None if mask is None else torch.as_tensor(mask, dtype=torch.bool)
        with torch.inference_mode():
            if deterministic:
                actions = (self.program or self.actor)(obs, mask_tensor)
            else:
                head = self.actor.head
                actions = head.finish(self.sampler(self.actor.normalizer(obs), mask_tensor))
        result: np.ndarray = actions.numpy()
        return result


def load_served_policy(path: Path, build: PolicyBuild, require_stats: bool) -> ServedPolicy:
    """Read the model file at `path` and compile it; FileNotFoundError when gone, IncompatibleModel when it does not
    fit the run (its weights, or statistics a run trained with `normalize` must have beside it)."""
    state = read_policy_state(path)
    policy, algorithm = rebuild_policy(build)
    load_weights(policy, state, path.name)
    policy.requires_grad_(False)  # actions then carry no autograd history
    stats = _stats_beside(path, build.observation_space, require_stats)
    # DQN and QR-DQN sample epsilon-greedily at the rate training ends at (actor_cores.py).
    epsilon = float(getattr(algorithm, "exploration_final_eps", 0.0))

    def fresh_actor() -> CompiledActor:
        twin, _ = rebuild_policy(build)
        twin.load_state_dict(policy.state_dict())
        twin.requires_grad_(False)
        # The eager actor only: scripting it again for each ONNX export kept every program's types in torch.jit's
        # global compilation unit, about 1.8 MiB per export (benchmarks/results/findings/fuzz.md).
        return build_actor(twin, build.action_space, stats, epsilon)[0]

    return compile_policy(policy, build.observation_space, build.action_space, stats, epsilon, fresh_actor)


def compile_policy(policy: Any, observation_space: gym.Space[Any], action_space: gym.Space[Any],
                   stats: NormalizeStats | None, epsilon: float = 0.0,
                   fresh_actor: Callable[[], CompiledActor] | None = None) -> ServedPolicy:
    """The CompiledActor of a policy already holding its weights (tests build policies directly)."""
    actor, parts = build_actor(policy, action_space, stats, epsilon)
    maskable = parts.kind in MASKABLE_KINDS
    program, error = None, ""
    try:
        program = script_actor(actor, check_inputs(observation_space, action_space, maskable))
    except Exception as exc:  # a layer TorchScript cannot trace, or a program that acts otherwise: serve eagerly
        error = (str(exc).strip().splitlines() or [""])[0][:300] or type(exc).__name__
    return ServedPolicy(actor, parts.sampler, observation_space, action_space, parts.trained_with_masks,
                        actor.normalizer.enabled, fresh_actor or (lambda: copy.deepcopy(actor)), program, error)


def build_actor(policy: Any, action_space: gym.Space[Any], stats: NormalizeStats | None,
                epsilon: float = 0.0) -> tuple[CompiledActor, ActorParts]:
    """The eager CompiledActor of a policy holding its weights (not scripted), with the parts it was built from."""
    parts = actor_parts(policy, action_space, epsilon)
    head = ActionHead(parts.kind, action_space, parts.squash_output, parts.split)
    return CompiledActor(ObservationNormalizer(stats), parts.core, head).eval(), parts


def _stats_beside(path: Path, observation_space: gym.Space[Any], required: bool) -> NormalizeStats | None:
    """The normalisation statistics saved beside a model file, if any."""
    beside = stats_path(path)
    if not beside.exists():
        if required:  # written just after the model, or lost: serving without them would act on the wrong inputs
            raise IncompatibleModel(f"{path.name}: the run trained with normalize, and {beside.name} is missing",
                                    field="run_id")
        return None
    try:
        stats = load_stats(beside)
    except ValueError as exc:
        raise IncompatibleModel(str(exc), field="run_id") from None
    shape = tuple(observation_space.shape or ())
    if stats.norm_obs and (stats.obs_mean.shape != shape or stats.obs_var.shape != shape):
        raise IncompatibleModel(f"{beside.name}: statistics of shape {stats.obs_mean.shape} for observations of "
                                f"shape {shape}", field="run_id")
    return stats
