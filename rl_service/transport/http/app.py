"""The FastAPI application: the routes of runs, policies and the service, problem JSON for every error, the body
cap, and the dashboard's static files."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from grpc_health.v1 import health

from rl_service.transport.auth import AuthInterceptor
from rl_service.transport.http.calls import HttpCallContext, RpcCaller
from rl_service.transport.metrics import ServiceMetrics
from rl_service.transport.policy_servicer import PolicyServicer
from rl_service.transport.training_servicer import TrainingServicer

API_VERSION = "v1"


@dataclass(frozen=True)
class HttpApi:
    """What the routes call: the gRPC servicers themselves, through one caller (admission, audit, metrics)."""

    training: TrainingServicer
    policies: PolicyServicer
    health: health.HealthServicer
    caller: RpcCaller
    auth: AuthInterceptor
    metrics: ServiceMetrics

    def context(self, request: Request) -> HttpCallContext:
        """A call context for this request: its Authorization headers, and its peer (marked http: in audit lines)."""
        client = request.client
        peer = f"http:{client.host}:{client.port}" if client is not None else "http:unknown"
        return HttpCallContext(request.headers.getlist("authorization"), peer)

    def unary(self, request: Request, method: str, handler: Any, message: Any) -> Any:
        """Call a unary servicer method as the RPC `method` on behalf of this HTTP request."""
        return self.caller.unary(method, handler, message, self.context(request))


def create_app(api: HttpApi, max_body_bytes: int) -> Any:
    """The ASGI application (FastAPI inside the body-size cap)."""
    from fastapi.staticfiles import StaticFiles

    from rl_service.transport.http.problems import BodySizeCap, install_problem_handlers
    from rl_service.transport.http.routes_policies import policies_router
    from rl_service.transport.http.routes_runs import runs_router
    from rl_service.transport.http.routes_service import service_router

    # No /docs or /redoc: their pages load Swagger UI and ReDoc from a CDN; /openapi.json is served.
    app = FastAPI(title="rl-service", version="1", docs_url=None, redoc_url=None, description=(
        "The HTTP/JSON API of rl-service, beside its gRPC API over the same core: the same roles, tokens "
        "(Authorization: Bearer) and audit lines. Errors are RFC 9457 problem JSON whose `code` is the gRPC code."))
    install_problem_handlers(app)
    app.include_router(runs_router(api), prefix=f"/{API_VERSION}")
    app.include_router(policies_router(api), prefix=f"/{API_VERSION}")
    app.include_router(service_router(api))
    static = resources.files("rl_service.transport.http") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return BodySizeCap(app, max_body_bytes)
