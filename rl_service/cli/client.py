"""Channel and stub creation for the command line, the reachability check, and errors as exit codes."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from rl_service.cli.security import Security
from rl_service.healthcheck_main import unreachable_reason
from rl_service_proto.v1 import training_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
ADDRESS_VARIABLE = "RL_SERVICE_ADDRESS"
EXIT_OK = 0
EXIT_SERVER_ERROR = 1  # the server answered with an error, or the run did not succeed (health: not SERVING)
EXIT_UNREACHABLE = 2  # no server answers at the address (except `health`, which exits 1 and says why)
EXIT_USAGE = 2  # a wrong command line (argparse's code)
EXIT_INTERRUPTED = 130  # Ctrl+C, the shell's convention for SIGINT
CONNECT_TIMEOUT = 5.0
# Exports and histories can be large; the server's MAX_MESSAGE_BYTES is the real cap.
MAX_RECEIVE_BYTES = 1 << 30

T = TypeVar("T")


class CliError(Exception):
    """A failure reported on stderr, ending the command with `exit_code`: one line, and for a server error that
    names a request field, a second line `field: <path>`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def default_address() -> str:
    """$RL_SERVICE_ADDRESS, else the server's default listening address."""
    return os.environ.get(ADDRESS_VARIABLE, "").strip() or DEFAULT_ADDRESS


def error_fields(exc: grpc.RpcError) -> list[str]:
    """The request fields a server error names in its rich status (google.rpc.BadRequest), in order; [] if none.

    The server sends one for INVALID_ARGUMENT; an error without details (or from an older server) gives [].
    """
    if not callable(getattr(exc, "trailing_metadata", None)):
        return []
    try:
        status = rpc_status.from_call(exc)
    except ValueError:  # a details trailer that contradicts the code or message: ignore it, keep the message
        return []
    fields: list[str] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                for violation in bad.field_violations:
                    field = _printable(violation.field)
                    if field and field not in fields:
                        fields.append(field)
    return fields


def _printable(text: str) -> str:
    """The text with control characters escaped (a field path can carry a client's map key as it was sent)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def server_error(exc: grpc.RpcError) -> CliError:
    """A gRPC error from the server as `ERROR <CODE>: <message>`, then `field: <path>` when it names one; exit 1."""
    code = exc.code()
    details = exc.details() or ""
    text = f"ERROR {code.name}: {details}".rstrip(": ")
    fields = error_fields(exc)
    if fields:
        text += "\nfield: " + ", ".join(fields)
    return CliError(text, EXIT_SERVER_ERROR)


def unreachable(address: str, exc: grpc.RpcError, timeout: float) -> CliError:
    """One line naming the address and why it could not be reached, exit 2."""
    return CliError(f"cannot reach the server at {address}: {unreachable_reason(exc, timeout)}", EXIT_UNREACHABLE)


@dataclass
class Client:
    """A connected channel with the service's stubs; `call` turns server errors into CliError."""

    address: str
    timeout: float | None
    channel: grpc.Channel
    training: pb_grpc.TrainingServiceStub
    health: health_pb2_grpc.HealthStub

    @classmethod
    def connect(cls, address: str, timeout: float | None = None, security: Security | None = None) -> Client:
        """Open a channel (TLS and a token per `security`) and check that a server answers there (CliError exit 2
        if not)."""
        channel = (security or Security()).channel(
            address, options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)])
        client = cls(address, timeout, channel, pb_grpc.TrainingServiceStub(channel),
                     health_pb2_grpc.HealthStub(channel))
        probe_timeout = timeout or CONNECT_TIMEOUT
        try:
            # Health is always served, even while the server drains, and costs nothing.
            client.health.Check(health_pb2.HealthCheckRequest(), timeout=probe_timeout)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                channel.close()
                raise unreachable(address, exc, probe_timeout) from None
            # Anything else (a server without the health service) still means something answered.
        return client

    def deadline(self, default: float | None) -> float | None:
        """--timeout when given, else the command's own default (None: no deadline)."""
        return self.timeout if self.timeout is not None else default

    def call(self, method: Callable[..., T], request: Any, default_timeout: float | None = 30.0) -> T:
        """One unary call; a gRPC error becomes CliError (`ERROR CODE: message`, exit 1)."""
        try:
            return method(request, timeout=self.deadline(default_timeout))
        except grpc.RpcError as exc:
            raise server_error(exc) from None

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()
