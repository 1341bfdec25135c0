"""The service's own routes: /v1/algorithms (ListAlgorithms), /healthz and /readyz (open), /metrics, and the
dashboard at /."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from grpc_health.v1 import health_pb2

from rl_service.transport.http.app import HttpApi
from rl_service.transport.http.messages import build, message_to_json
from rl_service.transport.http.routes_runs import ERRORS, TRAINING
from rl_service.transport.metrics import CONTENT_TYPE
from rl_service.transport.rpc_roles import full_method
from rl_service_proto.v1 import training_pb2 as pb

# /metrics tells what ListRuns tells (run ids, experiments, states), so it takes ListRuns's role: open without
# AUTH_TOKENS_FILE, a reader's token with it (Prometheus sends one as a bearer token).
METRICS_RPC = full_method(TRAINING, "ListRuns")


def service_router(api: HttpApi) -> APIRouter:
    """Algorithms, health, readiness, metrics and the dashboard's page."""
    router = APIRouter()

    @router.get("/v1/algorithms", tags=["algorithms"], summary="ListAlgorithms", responses=ERRORS)
    def algorithms(request: Request) -> JSONResponse:
        reply = api.unary(request, full_method(TRAINING, "ListAlgorithms"), api.training.ListAlgorithms,
                          build(pb.ListAlgorithmsRequest))
        return JSONResponse(message_to_json(reply))

    @router.get("/healthz", tags=["service"], summary="Liveness: the process answers (open)")
    def healthz() -> JSONResponse:
        return JSONResponse({"status": "alive"})

    @router.get("/readyz", tags=["service"], summary="Readiness: the health service's overall status (open)",
                responses={503: {"description": "not serving (starting or shutting down)"}})
    def readyz(request: Request) -> JSONResponse:
        reply = api.health.Check(health_pb2.HealthCheckRequest(service=""), api.context(request))
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        return JSONResponse({"status": name}, status_code=200 if serving else 503)

    @router.get("/metrics", tags=["service"], summary="Prometheus metrics (the text format)",
                response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}, **ERRORS})
    def metrics(request: Request) -> Response:
        api.auth.call(METRICS_RPC).admit(api.context(request), None)
        return Response(api.metrics.exposition(), media_type=CONTENT_TYPE)

    @router.get("/", include_in_schema=False)
    def dashboard() -> HTMLResponse:
        page = resources.files("rl_service.transport.http") / "static" / "index.html"
        return HTMLResponse(page.read_text(encoding="utf-8"))

    return router
