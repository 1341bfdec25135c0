"""Whether the server may listen where it is told to: secure by default.

A loopback address (127.0.0.0/8, ::1, "localhost") is reachable from this machine only, so it may serve
plaintext without tokens. Any other address (0.0.0.0, ::, a LAN address, a hostname) needs both TLS and bearer
tokens, or ALLOW_INSECURE=true, which starts the server anyway with a warning. The decision uses the address's
text alone: a hostname other than "localhost" is never resolved, so it counts as exposed.
"""

from __future__ import annotations

import ipaddress

from rl_service.infra.config_errors import ConfigurationError


class InsecureBindRefused(ConfigurationError):
    """A non-loopback address without TLS and tokens, and ALLOW_INSECURE is not set."""


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also as ::ffff:127.x.y.z or in brackets) and "localhost"."""
    text = host.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False  # a hostname: never resolved, so never assumed to be local
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_exposure(host: str, *, tls: bool, tokens: bool, allow_insecure: bool) -> str | None:
    """None when `host` may be served as configured; the warning to log when only ALLOW_INSECURE lets it start.

    InsecureBindRefused (one line naming the settings) when a non-loopback host lacks TLS or tokens.
    """
    if is_loopback_host(host):
        return None
    missing = []
    if not tls:
        missing.append("TLS (TLS_CERT_FILE and TLS_KEY_FILE)")
    if not tokens:
        missing.append("tokens (AUTH_TOKENS_FILE)")
    if not missing:
        return None
    what = " and ".join(missing)
    if not allow_insecure:
        raise InsecureBindRefused(
            f"refusing to listen on GRPC_HOST={host!r}, which is not a loopback address, without {what}: set "
            f"{_listed(_settings(tls, tokens))}, or GRPC_HOST=127.0.0.1, or ALLOW_INSECURE=true to start anyway")
    return (f"listening on GRPC_HOST={host!r}, which is not a loopback address, without {what}, because "
            "ALLOW_INSECURE=true: anyone who can reach the port can use the service")


def _listed(names: list[str]) -> str:
    """'A', 'A and B', 'A, B and C'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _settings(tls: bool, tokens: bool) -> list[str]:
    names = [] if tls else ["TLS_CERT_FILE", "TLS_KEY_FILE"]
    return names + ([] if tokens else ["AUTH_TOKENS_FILE"])
