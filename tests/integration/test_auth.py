"""Authentication and roles against a real server with AUTH_TOKENS_FILE: every RPC for every credential, the owner
rules on real runs and policies, health open to probes, the RPC table's completeness, the audit lines, and a bad
tokens file stopping the start."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from structlog.testing import capture_logs

from rl_service.infra.auth_tokens import Role, new_token, token_line
from rl_service.transport.auth import AuthInterceptor
from rl_service.transport.rpc_roles import RPC_ROLES
from rl_service_proto.v1 import policy_pb2, policy_pb2_grpc
from rl_service_proto.v1 import training_pb2 as pb
from rl_service_proto.v1 import training_pb2_grpc as pb_grpc
from tests.conftest import FAST_PPO, ServerHandle, start_server

ROOT = Path(__file__).resolve().parents[2]
PRINCIPALS = {"rita": Role.READER, "andy": Role.ACTOR, "alice": Role.TRAINER, "bob": Role.TRAINER,
              "root": Role.ADMIN}
ROLE_OF = {Role.READER: "rita", Role.ACTOR: "andy", Role.TRAINER: "alice", Role.ADMIN: "root"}
AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
SPEC = policy_pb2.PolicySpec(observation_shape=[4], discrete_n=2)


@dataclass
class Secured:
    """A server with a token per principal."""

    handle: ServerHandle
    tokens: dict[str, str]

    def md(self, name: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.tokens[name]}")]

    @property
    def training(self) -> pb_grpc.TrainingServiceStub:
        return self.handle.stub

    @property
    def policies(self) -> policy_pb2_grpc.PolicyServiceStub:
        return policy_pb2_grpc.PolicyServiceStub(self.handle.channel)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("auth")
    tokens = {name: new_token() for name in PRINCIPALS}
    (root / "tokens").write_text("# test principals\n" + "".join(
        f"{token_line(name, role, tokens[name])}\n" for name, role in PRINCIPALS.items()))
    # INFO: audit lines of admitted calls are INFO.
    handle = start_server(root, auth_tokens_file=root / "tokens", log_level="INFO")
    yield Secured(handle, tokens)
    handle.stop()


def _method(full: str) -> MethodDescriptor:
    service, name = full[1:].split("/")
    return descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]


def _cheap_request(method: MethodDescriptor) -> Any:
    """A request that trains nothing and changes nothing: unknown ids, or missing required fields."""
    request = message_factory.GetMessageClass(method.input_type)()
    fields = method.input_type.fields_by_name
    if "run_id" in fields:
        request.run_id = "run-000000000000"
    if "policy_id" in fields:
        request.policy_id = "no-such-policy"
    if method.name == "ServerReflectionInfo":
        request.list_services = ""
    return request


def call(channel: grpc.Channel, full: str, metadata: list[tuple[str, str]] | None,
         request: Any = None) -> tuple[grpc.StatusCode, str]:
    """Any RPC by its full name, through the generic API: its code and message (a stream: its first answer)."""
    method = _method(full)
    request = request if request is not None else _cheap_request(method)
    codec = {"request_serializer": type(request).SerializeToString,
             "response_deserializer": message_factory.GetMessageClass(method.output_type).FromString}
    try:
        if method.client_streaming and method.server_streaming:
            stream = channel.stream_stream(full, **codec)(iter([request]), metadata=metadata, timeout=10)
        elif method.server_streaming:
            stream = channel.unary_stream(full, **codec)(request, metadata=metadata, timeout=10)
        elif method.client_streaming:
            channel.stream_unary(full, **codec)(iter([request]), metadata=metadata, timeout=10)
            return grpc.StatusCode.OK, ""
        else:
            channel.unary_unary(full, **codec)(request, metadata=metadata, timeout=10)
            return grpc.StatusCode.OK, ""
        next(stream, None)  # a watch may go on forever: its first answer (or error) is enough
        stream.cancel()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


# ----------------------------------------------------------------------------------------------- the role matrix


@pytest.mark.parametrize("full", sorted(RPC_ROLES))
def test_every_rpc_for_every_credential(secured: Secured, full: str) -> None:
    needed = RPC_ROLES[full]
    channel = secured.handle.channel
    rpc = full.rsplit("/", 1)[1]
    for metadata in (None, [("authorization", f"Bearer {new_token()}")], [("authorization", "Basic abc")]):
        code, message = call(channel, full, metadata)
        if needed is None:
            assert code not in AUTH_CODES, (full, code, message)
        else:
            assert code is grpc.StatusCode.UNAUTHENTICATED, (full, metadata, code, message)
    admitted = set()
    for name, role in PRINCIPALS.items():
        code, message = call(channel, full, secured.md(name))
        if needed is None or role >= needed:
            assert code not in AUTH_CODES, (full, name, code, message)
            admitted.add((code, message))
        else:
            assert code is grpc.StatusCode.PERMISSION_DENIED, (full, name, code, message)
            assert message == f"{rpc} needs role {needed.label} or higher; {name!r} has role {role.label}"
    # Every admitted principal reached the handler and got the same answer to the same request.
    assert len(admitted) == 1, admitted


def test_health_is_open_to_probes_and_ignores_credentials(secured: Secured) -> None:
    health = health_pb2_grpc.HealthStub(secured.handle.channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for metadata in (None, [("authorization", "Bearer wrong")], secured.md("rita")):
        assert health.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=5).status == serving
        watch = health.Watch(health_pb2.HealthCheckRequest(service="rl_service.v1.TrainingService"),
                             metadata=metadata, timeout=5)
        assert next(watch).status == serving
        watch.cancel()
    # It tells nothing else: an unknown service is NOT_FOUND, the same with or without a token.
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="rl_service.v1.Secret"), timeout=5)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_every_rpc_the_server_serves_has_a_row(secured: Secured) -> None:
    """The services the server lists by reflection, method by method from their descriptors, against the table."""
    reflection = reflection_pb2_grpc.ServerReflectionStub(secured.handle.channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              metadata=secured.md("rita"), timeout=10)
    services = {s.name for s in next(replies).list_services_response.service}
    assert {"rl_service.v1.TrainingService", "rl_service.v1.PolicyService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    served = {f"/{name}/{method.name}" for name in services
              for method in descriptor_pool.Default().FindServiceByName(name).methods}
    assert served - set(RPC_ROLES) == set(), "RPCs without a role"
    assert set(RPC_ROLES) - served == set(), "rows for RPCs the server does not serve"


def test_an_rpc_without_a_row_is_refused(secured: Secured) -> None:
    """Fail closed: a service registered without rows in the table answers PERMISSION_DENIED, not the call."""
    from concurrent import futures

    from grpc_reflection.v1alpha import reflection

    table = {full: role for full, role in RPC_ROLES.items() if "ServerReflection" not in full}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[AuthInterceptor(None, roles=table)])
    reflection.enable_server_reflection((reflection.SERVICE_NAME,), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            code, message = call(channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None)
    finally:
        server.stop(None)
    assert code is grpc.StatusCode.PERMISSION_DENIED and message == (
        "ServerReflectionInfo has no role in the server's RPC table")


# ----------------------------------------------------------------------------------------------- owners


def _refused(call_: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call_(*args, timeout=60, **kwargs)
    return info.value


def test_a_trainer_changes_only_its_own_runs_and_an_admin_any(secured: Secured) -> None:
    training = secured.training
    request = pb.StartTrainingRequest(algorithm="PPO", env_id="CartPole-v1", total_timesteps=100_000,
                                      hyperparameters=FAST_PPO)
    run_id = training.StartTraining(request, metadata=secured.md("alice"), timeout=30).run_id
    status = training.GetTrainingStatus(pb.RunRequest(run_id=run_id), metadata=secured.md("rita"), timeout=10)
    assert status.owner == "alice"
    listed = training.ListRuns(pb.ListRunsRequest(), metadata=secured.md("rita"), timeout=10).runs
    assert [r.owner for r in listed if r.run_id == run_id] == ["alice"]

    denied = _refused(training.StopTraining, pb.RunRequest(run_id=run_id), metadata=secured.md("bob"))
    assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
    assert denied.details() == (f"run {run_id!r} belongs to 'alice'; only its owner or an admin may change it, and "
                                "'bob' is a trainer")
    stopped = training.StopTraining(pb.RunRequest(run_id=run_id), metadata=secured.md("alice"), timeout=120)
    assert stopped.is_done and stopped.state == pb.CANCELLED
    for rpc, message in ((training.ResumeTraining, pb.ResumeTrainingRequest(run_id=run_id)),
                         (training.DeleteRun, pb.DeleteRunRequest(run_id=run_id))):
        assert _refused(rpc, message, metadata=secured.md("bob")).code() is grpc.StatusCode.PERMISSION_DENIED
    # Still there, untouched by the refusals; an admin deletes it.
    assert training.GetTrainingStatus(pb.RunRequest(run_id=run_id), metadata=secured.md("bob"),
                                      timeout=10).state == pb.CANCELLED
    training.DeleteRun(pb.DeleteRunRequest(run_id=run_id), metadata=secured.md("root"), timeout=30)
    assert _refused(training.GetTrainingStatus, pb.RunRequest(run_id=run_id),
                    metadata=secured.md("rita")).code() is grpc.StatusCode.NOT_FOUND


def test_a_trainer_trains_only_its_own_policies_and_only_an_admin_deletes(secured: Secured) -> None:
    policies = secured.policies
    info = policies.CreatePolicy(policy_pb2.CreatePolicyRequest(policy_id="alices", spec=SPEC),
                                 metadata=secured.md("alice"), timeout=30)
    assert info.owner == "alice"
    listed = policies.ListPolicies(policy_pb2.ListPoliciesRequest(), metadata=secured.md("rita"), timeout=10)
    assert [p.owner for p in listed.policies if p.policy_id == "alices"] == ["alice"]
    batch = policy_pb2.TrainingBatch(policy_id="alices", states=[0.0] * 8, actions=[0, 1], rewards=[1.0, 1.0],
                                     dones=[False, True])
    checkpoint = policy_pb2.CheckpointRequest(policy_id="alices", name="c1")
    for rpc, message in ((policies.SendTrainingBatch, batch),
                         (policies.SetWeights, policy_pb2.SetWeightsRequest(policy_id="alices", safetensors=b"x")),
                         (policies.SaveCheckpoint, checkpoint), (policies.LoadCheckpoint, checkpoint)):
        error = _refused(rpc, message, metadata=secured.md("bob"))
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED and "belongs to 'alice'" in error.details()
    error = _refused(policies.SendTrainingBatchStream, iter([batch, batch]), metadata=secured.md("bob"))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED and "belongs to 'alice'" in error.details()
    assert policies.GetPolicy(policy_pb2.PolicyRequest(policy_id="alices"), metadata=secured.md("bob"),
                              timeout=10).version == 0  # nothing bob sent was applied
    assert policies.SendTrainingBatch(batch, metadata=secured.md("alice"), timeout=30).version == 1
    assert policies.SendTrainingBatchStream(iter([batch]), metadata=secured.md("alice"), timeout=30).version == 2
    assert policies.SaveCheckpoint(checkpoint, metadata=secured.md("root"), timeout=30).version == 2
    error = _refused(policies.DeletePolicy, policy_pb2.PolicyRequest(policy_id="alices"), metadata=secured.md("alice"))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED and "needs role admin" in error.details()
    policies.DeletePolicy(policy_pb2.PolicyRequest(policy_id="alices"), metadata=secured.md("root"), timeout=30)


# ----------------------------------------------------------------------------------------------- audit


def test_state_changes_and_refusals_are_audited_by_name_never_by_token(secured: Secured) -> None:
    training = secured.training
    with capture_logs() as logs:
        run_id = training.StartTraining(
            pb.StartTrainingRequest(algorithm="PPO", env_id="CartPole-v1", total_timesteps=100_000,
                                    hyperparameters=FAST_PPO), metadata=secured.md("alice"), timeout=30).run_id
        _refused(training.StopTraining, pb.RunRequest(run_id=run_id), metadata=secured.md("bob"))
        _refused(training.StopTraining, pb.RunRequest(run_id=run_id), metadata=secured.md("rita"))
        _refused(training.DeleteRun, pb.DeleteRunRequest(run_id=run_id),
                 metadata=[("authorization", f"Bearer {secured.tokens['alice']}x")])
        training.StopTraining(pb.RunRequest(run_id=run_id), metadata=secured.md("alice"), timeout=120)
        _refused(secured.policies.SendTrainingBatchStream,
                 iter([policy_pb2.TrainingBatch(policy_id="nobodys")]), metadata=secured.md("alice"))
        training.ListRuns(pb.ListRunsRequest(), metadata=secured.md("rita"), timeout=10)  # a read: no line
    lines = [entry for entry in logs if entry["event"] == "audit"]
    assert [(e["principal"], e["rpc"], e.get("run_id", e.get("policy_id")), e["code"]) for e in lines] == [
        ("alice", "StartTraining", run_id, "OK"),
        ("bob", "StopTraining", run_id, "PERMISSION_DENIED"),
        ("rita", "StopTraining", run_id, "PERMISSION_DENIED"),
        ("-", "DeleteRun", run_id, "UNAUTHENTICATED"),
        ("alice", "StopTraining", run_id, "OK"),
        ("alice", "SendTrainingBatchStream", "nobodys", "NOT_FOUND"),
    ]
    assert all(e["peer"].startswith("ipv4:127.0.0.1:") for e in lines)
    assert [e["log_level"] for e in lines] == ["info", "warning", "warning", "warning", "info", "info"]
    everything = repr(logs)
    assert not any(token in everything for token in secured.tokens.values())


def test_without_a_tokens_file_everyone_is_an_anonymous_admin_and_still_audited(
        server_factory: Callable[..., ServerHandle], tmp_path: Path) -> None:
    handle = server_factory(tmp_path, log_level="INFO")
    policies = policy_pb2_grpc.PolicyServiceStub(handle.channel)
    with capture_logs() as logs:
        created = policies.CreatePolicy(policy_pb2.CreatePolicyRequest(policy_id="anyones", spec=SPEC), timeout=30)
        policies.DeletePolicy(policy_pb2.PolicyRequest(policy_id="anyones"),
                              metadata=[("authorization", "Bearer ignored")], timeout=30)
    assert created.owner == ""
    assert [(e["principal"], e["rpc"], e["policy_id"], e["code"]) for e in logs if e["event"] == "audit"] == [
        ("anonymous", "CreatePolicy", "anyones", "OK"), ("anonymous", "DeletePolicy", "anyones", "OK")]


# ----------------------------------------------------------------------------------------------- start-up


def test_a_bad_tokens_file_stops_the_start_with_one_line_naming_it_and_the_line(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ok reader sha256:{'0' * 64}\nbad superuser sha256:{'1' * 64}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPC_", "LOG_", "AUTH_"))}
    env.update({"DATA_DIR": str(tmp_path / "data"), "GRPC_HOST": "127.0.0.1", "GRPC_PORT": "0", "HTTP_PORT": "0",
                "AUTH_TOKENS_FILE": str(tokens)})
    result = subprocess.run([sys.executable, str(ROOT / "server.py")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    naming = [line for line in result.stderr.splitlines() if "AUTH_TOKENS_FILE" in line]
    assert naming == [f"cannot start: AUTH_TOKENS_FILE {tokens} line 2: unknown role 'superuser'; use one of "
                      "reader, actor, trainer, admin"], result.stderr
    assert "server started" not in result.stderr
