"""One named policy's mutable state in memory: network, optimizer, version, held tail, recent versions."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from rl_service.core.algorithms.networks import PolicyNet
from rl_service.core.algorithms.reinforce_update import UpdateStats
from rl_service.core.models.policy_exporters import torchscript_bytes
from rl_service.core.policies.experience import Transitions
from rl_service.core.policies.records import PolicySnapshot
from rl_service.core.policies.spec import PolicySpec


class LivePolicy:
    """One policy's mutable state; every access holds `lock`."""

    def __init__(self, policy_id: str, spec: PolicySpec, net: PolicyNet, created_at: float) -> None:
        self.policy_id = policy_id
        self.spec = spec
        self.shape = spec.shape
        self.values = spec.values()
        self.net = net
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
        """A fresh Adam over the network's parameters."""
        return torch.optim.Adam(self.net.parameters(), lr=float(self.values["learning_rate"]))  # type: ignore[arg-type]

    def snapshot(self, durable_version: int, created: bool = False) -> PolicySnapshot:
        """The public view."""
        return PolicySnapshot(self.policy_id, self.spec, self.version, len(self.tail), self.episodes_trained,
                              self.steps_trained, self.last_update, self.created_at, self.updated_at, durable_version,
                              created)

    def torchscript_now(self) -> bytes:
        """TorchScript of the current weights, cached per revision."""
        if self.torchscript is None or self.torchscript[0] != self.revision:
            self.torchscript = (self.revision, torchscript_bytes(self.net))
        return self.torchscript[1]

    def remember_version(self, keep: int) -> None:
        """Keep the current weights under the current version for ComputeLogProb."""
        self.recent[self.version] = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        while len(self.recent) > keep:
            self.recent.popitem(last=False)
