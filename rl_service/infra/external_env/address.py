"""Environment addresses: grpc://host:port (plaintext) and grpcs://host:port (TLS) with the
EXTERNAL_ENV_ALLOWED_HOSTS allow-list, and unix:PATH (gRPC's own naming for unix domain sockets) confined to
EXTERNAL_ENV_SOCKET_DIR.

An address is checked here before anything is contacted: no DNS lookup, no connection. A hostname is allowed only
if the list names it; an IP literal if the list names it or a network holding it. A socket path is allowed only if
it lies inside the socket directory once symlinks and `..` are resolved.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote, urlsplit

from rl_service.core.errors import InvalidRequest, PermissionDenied, quoted

SCHEME = "grpc"
TLS_SCHEME = "grpcs"  # the same, over TLS: the simulation's certificate is verified (EXTERNAL_ENV_CA_FILE)
UNIX_SCHEME = "unix"
DEFAULT_ALLOWED_HOSTS = "localhost,127.0.0.0/8,::1"
MAX_ADDRESS_LENGTH = 256
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*$")
MAX_SOCKET_PATH_BYTES = 107  # sun_path holds 108 bytes, the terminating NUL included
GRPC_USAGE = "expected grpc://HOST:PORT or grpcs://HOST:PORT (TLS), e.g. grpc://127.0.0.1:50061"
UNIX_USAGE = ("expected unix:NAME (inside EXTERNAL_ENV_SOCKET_DIR) or unix:///ABSOLUTE/PATH, "
              "e.g. unix:cartpole.sock")
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ExternalAddress:
    """A parsed address: grpc(s)://host:port (host and port set) or unix:PATH (socket_path set, host empty)."""

    url: str  # as written (stripped): what every message names
    host: str = ""
    port: int = 0
    socket_path: str = ""  # as written until SocketDirectory.resolve makes it absolute and symlink-free
    tls: bool = False  # grpcs://: the channel is TLS and the simulation's certificate must verify for `host`

    def __post_init__(self) -> None:
        if bool(self.socket_path) == bool(self.host):
            raise ValueError("an ExternalAddress holds either a host and port or a socket path")
        if self.tls and self.socket_path:
            raise ValueError("TLS is for grpcs://host:port addresses, not unix: sockets")

    @property
    def is_unix(self) -> bool:
        """True for a unix domain socket address."""
        return bool(self.socket_path)

    @property
    def target(self) -> str:
        """The gRPC channel target: host:port (IPv6 literals in brackets), or unix:PATH."""
        if self.is_unix:
            return unix_target(self.socket_path)
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def unix_target(path: str) -> str:
    """A socket path as a gRPC target; gRPC percent-decodes it, so anything unusual is escaped."""
    return f"{UNIX_SCHEME}:{quote(path, safe='/')}"


def parse_address(text: str, field: str = "env_id") -> ExternalAddress:
    """grpc://host:port, grpcs://host:port or unix:PATH -> ExternalAddress; InvalidRequest says what is wrong with
    anything else.

    A unix path is taken as written (relative or absolute); SocketDirectory.resolve places and checks it.
    """
    url = text.strip()
    if len(url) > MAX_ADDRESS_LENGTH:
        raise InvalidRequest(f"{field}: address longer than {MAX_ADDRESS_LENGTH} characters", field=field)
    if url.lower().startswith(f"{UNIX_SCHEME}:"):
        return _parse_unix(url, field)
    usage = GRPC_USAGE
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidRequest(f"{field}: {quoted(url)} is not a valid address ({exc}); {usage}", field=field) from None
    scheme = parts.scheme.lower()
    if scheme not in (SCHEME, TLS_SCHEME):
        raise InvalidRequest(f"{field}: {quoted(url)} is not a grpc://, grpcs:// or unix: address; {usage}, or "
                             f"{UNIX_USAGE}", field=field)
    if parts.username is not None or parts.password is not None or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise InvalidRequest(f"{field}: {quoted(url)} may hold only a host and a port; {usage}", field=field)
    host = (parts.hostname or "").lower()
    if not host:
        raise InvalidRequest(f"{field}: {quoted(url)} has no host; {usage}", field=field)
    if port is None or not 1 <= port <= 65535:
        raise InvalidRequest(f"{field}: {quoted(url)} needs a port in 1..65535; {usage}", field=field)
    if _ip(host) is None and not _HOSTNAME.match(host):
        raise InvalidRequest(f"{field}: {quoted(host)} is neither an IP address nor a hostname; {usage}", field=field)
    return ExternalAddress(url=url, host=host, port=port, tls=scheme == TLS_SCHEME)


