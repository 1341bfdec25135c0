"""All-or-nothing changes to a named policy: a failed update or save leaves memory exactly as it was before."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from rl_service.core.policies.live_policy import LivePolicy
from rl_service.core.policies.state_codec import apply_state, encode


class Rollback:
    """Restores a policy's state if the block raises (a failed save must not leave memory ahead of disk).

    With `tensors` false, the weights and Adam's state are not copied, only the fields a change assigns (tail,
    counters, version, last metrics): for a change saved behind the reply, where nothing can fail after the
    update's optimizer step, and reinforce_update changes no tensor when it raises. That copy would cost about as
    much per batch as the snapshot write-behind avoids.
    """

    def __init__(self, policy: LivePolicy, tensors: bool = True) -> None:
        self.policy = policy
        self.state: tuple[dict[str, Any], dict[str, str]] | None = None
        if tensors:
            encoded, metadata = encode(policy)
            # state_dict() tensors share storage with the live parameters, which the update changes in place.
            self.state = ({key: value.clone() for key, value in encoded.items()}, metadata)
        self.fields = (policy.tail, policy.version, policy.episodes_trained, policy.steps_trained,
                       policy.last_update)
        self.revision = policy.revision
        self.updated_at = policy.updated_at
        self.recent = OrderedDict(policy.recent)

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            if self.state is not None:
                apply_state(self.policy, *self.state)
            (self.policy.tail, self.policy.version, self.policy.episodes_trained, self.policy.steps_trained,
             self.policy.last_update) = self.fields
            self.policy.revision = self.revision
            self.policy.updated_at = self.updated_at
            self.policy.recent = self.recent
