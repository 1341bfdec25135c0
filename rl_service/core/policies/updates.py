"""One batch's update of a named policy, per algorithm, run under the policy's lock by the manager: REINFORCE over
the episodes the batch completes (an unfinished one is held for the next batch), PPO over all of its transitions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from rl_service.core.algorithms.hyperparams import HyperValue
from rl_service.core.algorithms.networks import PolicyNet, action_distribution
from rl_service.core.algorithms.ppo_update import PpoBatch, ValueNet, ppo_update
from rl_service.core.algorithms.reinforce_update import UpdateStats, reinforce_update
from rl_service.core.errors import CapacityExceeded, InvalidRequest
from rl_service.core.policies.experience import Transitions, split_episodes
from rl_service.core.policies.live_policy import LivePolicy, split_weights
from rl_service.core.policies.ppo_batch import check_behaviour_version, ppo_settings
from rl_service.core.policies.spec import new_net
from rl_service.core.policies.transactions import Rollback


@dataclass(frozen=True)
class BatchSteps:
    """How the manager records a change: commit (a new revision, maybe version), persist (a held tail), and
    whether saves happen behind the reply (background) or before it."""

    commit: Callable[[LivePolicy, bool, bool], None]  # (policy, new_version, at_once)
    persist: Callable[[LivePolicy, bool], None]  # (policy, at_once)
    behind: bool


def reinforce_batch(policy: LivePolicy, batch: Transitions, flush: bool, max_pending_steps: int,
                    steps: BatchSteps) -> UpdateStats | None:
    """A REINFORCE policy's batch, under its lock: the update's stats, None when the batch was only held."""
    joined = policy.tail.concat(batch) if len(policy.tail) else batch
    episodes, tail = split_episodes(joined)
    if len(tail) > max_pending_steps:
        raise CapacityExceeded(
            f"dones: the unfinished episode would hold {len(tail)} transitions, over the limit of "
            f"{max_pending_steps}; end episodes with done=true", field="dones")
    if not episodes:
        if flush:
            raise InvalidRequest(
                f"dones: flush was asked but the batch (after {len(policy.tail)} held transitions) "
                "completes no episode; mark the episode's last transition done", field="dones")
        with Rollback(policy, tensors=not steps.behind):
            # The model did not change: no new revision, so subscribers are not told of it again.
            policy.tail = tail
            policy.updated_at = time.time()
            steps.persist(policy, not steps.behind)
        stats = None
    else:
        gamma, beta = float(policy.values["gamma"]), float(policy.values["beta"])  # type: ignore[arg-type]
        with Rollback(policy, tensors=not steps.behind):
            stats = reinforce_update(policy.net, policy.optimizer, episodes, gamma, beta,
                                     _optional_float(policy.values["max_grad_norm"]))
            policy.tail = tail
            policy.episodes_trained += stats.episodes
            policy.steps_trained += stats.steps
            policy.last_update = stats
            steps.commit(policy, True, not steps.behind)
    return stats


def ppo_batch_update(policy: LivePolicy, batch: Transitions, truncated: np.ndarray,
                     client_log_probs: np.ndarray | None, behaviour_version: int | None,
                     steps: BatchSteps) -> UpdateStats:
    """A PPO policy's batch, under its lock: one update on all of its transitions.

    Nothing is held: an episode the batch leaves unfinished is trained on now, its last transition bootstrapped
    with the critic's value of its own state (the next state is the next batch's first, not yet known), and
    the next batch's transitions continue it. Holding would be exact for that one transition but would delay
    the whole unfinished episode; an advantage estimate needs no complete episode, as REINFORCE's return does.
    """
    assert policy.critic is not None
    if client_log_probs is not None:
        behaviour = client_log_probs
    else:
        behaviour = behaviour_log_probs(policy, batch, behaviour_version)
    ppo_batch = PpoBatch(batch.states, batch.actions, batch.rewards, batch.dones, truncated, behaviour)
    # Minibatch order from the seed and the version: a replayed sequence of batches trains the same weights.
    generator = torch.Generator().manual_seed(policy.spec.seed * 1_000_003 + policy.version)
    with Rollback(policy, tensors=not steps.behind):  # ppo_update restores the tensors itself when it raises
        stats = ppo_update(policy.net, policy.critic, policy.optimizer, ppo_batch, ppo_settings(policy.values),
                           generator)
        policy.episodes_trained += stats.episodes
        policy.steps_trained += stats.steps
        policy.last_update = stats
        steps.commit(policy, True, not steps.behind)
    return stats


def behaviour_log_probs(policy: LivePolicy, batch: Transitions, behaviour_version: int | None) -> np.ndarray:
    """The batch's log-probabilities under the version the client acted with (default: the current one)."""
    if behaviour_version is None or behaviour_version == policy.version:
        return log_probs_of(policy.net, batch)[0]
    check_behaviour_version(behaviour_version, policy.version, list(policy.recent))
    net = new_net(policy.spec)
    net.load_state_dict(split_weights(policy.recent[behaviour_version])[0])
    return log_probs_of(net, batch)[0]


def log_probs_of(net: PolicyNet, batch: Transitions) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities of the batch's actions and the policy's entropies in its states."""
    with torch.no_grad():
        distribution = action_distribution(net, torch.as_tensor(batch.states))
        return (distribution.log_prob(torch.as_tensor(batch.actions)).numpy(),
                distribution.entropy().numpy())


def values_of(critic: ValueNet | None, batch: Transitions) -> np.ndarray:
    """The critic's values of the batch's states; empty without a critic."""
    if critic is None:
        return np.zeros(0, dtype=np.float32)
    with torch.no_grad():
        values: np.ndarray = critic(torch.as_tensor(batch.states)).numpy()
    return values


def _optional_float(value: HyperValue) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]
