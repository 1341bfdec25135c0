"""EXECUTOR=ray's storage check: every node must see the server's data directories, at the same paths.

Workers write checkpoints, models, metadata and history straight to MODELS_DIR and CHECKPOINT_DIR, as they do
under the local executor; on a cluster those must be one shared filesystem (docs/architecture.md, "Executors and
storage", argues why). At start-up the server writes a random token into a marker file in DATA_DIR, MODELS_DIR
and CHECKPOINT_DIR; a run's actor reads them before it trains, and a node that sees another token (or none) fails
the run with an error naming the setting and the path, instead of training into a directory nobody reads.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path

from rl_service.infra.atomic import atomic_write_bytes

MARKER_FILE = ".rl-service-shared-storage"


def shared_roots(data_dir: Path, models_dir: Path, checkpoint_dir: Path) -> dict[str, str]:
    """Setting name -> absolute path of each directory a worker reads or writes."""
    return {"DATA_DIR": str(data_dir.resolve()), "MODELS_DIR": str(models_dir.resolve()),
            "CHECKPOINT_DIR": str(checkpoint_dir.resolve())}


def write_markers(roots: Mapping[str, str]) -> str:
    """Write a new random token into every root's marker file; returns the token."""
    token = secrets.token_hex(16)
    for path in roots.values():
        Path(path).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(path) / MARKER_FILE, (token + "\n").encode())
    return token


def storage_problem(roots: Mapping[str, str], token: str, node: str) -> str | None:
    """Why this node cannot train for the server (a marker missing or foreign), or None when it sees them all."""
    for name, path in roots.items():
        marker = Path(path) / MARKER_FILE
        try:
            seen = marker.read_text(encoding="utf-8").strip()
        except OSError:
            seen = None
        if seen != token:
            found = "no marker file" if seen is None else "another server's marker file"
            return (f"{name} {path} is not the server's directory on Ray node {node} ({found} at {marker}): "
                    f"EXECUTOR=ray needs DATA_DIR, MODELS_DIR and CHECKPOINT_DIR on a filesystem shared by "
                    f"every node, mounted at the same path (see docs/architecture.md)")
    return None
