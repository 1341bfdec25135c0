"""Joining a Ray cluster (RAY_ADDRESS) or starting a local Ray instance bound to loopback, and leaving it.

Ray's ports run code for whoever reaches them (CVE-2023-48022), so a Ray instance this server starts by itself
listens on loopback only, and is checked to; a cluster is joined only where an operator names it (RAY_ADDRESS),
and its protection (token authentication, a private network) is the operator's (docs/architecture.md).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

INSTALL_HINT = "pip install 'rl-service[ray]'"
NAMESPACE = "rl-service"  # actors of this service, apart from anything else on a shared cluster
LOOPBACK = "127.0.0.1"


def ray_installed() -> bool:
    """True when the ray package (the `ray` extra) can be imported."""
    return importlib.util.find_spec("ray") is not None


class RayUnavailable(OSError):
    """Ray cannot be joined or started (an OSError: the server logs it as one line and exits 1)."""


@dataclass
class RayConnection:
    """This process's Ray driver: joined to a cluster, or owning a local instance it started."""

    started_local: bool
    node_ip: str
    seconds: float  # how long connecting (or starting the local instance) took

    def close(self) -> None:
        """Disconnect; a local instance this process started is stopped with it (its actors end either way)."""
        import ray

        ray.shutdown()


def connect(address: str) -> RayConnection:
    """Join the cluster at `address`, or start a local instance on loopback when it is empty."""
    if not ray_installed():
        raise RayUnavailable(f"EXECUTOR=ray needs the ray package: {INSTALL_HINT}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports to Anyscale from a server
    import ray

    if ray.is_initialized():
        raise RayUnavailable("this process is already a Ray driver: one EXECUTOR=ray server per process")
    started = time.perf_counter()
    try:
        if address and not _is_loopback(address.rsplit(":", 1)[0].strip("[]")):
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        elif address:  # a cluster on this machine's loopback (one machine trying it, the tests): stay there
            with _loopback_kept():
                ray.init(address=address, _node_ip_address=LOOPBACK, namespace=NAMESPACE, log_to_driver=False)
        else:
            with _loopback_kept():
                # "local": a new instance even when another is running on this machine (never someone else's).
                ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, namespace=NAMESPACE,
                         log_to_driver=False)
    except Exception as exc:
        what = f"join the Ray cluster at RAY_ADDRESS={address}" if address else "start a local Ray instance"
        raise RayUnavailable(f"cannot {what}: {type(exc).__name__}: {exc}") from None
    node_ip = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    if not address and not _is_loopback(node_ip):
        ray.shutdown()
        raise RayUnavailable(f"the local Ray instance came up on {node_ip}, not loopback; refusing to run it "
                             "(set RAY_ADDRESS to a protected cluster instead)")
    return RayConnection(started_local=not address, node_ip=node_ip, seconds=time.perf_counter() - started)


def _is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def _loopback_kept() -> Iterator[None]:
    """While starting a local instance or joining one on loopback: keep 127.0.0.1 as the address.

    Ray replaces a loopback node address with the machine's reachable one (and then listens on every interface)
    unless it believes multi-node clusters are off, as on macOS and Windows; for this one start, it is told so.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
