"""The one table of who may call what: every RPC the server serves (by full method name) -> the role it needs.

An RPC the server registers without a row here is refused by the interceptor (fail closed), and a test fails
(tests/integration/test_auth.py walks every service the server's reflection lists). `None` means open to
everyone: only the health service, so probes need no token and learn nothing but serving status.
Calls that need TRAINER or more change state: each is audit-logged.
"""

from __future__ import annotations

from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from rl_service.infra.auth_tokens import Role
from rl_service_proto.v1 import policy_pb2, training_pb2

_TRAINING = training_pb2.DESCRIPTOR.services_by_name["TrainingService"]
_POLICY = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"]
_HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
_REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]


def full_method(service: ServiceDescriptor, name: str) -> str:
    """'/package.Service/Method', as gRPC names a call; KeyError if the service has no such method."""
    return f"/{service.full_name}/{service.methods_by_name[name].name}"


def _rows(service: ServiceDescriptor, role: Role | None, *names: str) -> dict[str, Role | None]:
    return {full_method(service, name): role for name in names}


RPC_ROLES: dict[str, Role | None] = {
    **_rows(_HEALTH, None, "Check", "Watch", "List"),
    **_rows(_REFLECTION, Role.READER, "ServerReflectionInfo"),
    **_rows(_TRAINING, Role.READER, "GetTrainingStatus", "WatchTraining", "ListRuns", "GetRunHistory",
            "ListAlgorithms"),
    **_rows(_TRAINING, Role.ACTOR, "Act", "ActBatch", "ExportModel"),
    **_rows(_TRAINING, Role.TRAINER, "StartTraining", "StopTraining", "ResumeTraining", "DeleteRun"),
    **_rows(_POLICY, Role.READER, "GetPolicy", "ListPolicies", "ListCheckpoints"),
    **_rows(_POLICY, Role.ACTOR, "GetModel", "ComputeLogProb", "WatchModelUpdates"),
    **_rows(_POLICY, Role.TRAINER, "CreatePolicy", "SendTrainingBatch", "SendTrainingBatchStream", "SetWeights",
            "SaveCheckpoint", "LoadCheckpoint"),
    **_rows(_POLICY, Role.ADMIN, "DeletePolicy"),
}


def is_audited(role: Role | None) -> bool:
    """Calls that change state (TRAINER and ADMIN rows) get one audit line each."""
    return role is not None and role >= Role.TRAINER


def rpc_name(method: str) -> str:
    """'StartTraining' out of '/rl_service.v1.TrainingService/StartTraining'."""
    return method.rsplit("/", 1)[-1]
