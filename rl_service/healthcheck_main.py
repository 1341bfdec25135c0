"""Health probe: exit 0 when the server answers SERVING, 1 otherwise (a Kubernetes exec probe).

The one implementation of the check: `healthcheck.py`, `rl-service-healthcheck` and `rl-service health` all call
`probe`, print its one line (never empty: the status seen, or why nothing answered) and exit with its code:
0 SERVING; 1 not serving, unknown service, or the server cannot be reached (a failed TLS handshake included);
2 only for a wrong command line (an unreadable --ca-file, --cert-file or --key-file included).

A TLS port is probed with --tls (the server's certificate verified against --ca-file, or the system's roots),
and a mutual-TLS port with --cert-file and --key-file as well; any of those flags implies --tls.
"""

from __future__ import annotations

import argparse
import os
import re
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
# gRPC's details of a failed handshake: "...: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL:
# error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired: OK".
_HANDSHAKE = re.compile(r"handshake failed.*?OPENSSL_internal:([A-Z0-9_]+)(?::\s*([^:]*))?", re.IGNORECASE)
_NOISE = ("", "OK", "Invalid certificate verification context")


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
    tls = tls_failure(str(exc.details() or ""))
    if tls is not None:
        return tls
    # e.g. "failed to connect to all addresses; last error: ...: Connection refused" -> "connection refused"
    details = str(exc.details() or exc.code().name).strip().rstrip("]")
    reason = details.rsplit(": ", 1)[-1].strip() or exc.code().name
    return reason[:1].lower() + reason[1:]


def open_probe_channel(address: str, credentials: grpc.ChannelCredentials | None = None,
                       server_name: str | None = None) -> grpc.Channel:
    """Plaintext without credentials; TLS with them, the certificate checked for `server_name` when given (a
    probe of 127.0.0.1 inside the server's container, say, while the certificate names the public host)."""
    if credentials is None:
        return grpc.insecure_channel(address)
    options = [] if server_name is None else [("grpc.ssl_target_name_override", server_name)]
    return grpc.secure_channel(address, credentials, options=options)


def tls_failure(details: str) -> str | None:
    """Why a TLS handshake failed, from gRPC's details ('TLS handshake failed: CERTIFICATE_VERIFY_FAILED
    (certificate has expired)'); None when the details tell of no TLS failure."""
    if "hostname verification check failed" in details.lower():
        return "TLS: the server's certificate does not name the host dialled"
    match = _HANDSHAKE.search(details)
    if match is None:
        return None
    code, text = match.group(1), (match.group(2) or "").strip()
    if code == "WRONG_VERSION_NUMBER":  # a plaintext server answered the TLS hello
        text = "does the port serve plaintext?"
    elif text in _NOISE:
        text = ""
    return f"TLS handshake failed: {code}" + (f" ({text})" if text else "")


def probe(address: str, service: str = "", timeout: float = DEFAULT_TIMEOUT,
          credentials: grpc.ChannelCredentials | None = None, server_name: str | None = None) -> HealthReport:
    """Ask the health service at `address` once about `service` ('' for the whole server); over TLS when
    `credentials` are given (rl_service.infra.tls.channel_credentials)."""
    try:
        with open_probe_channel(address, credentials, server_name) as channel:
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
    tls = parser.add_argument_group("TLS (any of these flags implies --tls)")
    tls.add_argument("--tls", action="store_true", help="the port serves TLS (TLS_CERT_FILE is set)")
    tls.add_argument("--ca-file", metavar="PEM", help="CA bundle the server's certificate must chain to "
                                                      "(default: the system's roots)")
    tls.add_argument("--cert-file", metavar="PEM", help="client certificate, for a mutual-TLS port "
                                                        "(TLS_CLIENT_CA_FILE is set)")
    tls.add_argument("--key-file", metavar="PEM", help="private key of --cert-file")
    tls.add_argument("--server-name", metavar="NAME",
                     help="the name the server's certificate must hold, when --address uses another")
    args = parser.parse_args(argv)  # a usage error exits 2 here
    credentials = None
    if args.tls or any(v is not None for v in (args.ca_file, args.cert_file, args.key_file, args.server_name)):
        from rl_service.infra.tls import TlsFileError, channel_credentials

        try:
            credentials = channel_credentials(args.ca_file, args.cert_file, args.key_file)
        except TlsFileError as exc:
            parser.error(str(exc))  # exits 2: the command line names a file that cannot be used
    report = probe(args.address, args.service, args.timeout, credentials, args.server_name)
    sys.stdout.write(report.text + "\n")
    sys.stdout.flush()
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
