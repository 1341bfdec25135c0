"""Errors name their field the standard way: a google.rpc.BadRequest in the rich status (grpc-status-details-bin),
read with grpc_status.rpc_status.from_call, for unary, server-streaming and client-streaming RPCs of both
services; the message stays the human sentence; the CLI prints the field."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console

from rl_service.cli.formatting import Output
from rl_service.cli.main import run
from rl_service_proto.v1 import policy_pb2 as ppb
from rl_service_proto.v1 import policy_pb2_grpc as ppb_grpc
from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import FAST_PPO, ServerHandle

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def policies(server: ServerHandle) -> ppb_grpc.PolicyServiceStub:
    return ppb_grpc.PolicyServiceStub(server.channel)


def _start(**fields: Any) -> pb.StartTrainingRequest:
    hyperparameters = {**FAST_PPO, **fields.pop("hyperparameters", {})}
    request = {"algorithm": "PPO", "env_id": "CartPole-v1", "total_timesteps": 1000,
               "hyperparameters": hyperparameters, **fields}
    return pb.StartTrainingRequest(**request)


def _fails(call: Callable[[], Any]) -> grpc.RpcError:
    """The error a call (or, for a stream, reading it to the end) ends with."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    return info.value


def _violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """(field, description) of every BadRequest violation in the error's rich status."""
    status = rpc_status.from_call(error)  # also checks that its code and message match the call's
    assert status is not None, f"no rich status on {error.code().name}: {error.details()}"
    assert status.code == error.code().value[0] and status.message == error.details()
    found: list[tuple[str, str]] = []
    for detail in status.details:
        assert detail.Is(error_details_pb2.BadRequest.DESCRIPTOR), detail.type_url
        bad = error_details_pb2.BadRequest()
        detail.Unpack(bad)
        found.extend((v.field, v.description) for v in bad.field_violations)
    return found


def _field_of(error: grpc.RpcError, code: grpc.StatusCode = INVALID) -> str:
    assert error.code() == code, error.details()
    [(field, description)] = _violations(error)
    assert description == error.details(), "the violation describes the fault in the message's own words"
    return field


# ----------------------------------------------------------------------------------------------- TrainingService


def test_bad_hyperparameter_value_names_its_field(server: ServerHandle) -> None:
    error = _fails(lambda: server.stub.StartTraining(_start(hyperparameters={"learning_rate": "abc"}), timeout=30))
    assert _field_of(error) == "hyperparameters.learning_rate"
    # The message is the human sentence it always was.
    assert error.details().startswith("hyperparameters['learning_rate']: cannot use 'abc'; expected ")


@pytest.mark.parametrize(("fields", "field"), [
    ({"total_timesteps": 0}, "total_timesteps"),
    ({"total_timesteps": 10**12}, "total_timesteps"),
    ({"algorithm": "HER"}, "algorithm"),
    ({"env_id": "CartPol-v1"}, "env_id"),
    ({"seed": -1}, "seed"),
    ({"checkpoint_interval": 5}, "checkpoint_interval"),
    ({"model_output_path": "../escape.zip"}, "model_output_path"),
    ({"hyperparameters": {"bogus": "1"}}, "hyperparameters.bogus"),
    ({"hyperparameters": {"Learning_Rate": "2"}}, "hyperparameters.learning_rate"),  # keys are matched loosely
    ({"hyperparameters": {"n_steps": "32", "batch_size": "64"}}, "hyperparameters.batch_size"),  # cross-field
], ids=lambda v: str(v) if isinstance(v, str) else "-".join(map(str, v)))
def test_start_training_errors_name_their_field(server: ServerHandle, fields: dict[str, Any], field: str) -> None:
    assert _field_of(_fails(lambda: server.stub.StartTraining(_start(**fields), timeout=30))) == field


def test_other_unary_rpcs_name_their_field(server: ServerHandle) -> None:
    assert _field_of(_fails(lambda: server.stub.GetTrainingStatus(pb.RunRequest(run_id=""), timeout=10))) == "run_id"
    assert _field_of(_fails(lambda: server.stub.ListRuns(pb.ListRunsRequest(state=99), timeout=10))) == "state"


