"""HEALTH_PORT: grpc.health.v1 alone, in plaintext, for probes that cannot speak TLS (Kubernetes' native gRPC).

It serves the main server's own HealthServicer, so both ports report the same statuses (NOT_SERVING while
starting and stopping). Nothing else is registered on it: no training, no policies, no reflection. It binds the
same host as GRPC_HOST.
"""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc

HEALTH_THREADS = 2  # probes are rare and answer from memory


def start_health_server(servicer: health.HealthServicer, host: str, port: int) -> tuple[grpc.Server, int]:
    """Start a plaintext server holding only `servicer` on host:port; returns it and its bound port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=HEALTH_THREADS, thread_name_prefix="health"),
                         options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on HEALTH_PORT {address}: {exc}") from None
    server.start()
    return server, bound
