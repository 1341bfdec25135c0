"""uvicorn in a thread of the server's process, on GRPC_HOST:HTTP_PORT, with the gRPC port's TLS (mutual when
TLS_CLIENT_CA_FILE is set). The socket is bound here, before the thread starts, so a port in use fails start-up
and port 0's number is known at once."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any

import uvicorn

from rl_service.infra.settings import Settings

STARTUP_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0


class HttpServer:
    """One uvicorn server serving `app` on its own bound socket."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self._socket = _bind(settings.grpc_host, settings.http_port)
        self.port: int = self._socket.getsockname()[1]
        tls: dict[str, Any] = {}
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            tls = {"ssl_certfile": str(settings.tls_cert_file), "ssl_keyfile": str(settings.tls_key_file)}
            if settings.tls_client_ca_file is not None:
                tls.update(ssl_ca_certs=str(settings.tls_client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
        self.scheme = "https" if tls else "http"
        # No access log and no logging config of uvicorn's own: the project's logging (and audit lines) apply, and
        # uvicorn itself speaks only of problems. No proxy headers: the audit line's peer is the socket's.
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                proxy_headers=False, timeout_graceful_shutdown=5, **tls)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="http", daemon=True)

    def start(self) -> None:
        """Serve; returns once uvicorn accepts connections (OSError when it ended or did not start in time)."""
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"the HTTP server on port {self.port} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving (open streams are closed) and release the port."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_SECONDS)
        self._socket.close()


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is an IPv6 address); OSError naming HTTP_PORT."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((text, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on HTTP_PORT {text}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(False)
    return sock


def start_http_api(settings: Settings, training: Any, policies: Any, health_servicer: Any, auth: Any,
                   metrics: Any) -> HttpServer:
    """Build the app over the gRPC servicers and serve it (OSError when HTTP_PORT cannot be served)."""
    from rl_service.transport.http.app import HttpApi, create_app
    from rl_service.transport.http.calls import RpcCaller

    api = HttpApi(training, policies, health_servicer, RpcCaller(auth, metrics), auth, metrics)
    server = HttpServer(create_app(api, settings.max_message_bytes), settings)
    server.start()
    return server
