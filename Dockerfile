# The rl-service image: the gRPC server (and, with the `ray` extra it holds, a Ray node for EXECUTOR=ray).
#   docker build -t rl-service:0.1.0 .
#   docker run --rm -p 50051:50051 -p 50052:50052 -p 8080:8080 -v rl-data:/data \
#     -v "$PWD/secrets:/etc/rl-service:ro" -e AUTH_TOKENS_FILE=/etc/rl-service/tokens \
#     -e TLS_CERT_FILE=/etc/rl-service/tls.crt -e TLS_KEY_FILE=/etc/rl-service/tls.key rl-service:0.1.0
# GRPC_HOST is 0.0.0.0 here, so the server refuses to start without TLS and tokens (or ALLOW_INSECURE=true).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# CPU torch from PyTorch's CPU index first (PyPI's wheel brings CUDA: gigabytes no CPU node uses); the same pin as
# constraints.txt, which then keeps the project's install from replacing it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md constraints.txt ./
COPY rl_service ./rl_service
COPY generated ./generated
RUN pip install -c constraints.txt ".[ray]"

# A fixed, unprivileged user; the data directory is the only place it writes.
RUN useradd --system --uid 10001 --gid 0 --home-dir /app --shell /usr/sbin/nologin rl \
    && mkdir -p /data \
    && chown 10001:0 /data \
    && chmod 0770 /data
USER 10001

ENV DATA_DIR=/data \
    GRPC_HOST=0.0.0.0 \
    GRPC_PORT=50051 \
    HEALTH_PORT=50052 \
    HTTP_PORT=8080 \
    LOG_FORMAT=json
VOLUME ["/data"]
# 50051: the API (TLS when TLS_CERT_FILE is set); 50052: grpc.health.v1 alone, plaintext (HEALTH_PORT);
# 8080: the HTTP/JSON API, the dashboard and /metrics (HTTPS with the same certificate).
EXPOSE 50051 50052 8080

# The plaintext health-only port answers even when the API port speaks TLS.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["rl-service-healthcheck", "--address", "127.0.0.1:50052", "--timeout", "3"]

# SIGTERM (docker stop, Kubernetes) lets runs checkpoint within SHUTDOWN_GRACE_SECONDS.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rl-service-server"]
