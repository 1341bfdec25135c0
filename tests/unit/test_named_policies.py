"""PolicyManager with an in-memory store: watch coalescing, rollback on a failed save, restore from a state."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import structlog
import torch

from rl_service.core.errors import InvalidRequest
from rl_service.core.policies import spec as spec_module
from rl_service.core.policies.manager import PolicyManager
from rl_service.core.policies.records import PolicyConfig
from rl_service.core.policies.spec import PolicySpecRequest, build_spec, check_name


class MemoryStore:
    """PolicyStore in a dict; `fail` makes the next save raise."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}
        self.fail = False

    def save_state(self, policy_id: str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        if self.fail:
            raise OSError("disk full")
        self.states[policy_id] = ({k: v.clone() for k, v in tensors.items()}, dict(metadata))

    def load_state(self, policy_id: str) -> tuple[dict[str, Any], dict[str, str]]:
        return self.states[policy_id]

    def policy_ids(self) -> list[str]:
        return sorted(self.states)

    def delete(self, policy_id: str) -> None:
        self.states.pop(policy_id, None)

    def save_checkpoint(self, *args: Any) -> None:
        raise NotImplementedError

    def load_checkpoint(self, *args: Any) -> None:
        return None

    def checkpoints(self, policy_id: str) -> list[tuple[str, dict[str, str]]]:
        return []


def _manager(store: MemoryStore) -> PolicyManager:
    return PolicyManager(store, PolicyConfig(), structlog.get_logger())


def _send(manager: PolicyManager, policy_id: str, seed: int, done: bool = True) -> Any:
    rng = np.random.default_rng(seed)
    return manager.send_batch(policy_id, rng.normal(size=12).astype(np.float32),
                              rng.integers(0, 2, size=3).astype(np.float64), rng.uniform(size=3),
                              np.array([False, False, done]))


def _weights(manager: PolicyManager, policy_id: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(manager.model(policy_id, torchscript=False)[1])


def test_a_subscriber_that_does_not_read_skips_to_the_newest_version() -> None:
    manager = _manager(MemoryStore())
    manager.create("w", PolicySpecRequest((4,), discrete_actions=2, seed=0))
    _send(manager, "w", 0)
    stream = manager.watch("w", from_version=0, include_model=False, is_active=lambda: True, poll_seconds=0.05)
    assert next(stream).version == 1
    for seed in range(1, 5):  # four updates while the subscriber is busy elsewhere
        _send(manager, "w", seed)
    assert next(stream).version == 5, "versions 2-4 are skipped, never queued"
    manager.close()
    assert list(stream) == []


def test_a_failed_save_rolls_the_update_back() -> None:
    store = MemoryStore()
    manager = _manager(store)
    manager.create("r", PolicySpecRequest((4,), discrete_actions=2, seed=0))
    _send(manager, "r", 0)
    _send(manager, "r", 1, done=False)  # a held tail of 3
    before = _weights(manager, "r")
    store.fail = True
    with pytest.raises(OSError, match="disk full"):
        _send(manager, "r", 2)
    snapshot = manager.get("r")
    assert snapshot.version == 1 and snapshot.pending_steps == 3 and snapshot.episodes_trained == 1
    for key, value in _weights(manager, "r").items():
        assert torch.equal(value, before[key]), key
    store.fail = False
    assert _send(manager, "r", 2).version == 2, "the policy still trains after the failure"


def test_a_new_manager_restores_every_policy_from_the_store() -> None:
    store = MemoryStore()
    first = _manager(store)
    first.create("a", PolicySpecRequest((4,), discrete_actions=2, seed=3, hyperparameters={"beta": "0.5"}))
    _send(first, "a", 0)
    _send(first, "a", 1, done=False)
    second = _manager(store)
    restored = second.get("a")
    assert restored.version == 1 and restored.pending_steps == 3 and restored.spec.hyperparameters["beta"] == "0.5"
    for key, value in _weights(second, "a").items():
        assert torch.equal(value, _weights(first, "a")[key])


def test_an_unreadable_state_is_skipped_not_fatal() -> None:
    store = MemoryStore()
    store.states["broken"] = ({}, {"format": "something-else"})
    manager = _manager(store)
    assert [p.policy_id for p in manager.list_policies()] == []


@pytest.mark.parametrize("name", ["ok", "A.b-c_1", "x" * 64])
def test_safe_names(name: str) -> None:
    assert check_name(name, "policy_id") == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", ".hidden", "x" * 65, "nul\x00"])
def test_unsafe_names(name: str) -> None:
    with pytest.raises(InvalidRequest, match="policy_id"):
        check_name(name, "policy_id")


def test_a_batch_that_is_only_held_is_not_announced_as_an_update() -> None:
    manager = _manager(MemoryStore())
    manager.create("h", PolicySpecRequest((4,), discrete_actions=2, seed=0))
    _send(manager, "h", 0)
    stream = manager.watch("h", from_version=0, include_model=False, is_active=lambda: True, poll_seconds=0.05)
    assert next(stream).version == 1
    assert not _send(manager, "h", 1, done=False).updated  # held: the model did not change
    _send(manager, "h", 2)
    assert next(stream).version == 2, "the next message is the next version, not version 1 again"
    manager.close()


def test_the_owner_is_kept_on_disk_and_a_state_saved_before_owners_loads_as_owned_by_nobody() -> None:
    store = MemoryStore()
    first = _manager(store)
    assert first.create("mine", PolicySpecRequest((4,), discrete_actions=2, seed=0), owner="alice").owner == "alice"
    first.create("old", PolicySpecRequest((4,), discrete_actions=2, seed=0))
    _send(first, "mine", 1)
    # A re-create with the same spec by someone else is the no-op it was: the policy keeps its owner.
    assert first.create("mine", PolicySpecRequest((4,), discrete_actions=2), owner="bob").owner == "alice"
    first.close()
    del store.states["old"][1]["owner"]  # as written by a server before owners existed
    second = _manager(store)
    assert second.owner("mine") == "alice" and second.get("mine").owner == "alice"
    assert second.owner("old") == "" and [s.owner for s in second.list_policies()] == ["alice", ""]
    assert second.get("mine").version == 1


@pytest.mark.parametrize(("request_", "field"), [
    (PolicySpecRequest((2**63 - 1,) * 100_000, discrete_actions=2), "spec.observation_shape"),  # seconds of math.prod
    (PolicySpecRequest((1,) * 9, discrete_actions=2), "spec.observation_shape"),  # more than MAX_SHAPE_DIMS
    (PolicySpecRequest((0, 4), discrete_actions=2), "spec.observation_shape"),
    (PolicySpecRequest((4,), box_shape=(2**31 - 1,) * 100_000), "spec.box.shape"),
    (PolicySpecRequest((4,), box_shape=(2**62, 4)), "spec.box.shape"),
])
def test_shapes_are_refused_at_once_with_a_short_message(request_: PolicySpecRequest, field: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real_prod = math.prod

    def bounded_prod(values: Any) -> Any:
        # math.prod of 100,000 dimensions near 2**63 took about 13 s (a fuzz case): the count must be checked first.
        assert len(values) <= spec_module.MAX_SHAPE_DIMS, "a product over more dimensions than allowed"
        return real_prod(values)

    monkeypatch.setattr(spec_module.math, "prod", bounded_prod)
    with pytest.raises(InvalidRequest) as info:
        build_spec(request_)
    assert info.value.field == field and len(info.value.message) < 300
