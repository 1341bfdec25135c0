"""Atomic file writes: a temp file in the target's directory, fsync, os.replace. Readers never see half a file.

A process killed mid-write leaves its temp file (`.<name>.<8 random characters>.tmp`); remove_temp_files clears
those at start-up, once the server owns the data directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

# Exactly what atomic_writer's mkstemp call makes: its random part is 8 characters of [a-z0-9_].
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces `path` only if the block completes; on error nothing is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_writer(path) as handle:
        handle.write(data)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON (UTF-8, indented) atomically."""
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode("utf-8"))


def atomic_write_with(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Let `write` fill the file (e.g. a library's save-to-stream), then publish it atomically."""
    with atomic_writer(path) as handle:
        write(handle)


def atomic_write_by_name(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write` create a file by name (a library that only writes to a path), under a temp name that
    remove_temp_files knows, then publish it atomically; on error nothing is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp_name))
        fd = os.open(tmp_name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def is_temp_file_name(name: str) -> bool:
    """Whether `name` is one of atomic_writer's temp files."""
    return _TEMP_NAME.fullmatch(name) is not None


def remove_temp_files(*roots: Path) -> int:
    """Delete the temp files interrupted writes left below `roots` (symlinks not followed); return how many."""
    found: set[str] = set()  # roots may nest (MODELS_DIR defaults to DATA_DIR/models): each file once
    for root in roots:
        for directory, _, names in os.walk(os.path.realpath(root)):
            found.update(os.path.join(directory, name) for name in names if is_temp_file_name(name))
    removed = 0
    for name in found:
        try:
            if stat.S_ISREG(os.lstat(name).st_mode):
                os.unlink(name)
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows opening a directory, hence the guard.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
