"""When named policies' states reach disk: before the reply (POLICY_SYNC=always) or write-behind (background).

In background mode a change only marks its policy dirty (no copy, no I/O in the RPC). One thread per manager wakes
when the oldest unwritten change of a policy is `interval` seconds old, takes one snapshot of the newest state under
the policy's lock (through the manager's `snapshot` callback: about 0.15 ms for a 64x64 MLP with Adam), and encodes
and writes it outside that lock (about 6 ms with the fsyncs). Versions in between are never copied nor written.

Locks, always taken in this order: the manager's dict lock, a policy's lock, a slot's `io_lock` (one per policy:
serialises that policy's state writes and its delete, so a late write never resurrects a deleted policy nor
replaces a newer state with an older one), then `_cond` (guards every slot's fields; never held during I/O). The
writer thread never holds an `io_lock` while it takes a policy's lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rl_service.core.errors import PolicyNotFound, ServiceError
from rl_service.core.policies.ports import PolicyStore

SyncMode = Literal["always", "background"]
SYNC_MODES: tuple[SyncMode, ...] = ("always", "background")


class NotDurable(ServiceError):
    """A change was applied in memory but could not be saved (INTERNAL); the writer keeps retrying it."""


@dataclass(frozen=True)
class StateSnapshot:
    """One policy state ready to write: tensors nothing else changes, plus string metadata."""

    change: int  # the policy's change counter when taken: orders the snapshots of one policy
    version: int
    tensors: dict[str, Any]
    metadata: dict[str, str]


# Takes a policy's snapshot under its lock; None once the policy is gone.
Snapshotter = Callable[[str], StateSnapshot | None]


@dataclass
class _Slot:
    """The writer's view of one policy; every field but io_lock is guarded by the writer's `_cond`."""

    written_change: int  # the newest change on disk
    durable_version: int  # that change's version
    newest: int = -1  # the newest change reported
    covered: int = -1  # the newest change in a snapshot being written or written
    due: float = 0.0  # monotonic time by which the oldest change not yet covered is to be written
    deleted: bool = False
    io_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.newest = self.covered = self.written_change


class PolicyWriter:
    """Saves named policies' states through the store, now or behind the reply; tracks what is durable."""

    def __init__(self, store: PolicyStore, mode: SyncMode, interval: float, snapshot: Snapshotter,
                 logger: Any) -> None:
        if mode not in SYNC_MODES:
            raise ValueError(f"sync mode must be one of {SYNC_MODES}, not {mode!r}")
        if not interval > 0:
            raise ValueError(f"sync interval must be > 0 seconds, not {interval}")
        self._store = store
        self._interval = interval
        self._snapshot = snapshot
        self._log = logger
        self._slots: dict[str, _Slot] = {}
        self._cond = threading.Condition(threading.Lock())
        self._closed = mode == "always"  # closed: nothing is left for a thread, every change is written at once
        self._thread: threading.Thread | None = None
        if mode == "background":
            self._thread = threading.Thread(target=self._run, name="policy-writer", daemon=True)
            self._thread.start()

    @property
    def writes_behind(self) -> bool:
        """True while changes are left to the writer thread (background mode, until close)."""
        with self._cond:
            return not self._closed

    # ----------------------------------------------------------------- what the manager calls

    def track(self, policy_id: str, change: int = -1, version: int = -1) -> None:
        """Start tracking a policy: restored from disk at `change` and `version`, or new (nothing on disk yet)."""
        with self._cond:
            self._slots[policy_id] = _Slot(written_change=change, durable_version=version)

    def write(self, policy_id: str, snapshot: StateSnapshot) -> None:
        """Write now, in the caller's thread (raises on failure, so the caller can roll back)."""
        slot = self._slot(policy_id)
        with slot.io_lock:
            self._write_locked(policy_id, slot, snapshot)

    def changed(self, policy_id: str, change: int, snapshot_now: Callable[[], StateSnapshot]) -> None:
        """Note a change for the writer thread (the caller holds the policy's lock). Never raises: after close
        (a change that began before the shutdown) it is written at once and a failure is only logged."""
        slot = self._slot(policy_id)
        with self._cond:
            if not self._closed:
                if slot.newest <= slot.covered:  # the oldest change nobody is writing yet: its deadline
                    slot.due = time.monotonic() + self._interval
                    self._cond.notify()
                slot.newest = max(slot.newest, change)
                return
            slot.newest = max(slot.newest, change)
        snapshot = snapshot_now()
        with slot.io_lock:
            try:
                self._write_locked(policy_id, slot, snapshot)
            except Exception as exc:
                self._failed(policy_id, slot, snapshot, exc)

    def wait(self, policy_id: str, change: int) -> None:
        """Return once `change` (or a newer one) is on disk, writing the newest state now if need be (the caller
        holds no lock). NotDurable when that write fails; PolicyNotFound when the policy was deleted."""
        slot = self._slot(policy_id)
        with slot.io_lock, self._cond:  # after any write in flight, which may already cover `change`
            if slot.written_change >= change and not slot.deleted:
                return
        self._flush(policy_id, slot, raise_errors=True)
        with self._cond:
            if slot.deleted or slot.written_change < change:
                raise PolicyNotFound(f"policy_id: policy {policy_id!r} was deleted", field="policy_id")

    def durable_version(self, policy_id: str) -> int:
        """The newest version of the policy known to be on disk (-1 when nothing is)."""
        with self._cond:
            slot = self._slots.get(policy_id)
            return slot.durable_version if slot is not None else -1

    def delete(self, policy_id: str, remove: Callable[[], None]) -> None:
        """Forget the policy and call `remove()` (the store's delete) with none of its writes in flight."""
        slot = self._slot(policy_id)
        with slot.io_lock:
            with self._cond:
                slot.deleted = True
                if self._slots.get(policy_id) is slot:
                    del self._slots[policy_id]
            remove()

    def close(self) -> None:
        """Stop the thread, then write every policy with unwritten changes (a graceful shutdown loses nothing);
        changes after this are written at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        unwritten = self._unwritten(due_by=None)
        for policy_id, slot in unwritten:
            self._flush(policy_id, slot, raise_errors=False)
        if unwritten:
            self._log.info("named policies saved at close", policies=len(unwritten))

    # ----------------------------------------------------------------- internals

    def _slot(self, policy_id: str) -> _Slot:
        with self._cond:
            slot = self._slots.get(policy_id)
        if slot is None:  # deleted (a policy's own calls are checked against that first, under its lock)
            raise PolicyNotFound(f"policy_id: no policy {policy_id!r}", field="policy_id")
        return slot

    def _run(self) -> None:
        """The writer thread: sleep until the oldest unwritten change is due, write every due policy, repeat."""
        while True:
            with self._cond:
                while not self._closed:
                    dues = [slot.due for slot in self._slots.values() if slot.newest > slot.covered]
                    now = time.monotonic()
                    if dues and min(dues) <= now:
                        break
                    self._cond.wait(min(dues) - now if dues else None)
                if self._closed:
                    return  # close() writes what is left
            for policy_id, slot in self._unwritten(due_by=time.monotonic()):
                self._flush(policy_id, slot, raise_errors=False)

    def _unwritten(self, due_by: float | None) -> list[tuple[str, _Slot]]:
        with self._cond:
            return [(policy_id, slot) for policy_id, slot in self._slots.items()
                    if slot.newest > slot.covered and (due_by is None or slot.due <= due_by)]

    def _flush(self, policy_id: str, slot: _Slot, raise_errors: bool) -> None:
        """Snapshot the policy's newest state (under its lock) and write it (outside it)."""
        snapshot = self._snapshot(policy_id)
        if snapshot is None:  # deleted meanwhile: nothing left to write
            with self._cond:
                slot.covered = max(slot.covered, slot.newest)
            return
        with self._cond:
            slot.covered = max(slot.covered, snapshot.change)
        with slot.io_lock:
            try:
                self._write_locked(policy_id, slot, snapshot)
            except Exception as exc:
                durable = self._failed(policy_id, slot, snapshot, exc)
                if raise_errors:
                    raise NotDurable(
                        f"sync: policy {policy_id!r} is at version {snapshot.version} but that state could not be "
                        f"saved ({type(exc).__name__}: {exc}); durable_version is still {durable} and the server "
                        f"retries the save every {self._interval:g} s. The change was applied: do not send it "
                        "again") from exc

    def _write_locked(self, policy_id: str, slot: _Slot, snapshot: StateSnapshot) -> None:
        """Write one state; the caller holds the slot's io_lock, so nothing else writes or deletes this policy."""
        with self._cond:
            if slot.deleted or snapshot.change <= slot.written_change:
                return  # never resurrect a deleted policy, never replace a newer state with an older one
        self._store.save_state(policy_id, snapshot.tensors, snapshot.metadata)
        with self._cond:
            slot.written_change = snapshot.change
            slot.durable_version = snapshot.version
            slot.covered = max(slot.covered, snapshot.change)

    def _failed(self, policy_id: str, slot: _Slot, snapshot: StateSnapshot, exc: Exception) -> int:
        """Log a failed write and leave its changes for the next tick; returns the durable version."""
        with self._cond:
            slot.covered = slot.written_change  # not covered after all: the thread takes them up again
            slot.due = time.monotonic() + self._interval  # on the next tick, not in a tight loop
            durable = slot.durable_version
            if not self._closed:
                self._cond.notify()
        self._log.error("cannot save named policy; its changes stay pending and are retried", policy_id=policy_id,
                        version=snapshot.version, durable_version=durable, retry_seconds=self._interval,
                        error=f"{type(exc).__name__}: {exc}")
        return durable
