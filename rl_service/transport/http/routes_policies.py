"""/v1/policies: named policies over PolicyService's own methods (each route is the RPC it names)."""

from __future__ import annotations

import re
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from rl_service.transport.http.app import HttpApi
from rl_service.transport.http.messages import build, message_to_json
from rl_service.transport.http.routes_runs import ERRORS, Int64
from rl_service.transport.rpc_roles import full_method
from rl_service_proto.v1 import policy_pb2 as pb

POLICY = pb.DESCRIPTOR.services_by_name["PolicyService"]
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]")
_SUFFIX = {pb.TORCHSCRIPT: "pt", pb.SAFETENSORS: "safetensors"}


class BatchBody(BaseModel):
    """TrainingBatch's fields besides policy_id."""

    model_config = ConfigDict(extra="forbid")
    states: list[float]
    actions: list[float]
    rewards: list[float]
    dones: list[bool]
    expected_version: Int64 | None = None
    return_model: bool = Field(False, description="include the updated policy as TorchScript (base64)")
    flush: bool = False
    sync: bool = False
    behaviour_version: Int64 | None = None
    log_probs: list[float] = Field(default_factory=list)
    truncated: list[bool] = Field(default_factory=list)


def policies_router(api: HttpApi) -> APIRouter:
    """The routes under /v1/policies."""
    router = APIRouter(tags=["policies"], responses=ERRORS)
    policies = api.policies

    def rpc(name: str) -> str:
        return full_method(POLICY, name)

    @router.get("/policies", summary="ListPolicies")
    def list_policies(request: Request) -> JSONResponse:
        reply = api.unary(request, rpc("ListPolicies"), policies.ListPolicies, pb.ListPoliciesRequest())
        return JSONResponse(message_to_json(reply))

    @router.get("/policies/{policy_id}", summary="GetPolicy")
    def get_policy(request: Request, policy_id: str) -> JSONResponse:
        reply = api.unary(request, rpc("GetPolicy"), policies.GetPolicy, build(pb.PolicyRequest, policy_id=policy_id))
        return JSONResponse(message_to_json(reply))

    @router.get("/policies/{policy_id}/model", summary="GetModel (a download)", response_class=Response,
                responses={200: {"content": {"application/octet-stream": {}}}})
    def model(request: Request, policy_id: str,
              format: Literal["torchscript", "safetensors"] = "torchscript") -> Response:
        message = build(pb.GetModelRequest, policy_id=policy_id, format=pb.ModelFormat.Value(format.upper()))
        reply = api.unary(request, rpc("GetModel"), policies.GetModel, message)
        name = f"{_UNSAFE_FILENAME.sub('_', policy_id)[:64]}-v{reply.version}.{_SUFFIX.get(reply.format, 'bin')}"
        return Response(reply.data, media_type="application/octet-stream", headers={
            "Content-Disposition": f'attachment; filename="{name}"', "X-Policy-Version": str(reply.version),
            "X-Durable-Version": str(reply.durable_version)})

    @router.post("/policies/{policy_id}/batches", summary="SendTrainingBatch")
    def send_batch(request: Request, policy_id: str, body: BatchBody) -> JSONResponse:
        message = build(pb.TrainingBatch, policy_id=policy_id, **body.model_dump())
        reply = api.unary(request, rpc("SendTrainingBatch"), policies.SendTrainingBatch, message)
        return JSONResponse(message_to_json(reply))

    return router


