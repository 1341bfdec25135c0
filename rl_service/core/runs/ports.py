"""What the run orchestrator needs from infra: a persistent registry and an executor of workers."""

from __future__ import annotations

from typing import Protocol

from rl_service.core.runs.events import WorkerEvent
from rl_service.core.runs.jobs import RunJob
from rl_service.core.runs.records import RunFilter, RunRecord


class RunRegistry(Protocol):
    """Persistent run records; survives server restarts."""

    def insert(self, record: RunRecord) -> None:
        """Add a new run; the run_id must be new."""

    def update(self, record: RunRecord) -> None:
        """Replace a run's record."""

    def get(self, run_id: str) -> RunRecord | None:
        """One run, or None."""

    def find(self, run_filter: RunFilter) -> list[RunRecord]:
        """Matching runs, newest first."""

    def delete(self, run_id: str) -> None:
        """Forget a run (DeleteRun)."""

    def close(self) -> None:
        """Release the underlying connection."""


class Executor(Protocol):
    """Starts and stops training workers; a local process pool now, a Ray cluster later."""

    def launch(self, run_id: str, job: RunJob) -> None:
        """Start training `job` in the background (carried to the worker as job.to_dict(), never pickled)."""

    def request_stop(self, run_id: str) -> None:
        """Ask a worker to checkpoint and stop; it sees the request at its next progress report."""

    def kill(self, run_id: str) -> None:
        """End a worker at once."""

    def next_event(self, timeout: float) -> WorkerEvent | None:
        """The next event from any worker, or None after `timeout` seconds (0: do not wait)."""

    def reap(self) -> list[tuple[str, int]]:
        """Workers that exited since the last call, with exit codes."""

    def active(self) -> set[str]:
        """Run ids with a live worker."""

    def close(self) -> None:
        """Stop everything and release resources."""
