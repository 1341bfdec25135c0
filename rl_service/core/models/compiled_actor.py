"""The one program a run's policy is served and exported as: raw float32 observations (+ an optional action mask)
-> the actions stable-baselines3's predict(deterministic=True) gives.

CompiledActor = ObservationNormalizer (VecNormalize's statistics, when the run trained with them) -> a core (the
policy's own network up to its action scores: logits, Q-values or the mean action; actor_cores.py) -> ActionHead
(mask, argmax or mode, reshape, Box clipping or unscaling). actor_program.py compiles it to TorchScript (the core
traced, the rest scripted) once per model file; Act, ActBatch and the torchscript export all run that program, and
the onnx export is this module exported, so no export re-implements the policy.

This module does not use `from __future__ import annotations`: TorchScript reads these annotations at run time.
"""

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from rl_service.core.models.normalization import NormalizeStats

# Head kinds: how scores become actions.
PROBS_ARGMAX = "probs_argmax"  # categorical logits: argmax of the normalised probabilities, as Categorical.mode()
ARGMAX = "argmax"  # Q-values, or REINFORCE's logits: argmax of the scores themselves
MULTI_ARGMAX = "multi_argmax"  # MultiDiscrete logits, back to back
BERNOULLI = "bernoulli"  # MultiBinary logits
VALUE = "value"  # the core already gives the (mean) action: Box spaces
MASKABLE_KINDS = (PROBS_ARGMAX, ARGMAX)


class ObservationNormalizer(nn.Module):
    """VecNormalize's observation normalisation in torch, in float64 as numpy does it; identity when disabled."""

    enabled: bool
    clip: float
    epsilon: float
    mean: Tensor
    var: Tensor

    def __init__(self, stats: NormalizeStats | None) -> None:
        super().__init__()
        self.enabled = stats is not None and bool(stats.norm_obs)
        mean = stats.obs_mean if stats is not None and self.enabled else np.zeros(1)
        var = stats.obs_var if stats is not None and self.enabled else np.ones(1)
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float64)))
        self.register_buffer("var", torch.as_tensor(np.asarray(var, dtype=np.float64)))
        self.clip = float(stats.clip_obs) if stats is not None else 0.0
        self.epsilon = float(stats.epsilon) if stats is not None else 0.0

    def forward(self, obs: Tensor) -> Tensor:
        """Raw observations in, what the policy saw in training out."""
        if not self.enabled:
            return obs
        scaled = (obs.to(torch.float64) - self.mean) / torch.sqrt(self.var + self.epsilon)
        return torch.clamp(scaled, -self.clip, self.clip).to(torch.float32)


class ActionHead(nn.Module):
    """Scores -> actions: the mask, the distribution's mode, the action's shape, Box clipping or unscaling."""

    kind: str
    unscale: bool
    clip: bool
    split: list[int]
    action_shape: list[int]
    low: Tensor
    high: Tensor

    def __init__(self, kind: str, action_space: gym.Space[Any], squash_output: bool,
                 split: list[int] | None = None) -> None:
        super().__init__()
        self.kind = kind
        box = isinstance(action_space, gym.spaces.Box)
        self.unscale = box and squash_output  # tanh-squashed in [-1, 1]: rescaled to the space, as unscale_action
        self.clip = box and not squash_output  # an unbounded Gaussian's mean: clipped, as predict() does
        self.split = list(split or [])
        self.action_shape = [int(d) for d in (action_space.shape or ())]
        low = np.asarray(getattr(action_space, "low", 0.0) if box else 0.0, dtype=np.float32)
        high = np.asarray(getattr(action_space, "high", 0.0) if box else 0.0, dtype=np.float32)
        self.register_buffer("low", torch.as_tensor(low))
        self.register_buffer("high", torch.as_tensor(high))

    def select(self, scores: Tensor, action_mask: Tensor | None) -> Tensor:
        """The deterministic action for each row of scores; masked actions get -inf and are never chosen."""
        if action_mask is not None:
            scores = scores.masked_fill(torch.logical_not(action_mask), float("-inf"))
        # Literals, not the module's constants: TorchScript cannot read global strings.
        if self.kind == "probs_argmax":
            return _probs_argmax(scores)
        if self.kind == "argmax":
            return scores.argmax(dim=1)
        if self.kind == "multi_argmax":
            return torch.stack([_probs_argmax(part) for part in torch.split(scores, self.split, dim=1)], dim=1)
        if self.kind == "bernoulli":
            return torch.round(torch.sigmoid(scores))
        return scores

    def finish(self, actions: Tensor) -> Tensor:
        """Shape the batch as the action space and bring Box actions into it."""
        actions = actions.reshape([-1] + self.action_shape)  # noqa: RUF005 (TorchScript has no starred lists)
        if self.unscale:
            return self.low + 0.5 * (actions + 1.0) * (self.high - self.low)
        if self.clip:
            return torch.clamp(actions, self.low, self.high)
        return actions


def _probs_argmax(logits: Tensor) -> Tensor:
    # The operations of torch's Categorical: normalise the logits, softmax, then argmax of the probabilities.
    return torch.softmax(logits - logits.logsumexp(dim=-1, keepdim=True), dim=-1).argmax(dim=1)


class CompiledActor(nn.Module):
    """Raw observations [batch, *observation_shape] (+ an optional bool mask [batch, n]) -> actions."""

    def __init__(self, normalizer: ObservationNormalizer, core: nn.Module, head: ActionHead) -> None:
        super().__init__()
        self.normalizer = normalizer
        self.core = core
        self.head = head

    def forward(self, obs: Tensor, action_mask: Tensor | None = None) -> Tensor:
        """The deterministic actions for a batch of raw observations."""
        scores = self.core(self.normalizer(obs))
        return self.head.finish(self.head.select(scores, action_mask))
