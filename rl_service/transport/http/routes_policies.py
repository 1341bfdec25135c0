"""/v1/policies: named policies over PolicyService's own methods (each route is the RPC it names)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Base64Bytes, BaseModel, ConfigDict, Field

from rl_service.transport.http.app import HttpApi
from rl_service.transport.http.calls import CallAborted
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


Base64 = Annotated[Base64Bytes, Field(description="base64 (the JSON mapping of proto bytes)")]


class BoxBody(BaseModel):
    """BoxActions: a diagonal Gaussian policy's action shape and optional bounds (flattened)."""

    model_config = ConfigDict(extra="forbid")
    shape: list[Int64]
    low: list[float] = Field(default_factory=list)
    high: list[float] = Field(default_factory=list)


class SpecBody(BaseModel):
    """PolicySpec: exactly one of discrete_n and box."""

    model_config = ConfigDict(extra="forbid")
    observation_shape: list[Int64]
    discrete_n: Int64 | None = None
    box: BoxBody | None = None
    hyperparameters: dict[str, str] = Field(default_factory=dict)
    seed: Int64 | None = None
    algorithm: str = Field("", description='"reinforce" (also when empty) or "ppo"')


class CreatePolicyBody(BaseModel):
    """CreatePolicyRequest's fields."""

    model_config = ConfigDict(extra="forbid")
    policy_id: str
    spec: SpecBody
    initial_weights: Base64 | None = Field(None, description="a safetensors state dict, base64")


class WeightsBody(BaseModel):
    """SetWeightsRequest's fields besides policy_id."""

    model_config = ConfigDict(extra="forbid")
    safetensors: Base64
    expected_version: Int64 | None = None


class LogProbBody(BaseModel):
    """LogProbRequest's fields besides policy_id: at most one of version and checkpoint (neither: the current)."""

    model_config = ConfigDict(extra="forbid")
    states: list[float]
    actions: list[float]
    version: Int64 | None = None
    checkpoint: str | None = None


class CheckpointBody(BaseModel):
    """CheckpointRequest's fields besides policy_id."""

    model_config = ConfigDict(extra="forbid")
    name: str


def _one_of(fields: dict[str, Any], names: tuple[str, str], where: str) -> None:
    """INVALID_ARGUMENT naming the second field when both of a proto oneof's fields are given."""
    if all(fields.get(name) is not None for name in names):
        field = f"{where}{names[1]}"
        raise CallAborted(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{field}: give {where}{names[0]} or {field}, not both", field)


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

    @router.post("/policies", status_code=201, summary="CreatePolicy (idempotent for the same spec)",
                 responses={200: {"description": "an identical policy already existed (`created` is false)"}})
    def create_policy(request: Request, body: CreatePolicyBody) -> JSONResponse:
        spec = body.spec.model_dump(exclude_none=True)
        _one_of(spec, ("discrete_n", "box"), "spec.")
        message = build(pb.CreatePolicyRequest, policy_id=body.policy_id, spec=build(pb.PolicySpec, **spec),
                        initial_weights=body.initial_weights)
        reply = api.unary(request, rpc("CreatePolicy"), policies.CreatePolicy, message)
        return JSONResponse(message_to_json(reply), status_code=201 if reply.created else 200,
                            headers={"Location": f"/v1/policies/{reply.policy_id}"})

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

    @router.delete("/policies/{policy_id}", summary="DeletePolicy")
    def delete_policy(request: Request, policy_id: str) -> JSONResponse:
        message = build(pb.PolicyRequest, policy_id=policy_id)
        return JSONResponse(message_to_json(api.unary(request, rpc("DeletePolicy"), policies.DeletePolicy, message)))

    @router.put("/policies/{policy_id}/weights", summary="SetWeights")
    def set_weights(request: Request, policy_id: str, body: WeightsBody) -> JSONResponse:
        # The attributes, not model_dump(): pydantic dumps Base64Bytes as base64 again.
        message = build(pb.SetWeightsRequest, policy_id=policy_id, safetensors=body.safetensors,
                        expected_version=body.expected_version)
        return JSONResponse(message_to_json(api.unary(request, rpc("SetWeights"), policies.SetWeights, message)))

    @router.post("/policies/{policy_id}/log-prob", summary="ComputeLogProb")
    def log_prob(request: Request, policy_id: str, body: LogProbBody) -> JSONResponse:
        fields = body.model_dump()
        _one_of(fields, ("version", "checkpoint"), "")
        message = build(pb.LogProbRequest, policy_id=policy_id, **fields)
        reply = api.unary(request, rpc("ComputeLogProb"), policies.ComputeLogProb, message)
        return JSONResponse(message_to_json(reply))

    @router.get("/policies/{policy_id}/checkpoints", summary="ListCheckpoints")
    def list_checkpoints(request: Request, policy_id: str) -> JSONResponse:
        message = build(pb.PolicyRequest, policy_id=policy_id)
        reply = api.unary(request, rpc("ListCheckpoints"), policies.ListCheckpoints, message)
        return JSONResponse(message_to_json(reply))

    @router.post("/policies/{policy_id}/checkpoints", status_code=201, summary="SaveCheckpoint")
    def save_checkpoint(request: Request, policy_id: str, body: CheckpointBody) -> JSONResponse:
        message = build(pb.CheckpointRequest, policy_id=policy_id, name=body.name)
        reply = api.unary(request, rpc("SaveCheckpoint"), policies.SaveCheckpoint, message)
        return JSONResponse(message_to_json(reply), status_code=201)

    @router.post("/policies/{policy_id}/checkpoints/{name}/load", summary="LoadCheckpoint")
    def load_checkpoint(request: Request, policy_id: str, name: str) -> JSONResponse:
        message = build(pb.CheckpointRequest, policy_id=policy_id, name=name)
        reply = api.unary(request, rpc("LoadCheckpoint"), policies.LoadCheckpoint, message)
        return JSONResponse(message_to_json(reply))

    @router.post("/policies/{policy_id}/batches", summary="SendTrainingBatch")
    def send_batch(request: Request, policy_id: str, body: BatchBody) -> JSONResponse:
        message = build(pb.TrainingBatch, policy_id=policy_id, **body.model_dump())
        reply = api.unary(request, rpc("SendTrainingBatch"), policies.SendTrainingBatch, message)
        return JSONResponse(message_to_json(reply))

    return router


