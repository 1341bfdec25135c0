"""Where named policies' states are kept: the interface infra's file store meets."""

from __future__ import annotations

from typing import Any, Protocol


class PolicyStore(Protocol):
    """Named policies' saved states: tensors plus string metadata, one atomic file per state."""

    def save_state(self, policy_id: str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        """Replace the policy's current saved state."""

    def load_state(self, policy_id: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The policy's current saved state."""

    def policy_ids(self) -> list[str]:
        """Every policy with a saved state."""

    def delete(self, policy_id: str) -> None:
        """Remove a policy and its checkpoints."""

    def save_checkpoint(self, policy_id: str, name: str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        """Write (or replace) a named checkpoint."""

    def load_checkpoint(self, policy_id: str, name: str) -> tuple[dict[str, Any], dict[str, str]] | None:
        """A named checkpoint, or None."""

    def checkpoints(self, policy_id: str) -> list[tuple[str, dict[str, str]]]:
        """Every named checkpoint's name and metadata, sorted by name."""
