"""All-or-nothing changes to a named policy: a failed update or save leaves memory exactly as it was on disk."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from rl_service.core.policies.live_policy import LivePolicy
from rl_service.core.policies.state_codec import apply_state, encode


class Rollback:
    """Restores a policy's full state if the block raises (a failed save must not leave memory ahead of disk)."""

    def __init__(self, policy: LivePolicy) -> None:
        self.policy = policy
        tensors, self.metadata = encode(policy)
        # state_dict() tensors share storage with the live parameters, which the update changes in place.
        self.tensors = {key: value.clone() for key, value in tensors.items()}
        self.revision = policy.revision
        self.updated_at = policy.updated_at
        self.recent = OrderedDict(policy.recent)

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            apply_state(self.policy, self.tensors, self.metadata)
            self.policy.revision = self.revision
            self.policy.updated_at = self.updated_at
            self.policy.recent = self.recent
