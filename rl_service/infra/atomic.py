"""Atomic file writes: a temp file in the target's directory, fsync, os.replace. Readers never see half a file.

A process killed mid-write leaves its temp file (`.<name>.<8 random characters>.tmp`); remove_temp_files clears
those at start-up, once the server owns the data directories.

Given a `root`, a write is confined to it at write time, not only when a request was checked: every directory
from the root down is opened with O_NOFOLLOW (and created there when missing), and the temp file and the rename
work relative to the last one's descriptor. A directory swapped for a symlink after the check fails the write
(PathEscapesRoot) instead of writing where the link points.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

# Exactly what atomic_writer's mkstemp call makes: its random part is 8 characters of [a-z0-9_].
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


_TEMP_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PathEscapesRoot(OSError):
    """A write would leave its root: a symlink (or a file) stands where a directory of the path should be."""


@contextlib.contextmanager
def atomic_writer(path: Path, root: Path | None = None) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces `path` only if the block completes; on error nothing is left behind.

    With `root`, `path` must lie below it and the write is confined to it (see the module docstring).
    """
    if root is not None:
        with _confined_writer(root, path) as handle:
            yield handle
        return
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


def atomic_write_bytes(path: Path, data: bytes, root: Path | None = None) -> None:
    """Write bytes atomically (confined to `root` when given)."""
    with atomic_writer(path, root) as handle:
        handle.write(data)


def json_bytes(data: Any) -> bytes:
    """JSON as the stores write it: UTF-8, indented, keys sorted."""
    return json.dumps(data, indent=2, sort_keys=True).encode("utf-8")


def atomic_write_json(path: Path, data: Any, root: Path | None = None) -> None:
    """Write JSON (UTF-8, indented) atomically (confined to `root` when given)."""
    atomic_write_bytes(path, json_bytes(data), root)


def atomic_write_with(path: Path, write: Callable[[IO[bytes]], None], root: Path | None = None) -> None:
    """Let `write` fill the file (e.g. a library's save-to-stream), then publish it atomically (confined to
    `root` when given)."""
    with atomic_writer(path, root) as handle:
        write(handle)


@contextlib.contextmanager
def _confined_writer(root: Path, path: Path) -> Iterator[IO[bytes]]:
    directory = _open_confined_parent(root, path)
    try:
        fd, tmp_name = _create_temp(directory, path.name)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            # Both names relative to the held directory: the rename cannot land anywhere else.
            os.replace(tmp_name, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name, dir_fd=directory)
            raise
        with contextlib.suppress(OSError):
            os.fsync(directory)
    finally:
        os.close(directory)


def _open_confined_parent(root: Path, path: Path) -> int:
    """A descriptor of `path`'s directory, reached from `root` one O_NOFOLLOW step at a time (made if missing)."""
    base = root.resolve()  # the operator's root may itself be a link; only what lies below it is held to this
    try:
        parts = path.relative_to(base).parts
    except ValueError:
        raise PathEscapesRoot(f"{path} is not inside {base}") from None
    if not parts or any(part in ("", ".", "..") for part in parts):
        raise PathEscapesRoot(f"{path} is not a file path inside {base}")
    base.mkdir(parents=True, exist_ok=True)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o777, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise PathEscapesRoot(f"{path}: {part!r} is a symlink or not a directory; refusing to write "
                                          f"outside {base}") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create_temp(directory: int, name: str) -> tuple[int, str]:
    """A new temp file beside `name` in the held directory, named as atomic_writer's are (see _TEMP_NAME)."""
    for _ in range(100):
        tmp_name = f".{name}.{''.join(secrets.choice(_TEMP_ALPHABET) for _ in range(8))}.tmp"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(tmp_name, flags, 0o600, dir_fd=directory), tmp_name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name beside {name}")


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
