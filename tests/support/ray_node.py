"""`python -m tests.support.ray_node start ...`: Ray's own `ray start`, with a loopback node address kept.

Ray replaces --node-ip-address=127.0.0.1 with the machine's reachable address (and then listens on every
interface); the test cluster's nodes must stay on loopback, so that replacement is turned off for loopback
addresses here. Everything else is Ray's command line, unchanged.
"""

from __future__ import annotations

import ipaddress
import sys

from ray._private import services
from ray.scripts.scripts import main

_resolve = services.resolve_ip_for_localhost


def _keep_loopback(host: str) -> str:
    """127.0.0.1 stays itself; anything else resolves as Ray would."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    return str(_resolve(host))


if __name__ == "__main__":
    services.resolve_ip_for_localhost = _keep_loopback  # type: ignore[assignment]
    sys.argv[0] = "ray"
    sys.exit(main())
