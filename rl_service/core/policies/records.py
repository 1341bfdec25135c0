"""What PolicyService answers: policies' public state, batch outcomes, updates and checkpoints, and the limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rl_service.core.algorithms.reinforce_update import UpdateStats
from rl_service.core.policies.spec import PolicySpec


@dataclass(frozen=True)
class PolicyConfig:
    """Limits for named policies."""

    versions_kept: int = 4  # recent versions whose weights ComputeLogProb can still use
    max_pending_steps: int = 1_000_000  # transitions an unfinished episode may hold between batches
    # "always": saved before each reply; "background": by a writer thread, coalesced. The core default writes at
    # once and starts no thread; the server's default (POLICY_SYNC) is background.
    sync: Literal["always", "background"] = "always"
    sync_interval_seconds: float = 1.0  # the most a background save may lag the newest version
    max_policies: int = 1000  # named policies held at most; CreatePolicy beyond is RESOURCE_EXHAUSTED
    max_network_parameters: int = 10_000_000  # parameters of a policy's actor, and of its critic


@dataclass(frozen=True)
class PolicySnapshot:
    """A policy's public state (PolicyInfo)."""

    policy_id: str
    spec: PolicySpec
    version: int
    pending_steps: int
    episodes_trained: int
    steps_trained: int
    last_update: UpdateStats | None
    created_at: float
    updated_at: float
    durable_version: int  # the newest version known to be on disk
    created: bool = False
    owner: str = ""  # the token name that created it ("" without authentication)


@dataclass(frozen=True)
class BatchOutcome:
    """What SendTrainingBatch did."""

    policy_id: str
    version: int
    updated: bool
    metrics: UpdateStats | None
    pending_steps: int
    durable_version: int  # the newest version known to be on disk
    torchscript: bytes = b""


@dataclass(frozen=True)
class ModelUpdate:
    """One WatchModelUpdates message."""

    policy_id: str
    version: int
    metrics: UpdateStats | None
    durable_version: int
    torchscript: bytes = b""


@dataclass(frozen=True)
class CheckpointInfo:
    """A named checkpoint."""

    name: str
    version: int
    saved_at: float
