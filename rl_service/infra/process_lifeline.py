"""Workers live and die with their server, and a stopping server always ends.

A worker whose server is gone must not write another byte into the data directories: a restarted server owns
them (it marks the run INTERRUPTED, may resume it, prunes its checkpoints). So such a worker does not save and
stop: it is killed (SIGKILL). A write it had begun leaves only a temp file (atomic.py), which the next start-up
removes once it holds the data-directory lock (data_dir_lock.py). Three mechanisms end it:

- The fork server imports `forkserver_lifeline` first of its preload list, which asks Linux for
  prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills it when the server thread that started it ends (the thread
  that built the executor; the main thread in server.py).
- A worker the fork server forked does the same against the fork server (a one-threaded loop), so a dying server
  takes the fork server and then every worker with it at once, whatever killed it (SIGKILL included).
  A spawned worker's parent is whichever server thread launched it (an RPC or event thread, which may end
  before the server does), so under spawn a worker relies on the lifeline alone.
- The portable lifeline, on every platform and start method: multiprocessing keeps, in the server only (in the
  Process object, which the executor keeps until the worker has ended), the write end of a pipe whose read end
  the worker holds as `multiprocessing.parent_process().sentinel` (the server's, also under forkserver). A thread
  in the worker waits on it and kills the worker at EOF, which only the end of the server brings. The fork
  server then exits by itself: it stops once no process holds its "alive" pipe, and only the server and workers
  do.

The death signal is requested after fork, so the parent may already be gone: a check of getppid() after prctl
closes that race. The expected parent travels in SERVER_PID_ENV for the fork server and in a module global (set
in the fork server, inherited by fork) for workers.

exit_later() is the shutdown watchdog: past its deadline it logs and ends the process, whatever hangs.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time

from rl_service.infra.logging_setup import get_logger

SERVER_PID_ENV = "RL_SERVICE_SERVER_PID"
FORKSERVER_PRELOAD = "rl_service.infra.forkserver_lifeline"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Time the Python watchdog thread gets before faulthandler's (which needs no GIL) steps in.
_GIL_BACKSTOP_SECONDS = 3.0

_fork_server_pid: int | None = None  # set in the fork server; the workers it forks inherit the value


def die_with_parent(parent_pid: int) -> bool:
    """Linux: have the kernel SIGKILL this process when its parent thread ends; at once if `parent_pid` is gone."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent_pid:  # the parent died before prctl: no signal will ever come
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def arm_fork_server() -> None:
    """In the fork server, at import: die with the server, and leave this pid to the workers it forks."""
    global _fork_server_pid
    _fork_server_pid = os.getpid()
    server = os.environ.get(SERVER_PID_ENV, "")
    if server.isdigit() and int(server) != os.getpid():  # imported by the server itself: nothing to do
        die_with_parent(int(server))


def arm_worker() -> None:
    """In a worker, before anything else: die with the fork server (Linux) and with the server (everywhere)."""
    if _fork_server_pid is not None and _fork_server_pid != os.getpid():
        die_with_parent(_fork_server_pid)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_die_with_server, args=(parent.sentinel,), name="lifeline", daemon=True).start()


def _die_with_server(sentinel: int) -> None:
    """Block until the server's end of the pipe closes, then kill this process."""
    multiprocessing.connection.wait([sentinel])
    with contextlib.suppress(Exception):  # stderr may be a pipe that died with the server
        get_logger("executor").warning("server process is gone; worker ends now")
    os.kill(os.getpid(), signal.SIGKILL)


def exit_later(seconds: float, event: str) -> None:
    """Unless the process has ended within `seconds`, log `event` and end it with exit code 1."""

    def watch() -> None:
        time.sleep(seconds)
        with contextlib.suppress(Exception):
            get_logger("server").error(event, deadline_seconds=round(seconds, 3))
            sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="exit-watchdog", daemon=True).start()
    # A stuck C call that holds the GIL would starve the thread above; faulthandler's watchdog needs no GIL. It
    # prints every thread's stack (what hung) and exits 1.
    faulthandler.dump_traceback_later(seconds + _GIL_BACKSTOP_SECONDS, exit=True)
