"""One server per data directory, and none while a predecessor's workers still live.

The server takes an exclusive flock on DATA_DIR/server.lock before it touches any data directory and holds it
for its lifetime. A flock belongs to the open file description, not to a process or an fd: it is released only
when every fd referring to that description is closed. The executor hands that description to each worker
(multiprocessing passes it over SCM_RIGHTS through the fork server, or among spawn's inherited fds), and a worker
keeps it open until it ends, so the lock is free only once the server and all its workers are gone. (A worker
opening the file itself and taking a shared lock would not do: a second description's lock conflicts with the
server's exclusive one.) The fork server does not hold it: it never writes the data directories, and it dies
with its server (process_lifeline.py).

A second server waits LOCK_WAIT_SECONDS for a dying predecessor's processes to end, then refuses to start,
naming DATA_DIR and the pid the holder wrote into the file. The file is never deleted: unlinking a lock file
lets two processes lock two different inodes. flock is advisory and per host: it does not protect a DATA_DIR
shared by servers on several machines (NFS).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_FILE = "server.lock"
LOCK_WAIT_SECONDS = 5.0


class DataDirInUse(OSError):
    """Another server, or a worker it started, still holds DATA_DIR."""


class DataDirLock:
    """The exclusive lock on a data directory: held until release(), or until the server and its workers end."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, data_dir: Path, wait_seconds: float = LOCK_WAIT_SECONDS) -> DataDirLock:
        """Lock `data_dir` (created if missing), waiting up to `wait_seconds`; DataDirInUse names the holder."""
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children (PEP 446)
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise DataDirInUse(
                        f"DATA_DIR {data_dir.resolve()} is in use by another server (pid {_holder(path)}) or a "
                        f"worker it started; waited {wait_seconds:g}s. Stop that server or use another DATA_DIR"
                    ) from None
                time.sleep(0.1)
            except BaseException:
                os.close(fd)
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        """Close the server's fd (idempotent); the lock is free once no worker holds the description either."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _holder(path: Path) -> str:
    """The pid the holder wrote, or 'unknown'."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return "unknown"
    return text if text.isdigit() else "unknown"
