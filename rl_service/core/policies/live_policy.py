"""One named policy's mutable state in memory: network (and PPO's critic), optimizer, version, held tail, recent
versions."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from rl_service.core.algorithms.networks import PolicyNet
from rl_service.core.algorithms.ppo_update import ValueNet
from rl_service.core.algorithms.reinforce_update import UpdateStats
from rl_service.core.models.policy_exporters import torchscript_bytes
from rl_service.core.policies.experience import Transitions
from rl_service.core.policies.records import PolicySnapshot
from rl_service.core.policies.spec import PolicySpec

CRITIC_PREFIX = "critic."  # a kept version's critic weights, beside the actor's (whose keys have no such prefix)


class LivePolicy:
    """One policy's mutable state; every access holds `lock`."""

    def __init__(self, policy_id: str, spec: PolicySpec, net: PolicyNet, created_at: float,
                 critic: ValueNet | None = None, owner: str = "") -> None:
        self.policy_id = policy_id
        self.owner = owner  # the token name that created it; never changes
        self.spec = spec
        self.shape = spec.shape
        self.values = spec.values()
        self.net = net
        self.critic = critic  # PPO's value network; None for REINFORCE
        self.optimizer = self.new_optimizer()
        self.version = 0
        self.tail = Transitions.empty(self.shape)
        self.episodes_trained = 0
        self.steps_trained = 0
        self.last_update: UpdateStats | None = None
        self.created_at = created_at
        self.updated_at = created_at
        self.revision = 0  # changes on every state change, including a checkpoint load that lowers the version
        self.change = 0  # +1 on every change saved to disk, held tails included: orders the writer's snapshots
        self.deleted = False
        self.recent: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self.torchscript: tuple[int, bytes] | None = None
        self.lock = threading.Lock()

    def new_optimizer(self) -> torch.optim.Optimizer:
        """A fresh Adam over the network's parameters (then the critic's, for PPO)."""
        lr = float(self.values["learning_rate"])  # type: ignore[arg-type]
        if self.critic is None:
            return torch.optim.Adam(self.net.parameters(), lr=lr)
        # eps 1e-5 as stable-baselines3's PPO; the actor's parameters come first, so their optimizer slots keep
        # the indices a REINFORCE policy of the same architecture has.
        return torch.optim.Adam([*self.net.parameters(), *self.critic.parameters()], lr=lr, eps=1e-5)

    def snapshot(self, durable_version: int, created: bool = False) -> PolicySnapshot:
        """The public view."""
        return PolicySnapshot(self.policy_id, self.spec, self.version, len(self.tail), self.episodes_trained,
                              self.steps_trained, self.last_update, self.created_at, self.updated_at, durable_version,
                              created, self.owner)

    def torchscript_now(self) -> bytes:
        """TorchScript of the current weights, cached per revision."""
        if self.torchscript is None or self.torchscript[0] != self.revision:
            self.torchscript = (self.revision, torchscript_bytes(self.net))
        return self.torchscript[1]

    def remember_version(self, keep: int) -> None:
        """Keep the current weights (the critic's under CRITIC_PREFIX) under the current version, for
        ComputeLogProb and PPO's behaviour_version."""
        weights = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        if self.critic is not None:
            weights.update({CRITIC_PREFIX + k: v.detach().clone() for k, v in self.critic.state_dict().items()})
        self.recent[self.version] = weights
        while len(self.recent) > keep:
            self.recent.popitem(last=False)


def split_weights(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A kept version's weights as (actor's state dict, critic's state dict; empty for REINFORCE)."""
    actor = {k: v for k, v in weights.items() if not k.startswith(CRITIC_PREFIX)}
    critic = {k[len(CRITIC_PREFIX):]: v for k, v in weights.items() if k.startswith(CRITIC_PREFIX)}
    return actor, critic
