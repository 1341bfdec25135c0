"""The on-disk format of a named policy (state.safetensors and named checkpoints): tensors plus string metadata.

Weights, Adam's state and the held tail are tensors; everything else is metadata strings (JSON where
structured). Nothing is pickled, so a file from anywhere can be loaded without running code. A PPO policy's state
(format v2) adds the critic's weights ("critic.<name>"); its optimizer slots cover the actor's parameters, then
the critic's. A REINFORCE policy's state is still written as v1, so an older server reads it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict

import torch

from rl_service.core.algorithms.reinforce_update import UpdateStats
from rl_service.core.policies.experience import Transitions
from rl_service.core.policies.live_policy import LivePolicy
from rl_service.core.policies.spec import PolicySpec, new_critic, new_net

STATE_FORMAT = "rl_service.named_policy.v1"
STATE_FORMAT_V2 = "rl_service.named_policy.v2"  # with a critic (PPO)
STATE_FORMATS = (STATE_FORMAT, STATE_FORMAT_V2)


def net_weights(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's state dict out of an encoded policy state (keys "net.<name>")."""
    return {key[len("net."):]: value for key, value in tensors.items() if key.startswith("net.")}


def critic_weights(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The critic's state dict out of an encoded PPO policy state (keys "critic.<name>"; none for REINFORCE)."""
    return {key[len("critic."):]: value for key, value in tensors.items() if key.startswith("critic.")}


def encode(policy: LivePolicy) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The policy's whole state as tensors plus string metadata (the safetensors layout; no pickle)."""
    tensors: dict[str, torch.Tensor] = {f"net.{k}": v for k, v in policy.net.state_dict().items()}
    if policy.critic is not None:
        tensors.update({f"critic.{k}": v for k, v in policy.critic.state_dict().items()})
    optimizer = policy.optimizer.state_dict()
    for index, slots in optimizer["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    tail = policy.tail
    tensors["tail.states"] = torch.as_tensor(tail.states)
    tensors["tail.actions"] = torch.as_tensor(tail.actions)
    tensors["tail.rewards"] = torch.as_tensor(tail.rewards)
    tensors["tail.dones"] = torch.as_tensor(tail.dones)
    metadata = {
        "format": STATE_FORMAT if policy.critic is None else STATE_FORMAT_V2,
        "policy_id": policy.policy_id,
        "owner": policy.owner,
        "spec": policy.spec.to_json(),
        "version": str(policy.version),
        "episodes_trained": str(policy.episodes_trained),
        "steps_trained": str(policy.steps_trained),
        "created_at": repr(policy.created_at),
        "updated_at": repr(policy.updated_at),
        "saved_at": repr(time.time()),
        "last_update": json.dumps(asdict(policy.last_update)) if policy.last_update else "",
        "optimizer_param_groups": json.dumps(optimizer["param_groups"]),
    }
    return tensors, metadata


def encode_snapshot(policy: LivePolicy) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """encode() with private copies of what an update changes in place (weights, Adam's state), so the state can
    be written after the policy's lock is released. The held tail is shared: its arrays are replaced, never
    written to."""
    tensors, metadata = encode(policy)
    return {key: value if key.startswith("tail.") else value.detach().clone()
            for key, value in tensors.items()}, metadata


def apply_state(policy: LivePolicy, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Load an encoded state into a policy of the same spec."""
    policy.net.load_state_dict(net_weights(tensors))
    if policy.critic is not None:
        policy.critic.load_state_dict(critic_weights(tensors))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    optimizer = policy.new_optimizer()
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["optimizer_param_groups"])})
    policy.optimizer = optimizer
    policy.tail = Transitions(tensors["tail.states"].numpy().copy(), tensors["tail.actions"].numpy().copy(),
                              tensors["tail.rewards"].numpy().copy(), tensors["tail.dones"].numpy().copy())
    policy.version = int(metadata["version"])
    policy.episodes_trained = int(metadata["episodes_trained"])
    policy.steps_trained = int(metadata["steps_trained"])
    last = metadata.get("last_update", "")
    policy.last_update = UpdateStats(**json.loads(last)) if last else None


def restore(policy_id: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
            versions_kept: int) -> LivePolicy:
    """A policy from its saved state."""
    if metadata.get("format") not in STATE_FORMATS:
        raise ValueError(f"unknown state format {metadata.get('format')!r}")
    spec = PolicySpec.from_json(metadata["spec"])
    # "owner" is absent from states saved before authentication existed: owned by nobody, changed by admins.
    policy = LivePolicy(policy_id, spec, new_net(spec), float(metadata["created_at"]), new_critic(spec),
                        metadata.get("owner", ""))
    apply_state(policy, tensors, metadata)
    policy.updated_at = float(metadata["updated_at"])
    policy.remember_version(versions_kept)
    return policy
