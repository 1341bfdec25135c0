"""Named policies on disk as safetensors files (tensors + string metadata; no pickle), written atomically and
confined to POLICIES_DIR at write time (a directory swapped for a symlink fails the write: infra.atomic).

POLICIES_DIR/<policy_id>/state.safetensors          the current state, replaced after every accepted update
POLICIES_DIR/<policy_id>/checkpoints/<name>.safetensors
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from rl_service.core.errors import InvalidRequest, quoted
from rl_service.infra.atomic import PathEscapesRoot, atomic_write_bytes

STATE_FILE = "state.safetensors"
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class FilePolicyStore:
    """PolicyStore under one root directory; ids and names are checked by core and confined again here."""

    root: Path

    def _dir(self, policy_id: str) -> Path:
        root = self.root.resolve()
        path = root / policy_id
        if path.parent != root or policy_id in ("", ".", "..") or "\x00" in policy_id:
            raise InvalidRequest(f"policy_id: {quoted(policy_id)} is not a safe name", field="policy_id")
        _refuse_link(path)
        return path

    def save_state(self, policy_id: str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        """Replace the current state atomically."""
        atomic_write_bytes(self._dir(policy_id) / STATE_FILE, _encode(tensors, metadata), root=self.root)

    def load_state(self, policy_id: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The current state."""
        return _decode(self._dir(policy_id) / STATE_FILE)

    def policy_ids(self) -> list[str]:
        """Policies with a saved state."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.resolve().glob(f"*/{STATE_FILE}"))

    def delete(self, policy_id: str) -> None:
        """Remove the policy's directory: state first, so a crash midway never leaves a half policy loadable."""
        directory = self._dir(policy_id)
        (directory / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)

    def save_checkpoint(self, policy_id: str, name: str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
        """Write a named checkpoint atomically."""
        atomic_write_bytes(self._checkpoint(policy_id, name), _encode(tensors, metadata), root=self.root)

    def load_checkpoint(self, policy_id: str, name: str) -> tuple[dict[str, Any], dict[str, str]] | None:
        """A named checkpoint, or None when there is none by that name."""
        path = self._checkpoint(policy_id, name)
        return _decode(path) if path.is_file() else None

    def checkpoints(self, policy_id: str) -> list[tuple[str, dict[str, str]]]:
        """Names and metadata of the policy's checkpoints."""
        directory = self._dir(policy_id) / "checkpoints"
        found = []
        for path in sorted(directory.glob(f"*{SUFFIX}")) if directory.is_dir() else []:
            with safe_open(str(path), framework="pt") as handle:
                found.append((path.name[: -len(SUFFIX)], dict(handle.metadata() or {})))
        return found

    def _checkpoint(self, policy_id: str, name: str) -> Path:
        directory = self._dir(policy_id) / "checkpoints"
        _refuse_link(directory)
        path = directory / f"{name}{SUFFIX}"
        if path.parent != directory or "\x00" in name:
            raise InvalidRequest(f"name: {quoted(name)} is not a safe checkpoint name", field="name")
        return path


def _refuse_link(path: Path) -> None:
    # Checked here for reads and deletes; writes are confined again at write time (atomic_write_bytes's root).
    if path.is_symlink():
        raise PathEscapesRoot(f"{path} is a symlink; POLICIES_DIR holds real directories only")


def _encode(tensors: dict[str, Any], metadata: dict[str, str]) -> bytes:
    # safetensors refuses tensors that share memory or are not contiguous; give it private contiguous copies.
    return save({k: v.detach().contiguous().clone() for k, v in tensors.items()}, metadata=metadata)


def _decode(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    return load_file(str(path)), metadata
