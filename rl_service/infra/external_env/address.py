"""grpc://host:port environment addresses and the EXTERNAL_ENV_ALLOWED_HOSTS allow-list.

An address is checked here, from its text alone, before anything is contacted: no DNS lookup, no connection. A
hostname is allowed only if the list names it; an IP literal if the list names it or a network holding it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from rl_service.core.errors import InvalidRequest, PermissionDenied

SCHEME = "grpc"
DEFAULT_ALLOWED_HOSTS = "localhost,127.0.0.0/8,::1"
MAX_ADDRESS_LENGTH = 256
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*$")
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ExternalAddress:
    """A parsed grpc://host:port address."""

    url: str
    host: str
    port: int

    @property
    def target(self) -> str:
        """The gRPC channel target: host:port, with IPv6 literals in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def is_external_address(env_id: str) -> bool:
    """True when env_id names a simulation (grpc://...) rather than a Gymnasium id."""
    return env_id.strip().lower().startswith(f"{SCHEME}://")


def parse_address(text: str, field: str = "env_id") -> ExternalAddress:
    """grpc://host:port -> ExternalAddress; InvalidRequest says what is wrong with anything else."""
    url = text.strip()
    usage = "expected grpc://HOST:PORT, e.g. grpc://127.0.0.1:50061"
    if len(url) > MAX_ADDRESS_LENGTH:
        raise InvalidRequest(f"{field}: address longer than {MAX_ADDRESS_LENGTH} characters", field=field)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidRequest(f"{field}: {url!r} is not a valid address ({exc}); {usage}", field=field) from None
    if parts.scheme.lower() != SCHEME:
        raise InvalidRequest(f"{field}: {url!r} is not a grpc:// address; {usage}", field=field)
    if parts.username is not None or parts.password is not None or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise InvalidRequest(f"{field}: {url!r} may hold only a host and a port; {usage}", field=field)
    host = (parts.hostname or "").lower()
    if not host:
        raise InvalidRequest(f"{field}: {url!r} has no host; {usage}", field=field)
    if port is None or not 1 <= port <= 65535:
        raise InvalidRequest(f"{field}: {url!r} needs a port in 1..65535; {usage}", field=field)
    if _ip(host) is None and not _HOSTNAME.match(host):
        raise InvalidRequest(f"{field}: {host!r} is neither an IP address nor a hostname; {usage}", field=field)
    return ExternalAddress(url=url, host=host, port=port)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True)
class HostAllowList:
    """Hosts a run may reach: "*" (any), hostnames, IP addresses and networks (CIDR); "none" for no host."""

    any_host: bool = False
    names: frozenset[str] = frozenset()
    networks: tuple[IpNetwork, ...] = ()
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> HostAllowList:
        """From a comma-separated list such as "localhost,127.0.0.0/8,::1"; ValueError names a bad entry."""
        return cls.from_entries(text.split(","), text)

    @classmethod
    def from_entries(cls, entries: Iterable[str], text: str = "") -> HostAllowList:
        """From separate entries; blanks are skipped."""
        names: set[str] = set()
        networks: list[IpNetwork] = []
        any_host = False
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "none":
                continue  # "none" alone: no host is allowed
            if entry == "*":
                any_host = True
            elif "/" in entry or _ip(entry.strip("[]")) is not None:
                try:
                    networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                except ValueError as exc:
                    raise ValueError(f"allowed host {raw.strip()!r}: {exc}") from None
            elif _HOSTNAME.match(entry):
                names.add(entry)
            else:
                raise ValueError(f"allowed host {raw.strip()!r} is not a hostname, IP address, network or *")
        return cls(any_host, frozenset(names), tuple(networks), text or ",".join(e.strip() for e in entries))

    def allows(self, host: str) -> bool:
        """Whether `host` (from a parsed address) may be contacted."""
        if self.any_host or host in self.names:
            return True
        ip = _ip(host)
        return ip is not None and any(ip.version == net.version and ip in net for net in self.networks)

    def check(self, address: ExternalAddress, field: str = "env_id") -> None:
        """PermissionDenied unless the address's host is allowed."""
        if not self.allows(address.host):
            raise PermissionDenied(
                f"{field}: {address.url} is not allowed: host {address.host!r} does not match "
                f"EXTERNAL_ENV_ALLOWED_HOSTS ({self.text or 'empty'}); nothing was contacted", field=field)
