"""Each policy family's network up to its action scores (the core of a CompiledActor), and how it samples.

A core is a thin module over the policy's own submodules (stable-baselines3's preprocessing and feature
extractor included), so its output is what the library computes: categorical logits, Q-values (QR-DQN: the mean
over quantiles), or the mean action (tanh-squashed for SAC, TQC and squashed gSDE). None of them touches the
policy's shared distribution objects, which keep per-call state and would race between concurrent Act calls.

Sampling (deterministic=false) draws from the same distribution the policy trains with: Categorical, Bernoulli,
diagonal Gaussian (gSDE: its per-state marginal), tanh-squashed Gaussian. DQN and QR-DQN have no distribution: as
stable-baselines3's predict() they act epsilon-greedily, with the run's exploration_final_eps (the rate training
ended at), picking a uniformly random *legal* action when exploring. TD3 and DDPG act deterministically in both
modes, as predict() does (their exploration noise belongs to training).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import torch
from stable_baselines3.common import distributions as dists
from stable_baselines3.common.policies import ActorCriticPolicy, BaseModel
from stable_baselines3.dqn.policies import DQNPolicy
from stable_baselines3.sac.policies import SACPolicy
from stable_baselines3.td3.policies import TD3Policy
from torch import Tensor, nn

from rl_service.core.algorithms.networks import CategoricalPolicyNet
from rl_service.core.algorithms.reinforce import ReinforcePolicy
from rl_service.core.models.compiled_actor import ARGMAX, BERNOULLI, MULTI_ARGMAX, PROBS_ARGMAX, VALUE
from rl_service.core.models.policy_weights import IncompatibleModel

# (normalised observations, mask or None) -> raw actions, before ActionHead.finish
Sampler = Callable[[Tensor, Tensor | None], Tensor]


@dataclass(frozen=True)
class ActorParts:
    """A policy's core, head kind and sampler, and whether it was trained with action masks."""

    core: nn.Module
    kind: str
    sampler: Sampler
    squash_output: bool
    split: list[int]
    trained_with_masks: bool = False


class _ActorCriticCore(nn.Module):
    """PPO, A2C, TRPO, MaskablePPO: the actor's half of the network, then action_net."""

    def __init__(self, policy: Any, tanh: bool) -> None:
        super().__init__()
        self.policy = policy
        self.tanh = tanh

    def latent(self, obs: Tensor) -> Tensor:
        """The actor's latent code."""
        features = BaseModel.extract_features(self.policy, obs, self.policy.pi_features_extractor)
        latent: Tensor = self.policy.mlp_extractor.forward_actor(features)
        return latent

    def forward(self, obs: Tensor) -> Tensor:
        out: Tensor = self.policy.action_net(self.latent(obs))
        return torch.tanh(out) if self.tanh else out


class _QCore(nn.Module):
    """DQN: Q-values."""

    def __init__(self, q_net: nn.Module) -> None:
        super().__init__()
        self.q_net = q_net

    def forward(self, obs: Tensor) -> Tensor:
        out: Tensor = self.q_net(obs)
        return out


class _QuantileCore(nn.Module):
    """QR-DQN: the mean of each action's quantiles."""

    def __init__(self, quantile_net: nn.Module) -> None:
        super().__init__()
        self.quantile_net = quantile_net

    def forward(self, obs: Tensor) -> Tensor:
        out: Tensor = self.quantile_net(obs).mean(dim=1)
        return out


class _SquashedActorCore(nn.Module):
    """SAC, TQC: tanh of the Gaussian's mean (the squashed distribution's mode)."""

    def __init__(self, actor: Any) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, obs: Tensor) -> Tensor:
        mean, _, _ = self.actor.get_action_dist_params(obs)
        return torch.tanh(mean)


class _DeterministicActorCore(nn.Module):
    """TD3, DDPG: the actor's output, already tanh-squashed."""

    def __init__(self, actor: nn.Module) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, obs: Tensor) -> Tensor:
        out: Tensor = self.actor(obs)
        return out


class _ReinforceCore(nn.Module):
    """REINFORCE: logits (greedy: their argmax) or the Gaussian's mean."""

    def __init__(self, policy: ReinforcePolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, obs: Tensor) -> Tensor:
        features = self.policy.features(obs)
        net = self.policy.net
        if isinstance(net, CategoricalPolicyNet):
            return net.logits(features)
        mean: Tensor = net(features)[0]
        return mean


