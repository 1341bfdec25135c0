"""Health probe: exit 0 when the server answers SERVING, 1 otherwise (a Kubernetes exec probe)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """(is SERVING, what was seen) for one service at one address."""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        return False, f"{address}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, check once, print one line, exit 0 or 1."""
    host = os.environ.get("GRPC_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # a wildcard bind is probed on loopback
    host = f"[{host}]" if ":" in host else host
    default_address = f"{host}:{os.environ.get('GRPC_PORT', '50051')}"
    parser = argparse.ArgumentParser(prog="healthcheck.py", description=main.__doc__)
    parser.add_argument("--address", default=default_address, help="host:port (default from GRPC_HOST/GRPC_PORT)")
    parser.add_argument("--service", default="", help="service name; empty for the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    args = parser.parse_args(argv)
    ok, text = check(args.address, args.service, args.timeout)
    sys.stdout.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
