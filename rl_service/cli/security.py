"""How the command line reaches a secured server: TLS credentials from --tls/--ca-file/--cert-file/--key-file, and
a bearer token (--token or $RL_SERVICE_TOKEN) sent as `authorization: Bearer TOKEN` on every call."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

TOKEN_VARIABLE = "RL_SERVICE_TOKEN"
MAX_TOKEN_CHARS = 4096  # far above any token `rl-service token create` makes; keeps one metadata entry small


class SecurityFlagError(ValueError):
    """A security flag cannot be used (a usage error: exit 2); the message names the flag, never the token."""


@dataclass(frozen=True)
class Security:
    """TLS credentials (None: plaintext) and a bearer token (None: send none)."""

    credentials: grpc.ChannelCredentials | None = None
    token: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Security:
        """From the parsed flags; --ca-file, --cert-file and --key-file imply --tls. SecurityFlagError if unusable."""
        ca, cert, key = (getattr(args, name, None) for name in ("ca_file", "cert_file", "key_file"))
        if (cert is None) != (key is None):
            raise SecurityFlagError("--cert-file and --key-file go together (a client certificate and its key)")
        credentials = None
        if getattr(args, "tls", False) or ca or cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ca, "--ca-file"), private_key=_read(key, "--key-file"),
                certificate_chain=_read(cert, "--cert-file"))
        return cls(credentials, _token(getattr(args, "token", None)))

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A channel to `address`: TLS when configured, the token on every call when given."""
        if self.credentials is not None:
            channel = grpc.secure_channel(address, self.credentials, options=list(options))
        else:
            channel = grpc.insecure_channel(address, options=list(options))
        return grpc.intercept_channel(channel, BearerToken(self.token)) if self.token else channel


def _read(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityFlagError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None


def _token(flag: str | None) -> str | None:
    """--token, else $RL_SERVICE_TOKEN, else None; a value gRPC metadata cannot carry is refused."""
    token = (flag if flag is not None else os.environ.get(TOKEN_VARIABLE, "")).strip()
    if not token:
        return None
    if len(token) > MAX_TOKEN_CHARS or not all(33 <= ord(c) <= 126 for c in token):
        source = "--token" if flag is not None else f"${TOKEN_VARIABLE}"
        raise SecurityFlagError(f"{source}: a token is printable ASCII without spaces, at most {MAX_TOKEN_CHARS} "
                                "characters")
    return token


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _CallDetails(_Details, grpc.ClientCallDetails):  # type: ignore[misc]
    """ClientCallDetails with the token added to its metadata."""


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Adds `authorization: Bearer TOKEN` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._entry]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        """Unary calls."""
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        """Server-streaming calls (WatchTraining)."""
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: grpc.ClientCallDetails, requests: Any) -> Any:
        """Client-streaming calls."""
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: grpc.ClientCallDetails, requests: Any) -> Any:
        """Bidirectional calls."""
        return continuation(self._details(details), requests)
