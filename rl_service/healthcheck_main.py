"""Health probe: exit 0 when the server answers SERVING, 1 otherwise (a Kubernetes exec probe).

The one implementation of the check: `healthcheck.py`, `rl-service-healthcheck` and `rl-service health` all call
`probe`, print its one line (never empty: the status seen, or why nothing answered) and exit with its code:
0 SERVING; 1 not serving, unknown service, or the server cannot be reached; 2 only for a wrong command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1  # NOT_SERVING, an unknown service, an error answer, or nothing answers at the address
EXIT_USAGE = 2  # a wrong command line (argparse's code), and nothing else
DEFAULT_TIMEOUT = 3.0
# Codes that mean no server answered the call (as opposed to a server answering with an error).
UNREACHABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class HealthReport:
    """What one probe saw: `text` is one non-empty line naming the address and the status or the reason."""

    address: str
    service: str
    serving: bool
    text: str

    @property
    def exit_code(self) -> int:
        """0 when SERVING, 1 otherwise."""
        return EXIT_SERVING if self.serving else EXIT_NOT_SERVING


def unreachable_reason(exc: grpc.RpcError, timeout: float) -> str:
    """Why nothing answered, in a few words: 'connection refused', 'no answer within 3s', 'domain name not found'."""
    if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {timeout:g}s"
    # e.g. "failed to connect to all addresses; last error: ...: Connection refused" -> "connection refused"
    details = str(exc.details() or exc.code().name).strip().rstrip("]")
    reason = details.rsplit(": ", 1)[-1].strip() or exc.code().name
    return reason[:1].lower() + reason[1:]


def probe(address: str, service: str = "", timeout: float = DEFAULT_TIMEOUT,
          credentials: grpc.ChannelCredentials | None = None) -> HealthReport:
    """Ask the health service at `address` once about `service` ('' for the whole server); over TLS with
    `credentials`."""
    try:
        with (grpc.insecure_channel(address) if credentials is None
              else grpc.secure_channel(address, credentials)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code()
        if code in UNREACHABLE_CODES:
            text = f"cannot reach the server at {address}: {unreachable_reason(exc, timeout)} ({code.name})"
        else:  # a server answered, with an error: NOT_FOUND for an unknown service, UNIMPLEMENTED without health
            details = (exc.details() or "").strip()
            text = f"{address}: {code.name}" + (f": {details}" if details else "")
        return HealthReport(address, service, False, text)
    try:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except ValueError:
        status = f"UNKNOWN({reply.status})"
    return HealthReport(address, service, reply.status == health_pb2.HealthCheckResponse.SERVING,
                        f"{address}: {status}")


def check(address: str, service: str = "", timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, str]:
    """(is SERVING, the line to print) for one service at one address."""
    report = probe(address, service, timeout)
    return report.serving, report.text


def positive_seconds(text: str) -> float:
    """argparse type for --timeout: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _address(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty; give host:port")
    return text.strip()


def default_address() -> str:
    """GRPC_HOST:GRPC_PORT from the environment; a wildcard bind is probed on loopback."""
    host = os.environ.get("GRPC_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{os.environ.get('GRPC_PORT', '50051')}"


def main(argv: Sequence[str] | None = None) -> int:
    """Ask the health service once and print one line: exit 0 when SERVING, 1 when not serving or unreachable
    (2: a wrong command line)."""
    parser = argparse.ArgumentParser(prog="healthcheck.py", description=main.__doc__)
    parser.add_argument("--address", type=_address, default=default_address(),
                        help="host:port (default from GRPC_HOST/GRPC_PORT)")
    parser.add_argument("--service", default="", help="service name; empty for the whole server")
    parser.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT,
                        help="seconds to wait for an answer")
    args = parser.parse_args(argv)  # a usage error exits 2 here
    report = probe(args.address, args.service, args.timeout)
    sys.stdout.write(report.text + "\n")
    sys.stdout.flush()
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
