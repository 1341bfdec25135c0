"""PPO for named policies: a critic, GAE, and epochs of clipped-surrogate minibatch steps on one batch.

The actor is the REINFORCE policy network (networks.py), so what is exported is unchanged; the critic is a separate
value MLP. One Adam steps both (loss = policy loss - ent_coef * entropy + vf_coef * value loss), as
stable-baselines3's PPO does with its separate actor and critic networks. The importance ratio is taken against the
behaviour log-probabilities the caller supplies, so data collected with an older version is corrected.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rl_service.core.algorithms.networks import PolicyNet, action_distribution, mlp
from rl_service.core.algorithms.reinforce_update import UpdateStats
from rl_service.core.errors import NonFiniteUpdate


class ValueNet(nn.Module):
    """Observations (batch, obs_dim) -> state values (batch,)."""

    def __init__(self, obs_dim: int, hidden: Sequence[int], activation: type[nn.Module]) -> None:
        super().__init__()
        self.body, width = mlp(obs_dim, hidden, activation)
        self.head = nn.Linear(width, 1)
        _orthogonal(self.body, math.sqrt(2))
        _orthogonal(self.head, 1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """State values."""
        out: torch.Tensor = self.head(self.body(obs)).squeeze(-1)
        return out


def _orthogonal(module: nn.Module, gain: float) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, gain=gain)
            nn.init.zeros_(layer.bias)


def ppo_init(actor: PolicyNet) -> None:
    """stable-baselines3's initialisation: orthogonal, gain sqrt(2) in the body and 0.01 in the action head, so
    the first policy is near uniform (PPO learns noticeably faster from it than from PyTorch's default)."""
    _orthogonal(actor.body, math.sqrt(2))
    _orthogonal(actor.head, 0.01)


@dataclass(frozen=True)
class PpoSettings:
    """PPO's hyperparameters, typed."""

    n_epochs: int = 10
    batch_size: int = 64
    clip_range: float = 0.2
    gamma: float = 0.99
    gae_lambda: float = 0.95
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float | None = 0.5
    target_kl: float | None = None
    normalize_advantage: bool = True


@dataclass(frozen=True)
class PpoBatch:
    """One batch in order: states (n, obs), actions, rewards, dones, truncated (n,), behaviour log-probs (n,).

    The last transition, when not done, was cut by the batch's end: like a truncated one it is bootstrapped.
    """

    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    truncated: np.ndarray
    log_probs: np.ndarray

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


def gae(rewards: np.ndarray, values: np.ndarray, dones: np.ndarray, truncated: np.ndarray, gamma: float,
        lam: float) -> np.ndarray:
    """Generalised advantage estimates (float64) over one batch of consecutive transitions.

    A transition followed by its episode's next one bootstraps with that state's value; a terminated one with 0.
    A truncated one, and the batch's last when not done, bootstrap with their own state's value: the next
    observation is not sent, and V(s_t) is the closest estimate of V(s_{t+1}) there is.
    """
    n = len(rewards)
    advantages = np.zeros(n, dtype=np.float64)
    running = 0.0
    for t in range(n - 1, -1, -1):
        ends = bool(dones[t]) or t == n - 1
        if not ends:
            next_value = float(values[t + 1])
        elif dones[t] and not truncated[t]:
            next_value = 0.0
        else:
            next_value = float(values[t])
        if ends:
            running = 0.0
        delta = float(rewards[t]) + gamma * next_value - float(values[t])
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages


def explained_variance(predicted: np.ndarray, target: np.ndarray) -> float:
    """1 - Var(target - predicted) / Var(target): 1 is perfect, 0 no better than a constant (0 when Var is 0)."""
    variance = float(np.var(target))
    return 0.0 if variance == 0.0 else float(1.0 - np.var(target - predicted) / variance)


def ppo_update(actor: PolicyNet, critic: ValueNet, optimizer: torch.optim.Optimizer, batch: PpoBatch,
               settings: PpoSettings, generator: torch.Generator) -> UpdateStats:
    """n_epochs of shuffled minibatch steps on the batch; on a non-finite loss or gradient nothing changes."""
    if len(batch) == 0:
        raise ValueError("ppo_update needs at least one transition")
    obs = torch.as_tensor(batch.states, dtype=torch.float32)
    actions = torch.as_tensor(batch.actions)
    old_log_probs = torch.as_tensor(batch.log_probs, dtype=torch.float32)
    with torch.no_grad():
        values = critic(obs).double().numpy()
    advantages_np = gae(batch.rewards, values, batch.dones, batch.truncated, settings.gamma, settings.gae_lambda)
    returns_np = advantages_np + values
    advantages = torch.as_tensor(advantages_np, dtype=torch.float32)
    returns = torch.as_tensor(returns_np, dtype=torch.float32)
    # The update takes many optimizer steps: a NaN in a late one must not leave the earlier ones applied.
    saved = (copy.deepcopy(actor.state_dict()), copy.deepcopy(critic.state_dict()),
             copy.deepcopy(optimizer.state_dict()))
    try:
        totals = _epochs(actor, critic, optimizer, obs, actions, old_log_probs, advantages, returns, settings,
                         generator)
    except NonFiniteUpdate:
        actor.load_state_dict(saved[0])
        critic.load_state_dict(saved[1])
        optimizer.load_state_dict(saved[2])
        optimizer.zero_grad()
        raise
    steps = max(totals.pop("minibatches"), 1.0)
    means = {key: value / steps for key, value in totals.items()}
    episode_ends = np.flatnonzero(batch.dones)
    starts = np.concatenate([[0], episode_ends[:-1] + 1]) if len(episode_ends) else np.zeros(0, dtype=np.int64)
    episode_returns = [float(batch.rewards[s:e + 1].sum()) for s, e in zip(starts, episode_ends, strict=True)]
    return UpdateStats(
        loss=means["loss"], policy_loss=means["policy_loss"], entropy=means["entropy"],
        episodes=len(episode_returns), steps=len(batch),
        mean_return=float(np.mean(episode_returns)) if episode_returns else 0.0,
        grad_norm=means["grad_norm"], value_loss=means["value_loss"], approx_kl=means["approx_kl"],
        clip_fraction=means["clip_fraction"], explained_variance=explained_variance(values, returns_np))


def _epochs(actor: PolicyNet, critic: ValueNet, optimizer: torch.optim.Optimizer, obs: torch.Tensor,
            actions: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
            settings: PpoSettings, generator: torch.Generator) -> dict[str, float]:
    """The minibatch steps; sums of each metric over them, and their count."""
    n = int(obs.shape[0])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    clip = settings.clip_range
    totals = dict.fromkeys(("loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction",
                            "grad_norm", "minibatches"), 0.0)
    for _ in range(settings.n_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.batch_size):
            index = order[start:start + settings.batch_size]
            advantage = advantages[index]
            if settings.normalize_advantage and len(index) > 1:
                advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
            distribution = action_distribution(actor, obs[index])
            log_ratio = distribution.log_prob(actions[index]) - old_log_probs[index]
            ratio = log_ratio.exp()
            policy_loss = -torch.min(advantage * ratio, advantage * ratio.clamp(1 - clip, 1 + clip)).mean()
            value_loss = torch.nn.functional.mse_loss(critic(obs[index]), returns[index])
            entropy = distribution.entropy().mean()
            loss = policy_loss - settings.ent_coef * entropy + settings.vf_coef * value_loss
            if not torch.isfinite(loss):
                raise NonFiniteUpdate(f"batch: the PPO loss is {loss.item()} (policy loss {policy_loss.item()}, "
                                      f"value loss {value_loss.item()}, entropy {entropy.item()}); the update was "
                                      f"discarded; {NonFiniteUpdate.HINT}")
            with torch.no_grad():
                approx_kl = float(((ratio - 1) - log_ratio).mean())
                clip_fraction = float(((ratio - 1).abs() > clip).float().mean())
            if settings.target_kl is not None and approx_kl > 1.5 * settings.target_kl:
                return totals  # stable-baselines3's early stop: this step and the rest of the epochs are skipped
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            limit = settings.max_grad_norm if settings.max_grad_norm else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
            if not math.isfinite(grad_norm):
                raise NonFiniteUpdate(f"batch: the PPO gradient norm is {grad_norm}; the update was discarded; "
                                      f"{NonFiniteUpdate.HINT}")
            optimizer.step()
            for key, value in (("loss", loss.item()), ("policy_loss", policy_loss.item()),
                               ("value_loss", value_loss.item()), ("entropy", entropy.item()),
                               ("approx_kl", approx_kl), ("clip_fraction", clip_fraction),
                               ("grad_norm", grad_norm), ("minibatches", 1.0)):
                totals[key] += float(value)
    return totals
