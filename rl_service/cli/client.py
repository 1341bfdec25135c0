"""Channel and stub creation for the command line, the reachability check, and errors as exit codes."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rl_service_proto.v1 import training_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
ADDRESS_VARIABLE = "RL_SERVICE_ADDRESS"
EXIT_OK = 0
EXIT_SERVER_ERROR = 1  # the server answered with an error, or the run did not succeed
EXIT_UNREACHABLE = 2  # no server answers at the address
EXIT_USAGE = 2  # a wrong command line (argparse's code)
EXIT_INTERRUPTED = 130  # Ctrl+C, the shell's convention for SIGINT
CONNECT_TIMEOUT = 5.0
# Exports and histories can be large; the server's MAX_MESSAGE_BYTES is the real cap.
MAX_RECEIVE_BYTES = 1 << 30

T = TypeVar("T")


class CliError(Exception):
    """A failure reported as one line on stderr, ending the command with `exit_code`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def default_address() -> str:
    """$RL_SERVICE_ADDRESS, else the server's default listening address."""
    return os.environ.get(ADDRESS_VARIABLE, "").strip() or DEFAULT_ADDRESS


def server_error(exc: grpc.RpcError) -> CliError:
    """A gRPC error from the server as `ERROR <CODE>: <message>`, exit 1."""
    code = exc.code()
    details = exc.details() or ""
    return CliError(f"ERROR {code.name}: {details}".rstrip(": "), EXIT_SERVER_ERROR)


def unreachable(address: str, exc: grpc.RpcError, timeout: float) -> CliError:
    """One line naming the address and why it could not be reached, exit 2."""
    if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        reason = f"no answer within {timeout:g}s"
    else:
        # e.g. "failed to connect to all addresses; last error: ...: Connection refused" -> "connection refused"
        details = (exc.details() or exc.code().name).strip().rstrip("]")
        reason = details.rsplit(": ", 1)[-1].strip()
        reason = reason[:1].lower() + reason[1:]
    return CliError(f"cannot reach the server at {address}: {reason}", EXIT_UNREACHABLE)


@dataclass
class Client:
    """A connected channel with the service's stubs; `call` turns server errors into CliError."""

    address: str
    timeout: float | None
    channel: grpc.Channel
    training: pb_grpc.TrainingServiceStub
    health: health_pb2_grpc.HealthStub

    @classmethod
    def connect(cls, address: str, timeout: float | None = None) -> Client:
        """Open a channel and check that a server answers there (CliError exit 2 if not)."""
        channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)])
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
