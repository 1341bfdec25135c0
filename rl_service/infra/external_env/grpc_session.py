"""The adapter's transport: connection options, the channel, GetSpec, and the Session stream with its deadlines.

GrpcExternalEnvAdapter (grpc_adapter.py) builds on these; they know the wire, not the adapter contract.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from rl_service.core.errors import EnvironmentProtocolError, EnvironmentUnavailable
from rl_service.infra.external_env.address import ExternalAddress
from rl_service.infra.external_env.codec import EnvSpec, MalformedData, spec_from_proto
from rl_service_proto.v1 import environment_pb2 as pb
from rl_service_proto.v1 import environment_pb2_grpc as pb_grpc

_END = object()  # ends the Session request iterator
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


@dataclass(frozen=True)
class ConnectionOptions:
    """How the adapter talks to a simulation (from the ENV_* settings)."""

    step_timeout: float = 10.0  # deadline of each Reset and Step (ENV_STEP_TIMEOUT_SECONDS)
    connect_timeout: float = 5.0  # deadline of GetSpec, at StartTraining and on reconnects
    retries: int = 5  # reconnect attempts after a lost connection (ENV_CONNECT_RETRIES)
    backoff: float = 1.0  # first wait before reconnecting, doubled per attempt (ENV_RETRY_BACKOFF_SECONDS)
    max_backoff: float = 30.0
    max_message_bytes: int = 16 * 1024 * 1024
    use_stream: bool = True  # the Session stream (false: unary Reset/Step)
    # PEM roots that grpcs:// simulations' certificates must chain to (EXTERNAL_ENV_CA_FILE, or the system's bundle,
    # read once at start-up); None: the roots gRPC ships. Bytes, not a path, so a worker never reads a file.
    tls_roots: bytes | None = field(default=None, repr=False)

    def backoff_for(self, attempt: int) -> float:
        """Seconds to wait before reconnect attempt `attempt` (from 1)."""
        return float(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))


class Lost(Exception):
    """The connection is gone (retryable); `cause` says how."""

    def __init__(self, call: str, cause: str) -> None:
        super().__init__(f"{call}: {cause}")
        self.call = call
        self.cause = cause


def open_channel(address: ExternalAddress, options: ConnectionOptions) -> grpc.Channel:
    """A channel with the message size caps: TLS for grpcs:// (the certificate verified for the address's host),
    plaintext for grpc:// and unix:."""
    channel_options = [
        ("grpc.max_receive_message_length", options.max_message_bytes),
        ("grpc.max_send_message_length", options.max_message_bytes),
    ]
    if address.tls:
        credentials = grpc.ssl_channel_credentials(root_certificates=options.tls_roots)
        return grpc.secure_channel(address.target, credentials, options=channel_options)
    return grpc.insecure_channel(address.target, options=channel_options)


def fetch_spec(address: ExternalAddress, options: ConnectionOptions) -> EnvSpec:
    """Ask a simulation for its spec once, within connect_timeout; EnvironmentUnavailable if it cannot answer."""
    channel = open_channel(address, options)
    try:
        return get_spec(pb_grpc.EnvironmentServiceStub(channel), address, options)
    except Lost as lost:
        raise EnvironmentUnavailable(f"env {address} is not reachable: {lost.cause}", field="env_id") from None
    finally:
        channel.close()


def get_spec(stub: pb_grpc.EnvironmentServiceStub, address: ExternalAddress, options: ConnectionOptions) -> EnvSpec:
    """GetSpec, checked; Lost when the simulation cannot be reached (or does not answer in connect_timeout)."""
    try:
        message = stub.GetSpec(pb.GetSpecRequest(), timeout=options.connect_timeout)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        if code in RETRYABLE:
            raise Lost("GetSpec", f"{code.name}: {details}{_tls_hint(address, details)}") from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise Lost("GetSpec", f"no answer to GetSpec within {options.connect_timeout:g}s "
                                  "(ENV_CONNECT_TIMEOUT_SECONDS)") from None
        raise EnvironmentUnavailable(f"env {address}: GetSpec failed: {code.name}: {details}",
                                     field="env_id") from None
    try:
        return spec_from_proto(message)
    except MalformedData as exc:
        raise EnvironmentProtocolError(f"env {address} sent a malformed spec: {exc}", field="env_id") from None


def _tls_hint(address: ExternalAddress, details: str | None) -> str:
    """What to check when a grpcs:// simulation's certificate did not verify."""
    if address.tls and "CERTIFICATE_VERIFY_FAILED" in (details or ""):
        return (" (the simulation's certificate does not verify against EXTERNAL_ENV_CA_FILE, or the system's roots "
                "when it is unset, for the host in the address)")
    return ""


class SessionStream:
    """The Session stream: requests go out in order and are answered in order, several may be in flight.

    Deadlines: the oldest unanswered request must be answered within `timeout` of the later of its sending and the
    previous answer (a simulation works through pipelined requests one at a time, so each gets the full timeout
    of its own). A watchdog thread cancels the stream past that deadline; it sleeps until the deadline it knows
    of, so it wakes about once per timeout however many exchanges go by, not once per exchange.
    """

    def __init__(self, stub: pb_grpc.EnvironmentServiceStub, timeout: float) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        request_iterator: Iterator[pb.SessionRequest] = iter(self._requests.get, _END)
        self._responses: Any = stub.Session(request_iterator)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._sent = 0  # requests sent and not yet answered
        self._clock = 0.0  # monotonic time the oldest unanswered request's deadline counts from
        self.exchanges = 0  # answers received
        self.timed_out = False
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="env-session-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return self._sent

    def send(self, request: pb.SessionRequest) -> None:
        """Queue one request for the stream (never blocks; failures surface in receive)."""
        with self._lock:
            if self._sent == 0:
                self._clock = time.monotonic()
            self._sent += 1
        self._requests.put(request)

    def receive(self) -> pb.SessionResponse:
        """The answer to the oldest unanswered request (RpcError, or StopIteration when the stream ends)."""
        response: pb.SessionResponse = next(self._responses)
        with self._lock:
            self._sent -= 1
            self._clock = time.monotonic()  # the next request's turn starts now
        self.exchanges += 1
        return response

    def exchange(self, request: pb.SessionRequest) -> pb.SessionResponse:
        """Send one request and wait for its answer (nothing else in flight)."""
        self.send(request)
        return self.receive()

    def _deadline(self) -> float | None:
        with self._lock:
            return self._clock + self._timeout if self._sent else None

    def _watch(self) -> None:
        while True:
            deadline = self._deadline()
            wait = self._timeout if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                self.timed_out = True
                self._responses.cancel()
                return
            if self._closed.wait(wait):
                return

    def close(self) -> None:
        """Half-close the stream and cancel it; stop the watchdog."""
        self._closed.set()
        self._requests.put(_END)
        self._responses.cancel()


class StreamUnimplemented(Exception):
    """The simulation does not implement Session."""
