"""/v1/runs: managed runs over TrainingService's own methods (each route is the RPC it names)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from rl_service.transport.http.app import HttpApi
from rl_service.transport.http.calls import CallAborted, HttpCallContext
from rl_service.transport.http.messages import build, message_to_json
from rl_service.transport.http.problems import PROBLEM_JSON
from rl_service.transport.rpc_roles import full_method
from rl_service_proto.v1 import training_pb2 as pb

TRAINING = pb.DESCRIPTOR.services_by_name["TrainingService"]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
StateName = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED"]
ModelChoice = Annotated[str, Query(description='"latest" (also when empty) or "best"')]
_PROBLEM = {"content": {PROBLEM_JSON: {}}, "description": "problem JSON (RFC 9457)"}
ERRORS: dict[int | str, dict[str, Any]] = {"4XX": _PROBLEM}


class StartRunBody(BaseModel):
    """StartTrainingRequest's fields."""

    model_config = ConfigDict(extra="forbid")
    algorithm: str = Field(description='"PPO", "A2C", "DQN", ... (case-insensitive); see /v1/algorithms')
    env_id: str = Field(description='a registered Gymnasium id, e.g. "CartPole-v1"')
    total_timesteps: Int64
    experiment_id: str = ""
    seed: Int64 | None = None
    hyperparameters: dict[str, str] = Field(default_factory=dict, description="values as text, e.g. {\"n_steps\": "
                                            "\"128\"}; each key's type and range are in /v1/algorithms")
    model_output_path: str = ""
    checkpoint_interval: Int64 = 0


class ResumeBody(BaseModel):
    """ResumeTrainingRequest's fields besides run_id."""

    model_config = ConfigDict(extra="forbid")
    total_timesteps: Int64 | None = None


class ActBody(BaseModel):
    """ActRequest's fields besides run_id."""

    model_config = ConfigDict(extra="forbid")
    observation: list[float]
    deterministic: bool = False
    action_mask: list[bool] = Field(default_factory=list)
    model: str = ""


class ActBatchBody(BaseModel):
    """ActBatchRequest's fields besides run_id."""

    model_config = ConfigDict(extra="forbid")
    observations: list[float]
    deterministic: bool = False
    action_masks: list[bool] = Field(default_factory=list)
    model: str = ""


def runs_router(api: HttpApi) -> APIRouter:
    """The routes under /v1/runs."""
    router = APIRouter(tags=["runs"], responses=ERRORS)
    training = api.training

    def rpc(name: str) -> str:
        return full_method(TRAINING, name)

    def status_of(request: Request, name: str, message: Any) -> JSONResponse:
        return JSONResponse(message_to_json(api.unary(request, rpc(name), getattr(training, name), message)))

    @router.post("/runs", status_code=201, summary="StartTraining")
    def start_run(request: Request, body: StartRunBody) -> JSONResponse:
        message = build(pb.StartTrainingRequest, **body.model_dump())
        reply = api.unary(request, rpc("StartTraining"), training.StartTraining, message)
        return JSONResponse(message_to_json(reply), status_code=201, headers={"Location": f"/v1/runs/{reply.run_id}"})

    @router.get("/runs", summary="ListRuns (newest first)")
    def list_runs(request: Request, experiment_id: str | None = None, state: StateName | None = None) -> JSONResponse:
        message = build(pb.ListRunsRequest, experiment_id=experiment_id,
                        state=pb.RunState.Value(state) if state else None)
        return status_of(request, "ListRuns", message)

    @router.get("/runs/{run_id}", summary="GetTrainingStatus")
    def get_run(request: Request, run_id: str) -> JSONResponse:
        return status_of(request, "GetTrainingStatus", build(pb.RunRequest, run_id=run_id))

    @router.delete("/runs/{run_id}", summary="DeleteRun")
    def delete_run(request: Request, run_id: str) -> JSONResponse:
        return status_of(request, "DeleteRun", build(pb.DeleteRunRequest, run_id=run_id))

    @router.post("/runs/{run_id}/stop", summary="StopTraining")
    def stop_run(request: Request, run_id: str) -> JSONResponse:
        return status_of(request, "StopTraining", build(pb.RunRequest, run_id=run_id))

    @router.post("/runs/{run_id}/resume", summary="ResumeTraining")
    def resume_run(request: Request, run_id: str, body: Annotated[ResumeBody | None, Body()] = None) -> JSONResponse:
        total = body.total_timesteps if body is not None else None
        return status_of(request, "ResumeTraining",
                         build(pb.ResumeTrainingRequest, run_id=run_id, total_timesteps=total))

    @router.get("/runs/{run_id}/history", summary="GetRunHistory (one page of episodes)")
    def history(request: Request, run_id: str, offset: Annotated[Int64, Query()] = 0,
                limit: Annotated[Int32, Query()] = 0) -> JSONResponse:
        message = build(pb.RunHistoryRequest, run_id=run_id, offset=offset, limit=limit)
        return status_of(request, "GetRunHistory", message)

    @router.post("/runs/{run_id}/act", summary="Act")
    def act(request: Request, run_id: str, body: ActBody) -> JSONResponse:
        return status_of(request, "Act", build(pb.ActRequest, run_id=run_id, **body.model_dump()))

    @router.post("/runs/{run_id}/act-batch", summary="ActBatch")
    def act_batch(request: Request, run_id: str, body: ActBatchBody) -> JSONResponse:
        return status_of(request, "ActBatch", build(pb.ActBatchRequest, run_id=run_id, **body.model_dump()))

    @router.get("/runs/{run_id}/export", summary="ExportModel (a download)", response_class=Response,
                responses={200: {"content": {"application/octet-stream": {}}}})
    def export(request: Request, run_id: str, format: str = "torchscript", model: ModelChoice = "") -> Response:
        message = build(pb.ExportModelRequest, run_id=run_id, format=format, model=model)
        reply = api.unary(request, rpc("ExportModel"), training.ExportModel, message)
        return Response(reply.data, media_type="application/octet-stream", headers={
            "Content-Disposition": f'attachment; filename="{reply.filename}"',
            "X-Model-Timesteps": str(reply.model_timesteps), "X-Export-Format": reply.format})

    @router.get("/runs/{run_id}/events", summary="WatchTraining as Server-Sent Events", response_class=Response,
                responses={200: {"content": {"text/event-stream": {}},
                                 "description": "`status` events (TrainingStatus JSON), then one `end` event"}})
    def events(request: Request, run_id: str) -> StreamingResponse:
        context = api.context(request)
        statuses = api.caller.stream(rpc("WatchTraining"), training.WatchTraining, build(pb.RunRequest, run_id=run_id),
                                     context)
        first = next(statuses)  # unknown run, refused token: answered as problem JSON, before the stream starts
        return StreamingResponse(_sse(first, statuses, context), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _sse(first: pb.TrainingStatus, statuses: Iterator[pb.TrainingStatus],
               context: HttpCallContext) -> AsyncIterator[str]:
    """The watch's statuses as events, read in a worker thread; the watch ends once the client has gone."""
    try:
        yield _event("status", message_to_json(first))
        while True:
            # abandon_on_cancel: a client that leaves does not wait for the next progress report.
            item = await anyio.to_thread.run_sync(next, statuses, None, abandon_on_cancel=True)
            if item is None:
                break
            yield _event("status", message_to_json(item))
        yield _event("end", {})
    except CallAborted as aborted:
        yield _event("error", {"code": aborted.code.name, "detail": aborted.message})
    finally:
        context.cancel()  # the watch loop sees is_active() false at its next poll and frees its stream slot
