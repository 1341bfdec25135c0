"""Write-behind persistence of named policies (POLICY_SYNC): PolicyManager and its PolicyWriter on a fake store.

The store records every operation, can fail its saves, and can hold a save midway (a gate), so the tests decide
exactly when the writer's disk write happens relative to deletes, checkpoint loads and new weights.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from rl_service.core.errors import PolicyNotFound
from rl_service.core.models.policy_exporters import state_dict_bytes
from rl_service.core.policies.manager import PolicyManager
from rl_service.core.policies.records import BatchOutcome, PolicyConfig
from rl_service.core.policies.spec import PolicySpecRequest, new_net
from rl_service.core.policies.writer import NotDurable

SPEC = PolicySpecRequest((4,), discrete_actions=2, seed=0)
LONG = 3600.0  # an interval the test never waits for: only sync, close, deletes and loads write


class FakeStore:
    """PolicyStore in memory: `ops` logs ("save", id, version) and ("delete", id); `fail` makes saves raise;
    with `gated`, a save waits at `gate` (after announcing itself on `entered`) before it lands."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}
        self.saved_checkpoints: dict[tuple[str, str], tuple[dict[str, Any], dict[str, str]]] = {}
        self.ops: list[tuple[Any, ...]] = []
        self.written: list[tuple[str, int, dict[str, Any]]] = []  # every state that landed, as it was
        self.fail = False
        self.gated = False
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.lock = threading.Lock()

    def save_state(self, policy_id: str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        if self.gated:
            self.entered.set()
            assert self.gate.wait(10), "the test never opened the gate"
        with self.lock:
            self.ops.append(("attempt", policy_id, int(metadata["version"])))
            if self.fail:
                raise OSError("disk full")
            self.states[policy_id] = ({k: v.clone() for k, v in tensors.items()}, dict(metadata))
            self.ops.append(("save", policy_id, int(metadata["version"])))
            self.written.append((policy_id, int(metadata["version"]), self.states[policy_id][0]))

    def load_state(self, policy_id: str) -> tuple[dict[str, Any], dict[str, str]]:
        return self.states[policy_id]

    def policy_ids(self) -> list[str]:
        return sorted(self.states)

    def delete(self, policy_id: str) -> None:
        with self.lock:
            self.states.pop(policy_id, None)
            self.ops.append(("delete", policy_id))

    def save_checkpoint(self, policy_id: str, name: str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        self.saved_checkpoints[policy_id, name] = ({k: v.clone() for k, v in tensors.items()}, dict(metadata))

    def load_checkpoint(self, policy_id: str, name: str) -> tuple[dict[str, Any], dict[str, str]] | None:
        found = self.saved_checkpoints.get((policy_id, name))  # fresh tensors on every load, like a file
        return ({k: v.clone() for k, v in found[0].items()}, dict(found[1])) if found else None

    def checkpoints(self, policy_id: str) -> list[tuple[str, dict[str, str]]]:
        return [(name, meta) for (pid, name), (_, meta) in sorted(self.saved_checkpoints.items()) if pid == policy_id]

    def version_on_disk(self, policy_id: str) -> int | None:
        with self.lock:
            state = self.states.get(policy_id)
        return int(state[1]["version"]) if state else None

    def saves(self, policy_id: str) -> list[int]:
        with self.lock:
            return [op[2] for op in self.ops if op[0] == "save" and op[1] == policy_id]

    def attempts(self, policy_id: str) -> int:
        with self.lock:
            return sum(1 for op in self.ops if op[0] == "attempt" and op[1] == policy_id)


class RecordingLogger:
    """A logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **fields: self.records.append((level, event, fields))

    def errors(self) -> list[str]:
        return [event for level, event, _ in self.records if level == "error"]


@pytest.fixture
def log() -> RecordingLogger:
    return RecordingLogger()


@pytest.fixture
def managers(log: RecordingLogger) -> Iterator[Callable[..., PolicyManager]]:
    """Managers on a store, closed (their writer threads stopped) at the end of the test."""
    made: list[PolicyManager] = []

    def make(store: FakeStore, sync: str = "background", interval: float = LONG) -> PolicyManager:
        manager = PolicyManager(store, PolicyConfig(sync=sync, sync_interval_seconds=interval),  # type: ignore[arg-type]
                                log)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()


def send(manager: PolicyManager, policy_id: str, seed: int, done: bool = True, **options: Any) -> BatchOutcome:
    rng = np.random.default_rng(seed)
    return manager.send_batch(policy_id, rng.normal(size=12).astype(np.float32),
                              rng.integers(0, 2, size=3).astype(np.float64), rng.uniform(size=3),
                              np.array([False, False, done]), **options)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until `predicate()` holds (fails the test after `timeout`)."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.005)
    return time.monotonic() - started


def test_versions_coalesce_into_one_write_and_durable_version_follows(
        managers: Callable[..., PolicyManager]) -> None:
    store = FakeStore()
    manager = managers(store, interval=0.3)
    manager.create("c", SPEC)
    assert store.saves("c") == [0] and manager.get("c").durable_version == 0, "a new policy is on disk at once"
    replies = [send(manager, "c", seed) for seed in range(5)]
    assert [r.version for r in replies] == [1, 2, 3, 4, 5]
    assert {r.durable_version for r in replies} == {0}, "the replies came before any background write"
    assert manager.get("c").durable_version == 0
    waited = wait_for(lambda: manager.get("c").durable_version == 5)
    assert waited < 0.3 + 1.0, "written within the interval (plus the write itself)"
    assert store.saves("c") == [0, 5], "versions 1 to 4 were coalesced away, never written"
    assert send(manager, "c", 9).durable_version == 5


def test_in_background_a_batch_copies_nothing_and_the_writer_one_state_per_tick(
        managers: Callable[..., PolicyManager], monkeypatch: pytest.MonkeyPatch) -> None:
    import rl_service.core.policies.manager as manager_module

    copies: list[int] = []
    original = manager_module.encode_snapshot

    def counting(policy: Any) -> Any:
        copies.append(policy.version)
        return original(policy)

    monkeypatch.setattr(manager_module, "encode_snapshot", counting)
    store = FakeStore()
    manager = managers(store)
    manager.create("n", SPEC)
    for seed in range(6):
        send(manager, "n", seed)
    assert copies == [], "the batches only marked the policy dirty"
    manager.close()
    assert copies == [6] and store.saves("n") == [0, 6]


def test_a_steady_stream_of_batches_is_saved_at_most_an_interval_behind(
        managers: Callable[..., PolicyManager]) -> None:
    store = FakeStore()
    manager = managers(store, interval=0.2)
    manager.create("t", SPEC)
    lags = []
    started = time.monotonic()
    while time.monotonic() - started < 1.5:  # a batch every 20 ms: the policy is never idle
        reply = send(manager, "t", len(lags))
        lags.append(reply.version - reply.durable_version)
        time.sleep(0.02)
    assert len(store.saves("t")) >= 4, "the writer saved every interval even though changes never stopped"
    assert max(lags[len(lags) // 2:]) < len(lags) // 2, "durable_version kept up"


def test_a_sync_batch_waits_for_its_own_version_only(managers: Callable[..., PolicyManager]) -> None:
    store = FakeStore()
    manager = managers(store)
    manager.create("s", SPEC)
    send(manager, "s", 0)
    started = time.monotonic()
    reply = send(manager, "s", 1, sync=True)
    assert time.monotonic() - started < 5, "a sync batch writes at once, not at the next tick of a long interval"
    assert reply.version == reply.durable_version == 2 and store.version_on_disk("s") == 2
    assert store.saves("s") == [0, 2]
    held = send(manager, "s", 2, done=False, sync=True)  # a held tail changes the state, not the version
    assert not held.updated and held.durable_version == 2
    assert int(store.states["s"][0]["tail.rewards"].numel()) == 3, "the held transitions are on disk too"


def test_close_flushes_everything_pending(managers: Callable[..., PolicyManager]) -> None:
    store = FakeStore()
    manager = managers(store)
    for policy_id in ("a", "b"):
        manager.create(policy_id, SPEC)
        for seed in range(3):
            send(manager, policy_id, seed)
        send(manager, policy_id, 7, done=False)
    assert store.version_on_disk("a") == store.version_on_disk("b") == 0
    manager.close()
    assert store.saves("a") == store.saves("b") == [0, 3]
    restored = managers(store, sync="always").get("a")
    assert restored.version == restored.durable_version == 3 and restored.pending_steps == 3
    # A change after close (a late RPC during shutdown) is written before it returns.
    assert send(manager, "a", 11).durable_version == 4 and store.version_on_disk("a") == 4


def test_a_delete_drops_the_pending_write(managers: Callable[..., PolicyManager]) -> None:
    store = FakeStore()
    manager = managers(store)
    manager.create("d", SPEC)
    send(manager, "d", 0)
    send(manager, "d", 1)
    manager.delete("d")
    manager.close()  # writes whatever is still pending: nothing of "d"
    assert "d" not in store.states and store.ops[-1] == ("delete", "d")
    assert store.saves("d") == [0]


def test_a_delete_waits_for_a_write_in_flight_and_is_not_resurrected(
        managers: Callable[..., PolicyManager]) -> None:
    store = FakeStore()
    manager = managers(store, interval=0.05)
    manager.create("r", SPEC)
    store.gated = True
    send(manager, "r", 0)
    assert store.entered.wait(5), "the writer thread started its write"
    send(manager, "r", 1)  # version 2 is pending behind the write in flight
    deleting = threading.Thread(target=manager.delete, args=("r",))
    deleting.start()
    time.sleep(0.2)
    assert deleting.is_alive(), "the delete waits for the write in flight"
    store.gate.set()
    deleting.join(5)
    assert not deleting.is_alive()
    time.sleep(0.3)
    manager.close()
    assert "r" not in store.states, "no write landed after the delete"
    assert [op for op in store.ops if op[0] != "attempt"] == [("save", "r", 0), ("save", "r", 1), ("delete", "r")]
    with pytest.raises(PolicyNotFound):
        manager.get("r")


def test_a_delete_between_the_writers_snapshot_and_its_write_wins(managers: Callable[..., PolicyManager]) -> None:
    store = FakeStore()
    manager = managers(store, interval=0.05)
    manager.create("g", SPEC)
    writer = manager._writer
    taken, release = threading.Event(), threading.Event()
    snapshot = writer._snapshot

    def snapshot_then_pause(policy_id: str) -> Any:
        state = snapshot(policy_id)  # taken under the policy's lock, which is released again here
        taken.set()
        assert release.wait(10)
        return state

    writer._snapshot = snapshot_then_pause
    send(manager, "g", 0)
    assert taken.wait(5), "the writer thread took its snapshot"
    manager.delete("g")  # the writer holds version 1 and has not written it yet
    release.set()
    time.sleep(0.2)
    manager.close()
    assert "g" not in store.states and store.saves("g") == [0]


def test_a_policy_created_again_after_a_delete_is_not_overwritten_by_the_old_one(
        managers: Callable[..., PolicyManager]) -> None:
    store = FakeStore()
    manager = managers(store, interval=0.05)
    manager.create("x", SPEC)
    for seed in range(3):
        send(manager, "x", seed)
    manager.delete("x")
    manager.create("x", PolicySpecRequest((4,), discrete_actions=3, seed=1))
    time.sleep(0.3)
    manager.close()
    assert store.version_on_disk("x") == 0 and '"discrete_actions": 3' in store.states["x"][1]["spec"]


def test_a_failed_background_write_is_retried_and_durable_version_waits(
        managers: Callable[..., PolicyManager], log: RecordingLogger) -> None:
    store = FakeStore()
    manager = managers(store, interval=0.05)
    manager.create("f", SPEC)
    store.fail = True
    assert send(manager, "f", 0).version == 1
    wait_for(lambda: store.attempts("f") >= 4)  # the first write and its retries, one per tick
    assert manager.get("f").durable_version == 0
    assert log.errors()[:3] == ["cannot save named policy; its changes stay pending and are retried"] * 3
    with pytest.raises(NotDurable, match=r"version 2 .*durable_version is still 0 .*do not send it again"):
        send(manager, "f", 1, sync=True)
    assert manager.get("f").version == 2, "the batch was applied; only its save failed"
    store.fail = False
    wait_for(lambda: manager.get("f").durable_version == 2)
    assert store.saves("f") == [0, 2]


def test_a_checkpoint_load_supersedes_a_pending_write(managers: Callable[..., PolicyManager]) -> None:
    store = FakeStore()
    manager = managers(store)
    manager.create("k", SPEC)
    send(manager, "k", 0)
    manager.save_checkpoint("k", "one")
    send(manager, "k", 1)
    send(manager, "k", 2)  # version 3 pending, never written
    loaded = manager.load_checkpoint("k", "one")
    assert loaded.version == loaded.durable_version == 1 and store.version_on_disk("k") == 1
    manager.close()
    assert store.saves("k") == [0, 1], "the stale pending version 3 did not overwrite the loaded checkpoint"
    assert send(manager, "k", 3).version == 2


def test_new_weights_supersede_a_pending_write(managers: Callable[..., PolicyManager]) -> None:
    store = FakeStore()
    manager = managers(store)
    manager.create("w", SPEC)
    send(manager, "w", 0)
    send(manager, "w", 1)
    fresh = new_net(manager.get("w").spec)
    info = manager.set_weights("w", state_dict_bytes(fresh))
    assert info.version == info.durable_version == 3 and store.saves("w") == [0, 3]
    manager.close()
    assert store.saves("w") == [0, 3]
    on_disk = store.states["w"][0]
    for key, value in fresh.state_dict().items():
        assert torch.equal(on_disk[f"net.{key}"], value), key


def test_the_snapshot_is_not_changed_by_later_updates(managers: Callable[..., PolicyManager]) -> None:
    """The writer writes what the policy was at the snapshot, even when updates ran in place meanwhile."""
    store = FakeStore()
    manager = managers(store, interval=0.05)
    manager.create("n", SPEC)
    store.gated = True
    send(manager, "n", 0)
    assert store.entered.wait(5)
    at_one = {k: v.clone() for k, v in manager_weights(manager, "n").items()}
    for seed in range(1, 4):  # Adam updates the live parameters in place while version 1 waits at the gate
        send(manager, "n", seed)
    store.gate.set()
    wait_for(lambda: manager.get("n").durable_version == 4)
    assert [version for _, version, _ in store.written] == [0, 1, 4]
    on_disk = store.written[1][2]
    for key, value in at_one.items():
        assert torch.equal(on_disk[f"net.{key}"], value), key


def test_always_mode_saves_before_each_reply(managers: Callable[..., PolicyManager]) -> None:
    store = FakeStore()
    manager = managers(store, sync="always")
    manager.create("a", SPEC)
    for seed in range(3):
        reply = send(manager, "a", seed, sync=seed == 1)
        assert reply.durable_version == reply.version == store.version_on_disk("a") == seed + 1
    assert store.saves("a") == [0, 1, 2, 3]
    store.fail = True
    with pytest.raises(OSError, match="disk full"):
        send(manager, "a", 5)
    assert manager.get("a").version == 3, "in always mode a failed save rolls the batch back"


def test_concurrent_senders_end_on_disk_at_the_last_version(managers: Callable[..., PolicyManager]) -> None:
    store = FakeStore()
    manager = managers(store, interval=0.01)
    manager.create("p", SPEC)
    synced: list[tuple[int, int]] = []

    def sender(offset: int) -> None:
        for i in range(15):
            reply = send(manager, "p", offset * 100 + i, sync=i % 5 == 4)
            if i % 5 == 4:
                synced.append((reply.version, reply.durable_version))

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    manager.close()
    assert len(synced) == 9 and all(durable >= version for version, durable in synced)
    assert store.version_on_disk("p") == 45 and manager.get("p").durable_version == 45
    assert store.saves("p") == sorted(store.saves("p")), "never an older state after a newer one"


def manager_weights(manager: PolicyManager, policy_id: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(manager.model(policy_id, torchscript=False)[1])