def actor_parts(policy: Any, action_space: gym.Space[Any], epsilon: float) -> ActorParts:
    """The core, head kind and sampler for a policy; IncompatibleModel for a policy class it does not know."""
    if isinstance(policy, DQNPolicy):
        return _greedy(_QCore(policy.q_net), action_space, epsilon)
    if type(policy).__name__ == "QRDQNPolicy":  # sb3-contrib, imported lazily by its algorithm
        return _greedy(_QuantileCore(policy.quantile_net), action_space, epsilon)
    if isinstance(policy, SACPolicy) or type(policy).__name__ == "TQCPolicy":
        return ActorParts(_SquashedActorCore(policy.actor), VALUE, _squashed_sampler(policy.actor), True, [])
    if isinstance(policy, TD3Policy):
        core = _DeterministicActorCore(policy.actor)
        return ActorParts(core, VALUE, lambda obs, mask: core(obs), True, [])
    if isinstance(policy, ReinforcePolicy):
        return _reinforce(policy)
    if isinstance(policy, ActorCriticPolicy) or type(policy).__name__ == "MaskableActorCriticPolicy":
        return _actor_critic(policy)
    raise IncompatibleModel(f"{type(policy).__name__} policies cannot be served", field="run_id")


def _greedy(core: nn.Module, action_space: gym.Space[Any], epsilon: float) -> ActorParts:
    n = int(action_space.n)  # type: ignore[attr-defined]

    def sample(obs: Tensor, mask: Tensor | None) -> Tensor:
        scores = core(obs)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        greedy = scores.argmax(dim=1)
        legal = mask.to(torch.float32) if mask is not None else torch.ones(len(obs), n)
        random = torch.multinomial(legal, 1).squeeze(1)
        explore = torch.rand(len(obs)) < epsilon
        return torch.where(explore, random, greedy)

    return ActorParts(core, ARGMAX, sample, False, [])


def _categorical_sampler(core: nn.Module) -> Sampler:
    def sample(obs: Tensor, mask: Tensor | None) -> Tensor:
        logits = core(obs)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(1)

    return sample


def _actor_critic(policy: Any) -> ActorParts:
    dist = policy.action_dist
    name = type(dist).__name__
    masked = name.startswith("Maskable")
    if name.endswith("MultiCategoricalDistribution"):
        split = [int(n) for n in dist.action_dims]
        core = _ActorCriticCore(policy, tanh=False)

        def multi(obs: Tensor, mask: Tensor | None) -> Tensor:
            parts = torch.split(core(obs), split, dim=1)
            return torch.stack([torch.multinomial(torch.softmax(p, dim=-1), 1).squeeze(1) for p in parts], dim=1)

        return ActorParts(core, MULTI_ARGMAX, multi, False, split, masked)
    if name.endswith("CategoricalDistribution"):
        core = _ActorCriticCore(policy, tanh=False)
        return ActorParts(core, PROBS_ARGMAX, _categorical_sampler(core), False, [], masked)
    if name.endswith("BernoulliDistribution"):
        core = _ActorCriticCore(policy, tanh=False)
        return ActorParts(core, BERNOULLI, lambda obs, mask: torch.bernoulli(torch.sigmoid(core(obs))), False, [],
                          masked)
    if isinstance(dist, dists.StateDependentNoiseDistribution):
        tanh = dist.bijector is not None
        core = _ActorCriticCore(policy, tanh=tanh)

        def sde(obs: Tensor, mask: Tensor | None) -> Tensor:
            latent = core.latent(obs)
            mean = policy.action_net(latent)
            std = torch.sqrt(torch.mm(latent**2, dist.get_std(policy.log_std) ** 2) + dist.epsilon)
            action = mean + std * torch.randn_like(mean)
            return torch.tanh(action) if tanh else action

        return ActorParts(core, VALUE, sde, bool(policy.squash_output), [])
    if isinstance(dist, dists.DiagGaussianDistribution):
        core = _ActorCriticCore(policy, tanh=False)

        def gaussian(obs: Tensor, mask: Tensor | None) -> Tensor:
            mean: Tensor = core(obs)
            std: Tensor = torch.exp(policy.log_std)
            return mean + std * torch.randn_like(mean)

        return ActorParts(core, VALUE, gaussian, bool(policy.squash_output), [])
    raise IncompatibleModel(f"action distribution {name} cannot be served", field="run_id")


def _squashed_sampler(actor: Any) -> Sampler:
    def sample(obs: Tensor, mask: Tensor | None) -> Tensor:
        mean, log_std, extra = actor.get_action_dist_params(obs)
        if actor.use_sde:
            latent = extra["latent_sde"]
            dist = actor.action_dist
            std = torch.sqrt(torch.mm(latent**2, dist.get_std(log_std) ** 2) + dist.epsilon)
        else:
            std = torch.exp(log_std)
        return torch.tanh(mean + std * torch.randn_like(mean))

    return sample


def _reinforce(policy: ReinforcePolicy) -> ActorParts:
    core = _ReinforceCore(policy)
    if isinstance(policy.net, CategoricalPolicyNet):
        return ActorParts(core, ARGMAX, _categorical_sampler(core), False, [])

    def gaussian(obs: Tensor, mask: Tensor | None) -> Tensor:
        mean, std = policy.net(policy.features(obs))
        sample: Tensor = mean + std * torch.randn_like(mean)
        return sample

    return ActorParts(core, VALUE, gaussian, False, [])