def _parse_unix(url: str, field: str) -> ExternalAddress:
    """unix:PATH, unix:/ABS/PATH or unix:///ABS/PATH (gRPC's naming); the path as written."""
    path = url[len(UNIX_SCHEME) + 1:]
    if path.startswith("//"):  # unix://AUTHORITY/PATH: only an empty authority, as gRPC has it
        path = path[2:]
        if path and not path.startswith("/"):
            raise InvalidRequest(f"{field}: {quoted(url)} names a host; a socket address has none; {UNIX_USAGE}",
                                 field=field)
    if not path or path == "/":
        raise InvalidRequest(f"{field}: {quoted(url)} has no socket path; {UNIX_USAGE}", field=field)
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        raise InvalidRequest(f"{field}: {quoted(url)}: the socket path holds a NUL byte or another control "
                             f"character; {UNIX_USAGE}", field=field)
    if any(c in path for c in "?#%"):  # gRPC would read them as a query, a fragment or a percent-escape
        raise InvalidRequest(f"{field}: {quoted(url)} may hold only a socket path (no ?, # or %); {UNIX_USAGE}",
                             field=field)
    return ExternalAddress(url=url, socket_path=path)


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
        """PermissionDenied unless the address's host is allowed (a unix: address goes to SocketDirectory)."""
        if address.is_unix:
            raise ValueError(f"{address} is a unix: address; the host allow-list does not apply to it")
        if not self.allows(address.host):
            raise PermissionDenied(
                f"{field}: {address.url} is not allowed: host {address.host!r} does not match "
                f"EXTERNAL_ENV_ALLOWED_HOSTS ({self.text or 'empty'}); nothing was contacted", field=field)


@dataclass(frozen=True)
class SocketDirectory:
    """Where unix: addresses may point: inside EXTERNAL_ENV_SOCKET_DIR; None refuses every unix: address."""

    root: Path | None = None

    def resolve(self, address: ExternalAddress, field: str = "env_id") -> ExternalAddress:
        """The address with its socket path made absolute and symlink-free; PermissionDenied if it lies outside
        the directory (or none is configured), InvalidRequest if it is too long for a socket. Nothing is contacted.
        """
        if not address.is_unix:
            raise ValueError(f"{address} is not a unix: address")
        if self.root is None:
            raise PermissionDenied(
                f"{field}: {address.url} is not allowed: unix socket addresses are disabled; set "
                "EXTERNAL_ENV_SOCKET_DIR to the directory that holds the simulations' sockets; nothing was contacted",
                field=field)
        root = os.path.realpath(self.root)
        # realpath resolves symlinks and ".." of the whole path, so neither can lead out of the directory.
        path = os.path.realpath(os.path.join(root, address.socket_path))
        if path == root or os.path.commonpath([root, path]) != root:
            raise PermissionDenied(
                f"{field}: {address.url} is not allowed: the socket must lie inside EXTERNAL_ENV_SOCKET_DIR "
                f"({self.root}); nothing was contacted", field=field)
        size = len(os.fsencode(path))
        if size > MAX_SOCKET_PATH_BYTES:
            raise InvalidRequest(
                f"{field}: {address.url} resolves to a socket path of {size} bytes; a unix socket path holds "
                f"at most {MAX_SOCKET_PATH_BYTES} (sun_path); use a shorter name or EXTERNAL_ENV_SOCKET_DIR",
                field=field)
        return replace(address, socket_path=path)
