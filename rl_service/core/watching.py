"""Change feeds for server-streaming watches: writers bump a key's revision, watchers wait for the next one.

Shared by WatchTraining (key: run_id) and WatchModelUpdates (key: policy_id), so both end the same way: when the
client leaves, when the feed closes at shutdown, or when the caller stops iterating.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator


class ChangeFeed:
    """A revision counter per key behind one condition variable."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._revisions: dict[str, int] = {}
        self._closed = False

    def bump(self, key: str) -> None:
        """Record a change of `key` and wake its watchers."""
        with self._cond:
            self._revisions[key] = self._revisions.get(key, 0) + 1
            self._cond.notify_all()

    def revision(self, key: str) -> int:
        """The key's current revision (0 before its first change)."""
        with self._cond:
            return self._revisions.get(key, 0)

    def forget(self, key: str) -> None:
        """Drop a key that will not change again; its watchers wake once more (their revision is no longer current).

        Keys must have been bumped at least once before anyone watches them, so a forgotten key (revision 0)
        always differs from what a watcher saw.
        """
        with self._cond:
            self._revisions.pop(key, None)
            self._cond.notify_all()

    def close(self) -> None:
        """End every watch."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _moved(self, key: str, seen: int) -> bool:
        return self._revisions.get(key, 0) != seen or self._closed

    def changes(self, key: str, since: int, is_active: Callable[[], bool],
                poll_seconds: float = 0.5) -> Iterator[int]:
        """Each new revision of `key` after `since`, until the client leaves (is_active false) or the feed closes.

        Waits wake at least every `poll_seconds` so a client that left is noticed without a change.
        """
        seen = since
        while True:
            with self._cond:
                self._cond.wait_for(functools.partial(self._moved, key, seen), timeout=poll_seconds)
                current, closed = self._revisions.get(key, 0), self._closed
            if not is_active():
                return
            if current != seen:
                seen = current
                yield current
            elif closed:
                return