@pytest.mark.parametrize("fields", [
    {"env_id": "E" * 10_000},
    {"algorithm": "A" * 10_000},
    {"hyperparameters": {"k" * 10_000: "1"}},
    {"hyperparameters": {"learning_rate": "9" * 10_000}},
], ids=["env_id", "algorithm", "hyperparameter key", "hyperparameter value"])
def test_a_huge_bad_value_is_quoted_short_and_keeps_its_status_code(server: ServerHandle,
                                                                     fields: dict[str, Any]) -> None:
    request = {"algorithm": "PPO", "env_id": "CartPole-v1", "total_timesteps": 1000, **fields}
    error = _fails(lambda: server.stub.StartTraining(pb.StartTrainingRequest(**request), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert len(error.details()) < 600 and "(10000 characters)" in error.details()


def test_server_streaming_errors_carry_the_details(server: ServerHandle) -> None:
    # WatchTraining is a server-streaming RPC: its errors end the stream with the same status and details.
    empty = _fails(lambda: server.stub.WatchTraining(pb.RunRequest(run_id=""), timeout=10))
    assert _field_of(empty) == "run_id"
    unknown = _fails(lambda: server.stub.WatchTraining(pb.RunRequest(run_id="run-doesnotexist"), timeout=10))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "run-doesnotexist" in unknown.details()
    # BadRequest goes with INVALID_ARGUMENT only: a NOT_FOUND carries its message and no details.
    assert rpc_status.from_call(unknown) is None


# ----------------------------------------------------------------------------------------------- PolicyService


def test_policy_service_bad_input_names_its_field(policies: ppb_grpc.PolicyServiceStub) -> None:
    spec = ppb.PolicySpec(observation_shape=[4], discrete_n=1)
    error = _fails(lambda: policies.CreatePolicy(ppb.CreatePolicyRequest(policy_id="rich-a", spec=spec), timeout=10))
    assert _field_of(error) == "spec.discrete_n"
    no_spec = _fails(lambda: policies.CreatePolicy(ppb.CreatePolicyRequest(policy_id="rich-a"), timeout=10))
    assert _field_of(no_spec) == "spec"
    bad_hp = ppb.PolicySpec(observation_shape=[4], discrete_n=2, hyperparameters={"learning_rate": "abc"})
    error = _fails(lambda: policies.CreatePolicy(ppb.CreatePolicyRequest(policy_id="rich-a", spec=bad_hp), timeout=10))
    assert _field_of(error) == "spec.hyperparameters.learning_rate"
    assert error.details().startswith("spec.hyperparameters['learning_rate']: cannot use 'abc'")
    spec = ppb.PolicySpec(observation_shape=[4], discrete_n=2)
    unsafe = _fails(lambda: policies.CreatePolicy(ppb.CreatePolicyRequest(policy_id="../x", spec=spec), timeout=10))
    assert _field_of(unsafe) == "policy_id"


def test_policy_service_streams_carry_the_details(policies: ppb_grpc.PolicyServiceStub) -> None:
    policies.CreatePolicy(ppb.CreatePolicyRequest(policy_id="rich-b", spec=ppb.PolicySpec(
        observation_shape=[4], discrete_n=2)), timeout=10)
    # Client streaming: the chunks are checked as they arrive, and the assembled batch as one.
    empty = _fails(lambda: policies.SendTrainingBatchStream(iter([]), timeout=10))
    assert _field_of(empty) == "batch"
    mixed = _fails(lambda: policies.SendTrainingBatchStream(
        iter([ppb.TrainingBatch(policy_id="rich-b"), ppb.TrainingBatch(policy_id="rich-c")]), timeout=10))
    assert _field_of(mixed) == "policy_id"
    bad_action = ppb.TrainingBatch(policy_id="rich-b", states=[0.0] * 4, actions=[5], rewards=[1.0], dones=[True])
    assert _field_of(_fails(lambda: policies.SendTrainingBatchStream(iter([bad_action]), timeout=10))) == "actions"
    # Server streaming.
    watch = _fails(lambda: policies.WatchModelUpdates(ppb.WatchModelRequest(policy_id=""), timeout=10))
    assert _field_of(watch) == "policy_id"
    # ABORTED is not about the request's syntax: message only.
    stale = ppb.TrainingBatch(policy_id="rich-b", states=[0.0] * 4, actions=[0], rewards=[1.0], dones=[True],
                              expected_version=7)
    conflict = _fails(lambda: policies.SendTrainingBatch(stale, timeout=10))
    assert conflict.code() == grpc.StatusCode.ABORTED and rpc_status.from_call(conflict) is None


# ----------------------------------------------------------------------------------------------- the CLI


def test_cli_prints_the_field_under_the_error(server: ServerHandle) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = run(["train", "--address", server.address, "--algo", "PPO", "--env", "CartPole-v1", "--timesteps", "100",
                "--hp", "learning_rate=abc"], Output(Console(file=out, width=100), Console(file=err, width=200)))
    assert code == 1 and not out.getvalue()
    first, second = err.getvalue().splitlines()
    assert first.startswith("ERROR INVALID_ARGUMENT: hyperparameters['learning_rate']: cannot use 'abc'")
    assert second == "field: hyperparameters.learning_rate"

    err = io.StringIO()
    code = run(["watch", "--address", server.address, "run-doesnotexist"],
               Output(Console(file=io.StringIO(), width=100), Console(file=err, width=200)))
    assert code == 1 and err.getvalue() == "ERROR NOT_FOUND: run_id: no run 'run-doesnotexist'\n"
