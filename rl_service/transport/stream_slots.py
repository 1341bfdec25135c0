"""One cap on open server streams across services: each open stream holds an RPC thread."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from rl_service.core.errors import CapacityExceeded


class StreamSlots:
    """At most `limit` watch streams (WatchTraining and WatchModelUpdates together) open at once."""

    def __init__(self, limit: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        self._limit = limit

    @contextlib.contextmanager
    def hold(self, rpc: str, alternative: str) -> Iterator[None]:
        """Hold a slot for the stream's lifetime; RESOURCE_EXHAUSTED when none is free."""
        if not self._slots.acquire(blocking=False):
            raise CapacityExceeded(f"too many watch streams open (MAX_WATCH_STREAMS={self._limit}, counted over "
                                   f"WatchTraining and WatchModelUpdates); {rpc} refused: {alternative}")
        try:
            yield
        finally:
            self._slots.release()
