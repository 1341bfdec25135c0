"""Error messages quote at most a short, escaped prefix of a bad value: a 2 MB value reaches the client as its
own status code with a short message, never as RESOURCE_EXHAUSTED ("metadata size exceeds hard limit")."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from rl_service.transport.error_mapping import MAX_TRAILER_BYTES, fit_message
from rl_service_proto.v1 import policy_pb2 as ppb
from rl_service_proto.v1 import policy_pb2_grpc as ppb_grpc
from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import ServerHandle

HUGE = 2_000_000
MAX_DETAILS = 1000  # characters: a sentence, a quoted prefix of 64 characters, a hint
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
POLICY = "quoting-policy"


@pytest.fixture(scope="module")
def policies(server: ServerHandle) -> ppb_grpc.PolicyServiceStub:
    stub = ppb_grpc.PolicyServiceStub(server.channel)
    stub.CreatePolicy(ppb.CreatePolicyRequest(policy_id=POLICY, spec=ppb.PolicySpec(observation_shape=[2],
                                                                                    discrete_n=2)), timeout=30)
    return stub


def _start(**fields: Any) -> pb.StartTrainingRequest:
    return pb.StartTrainingRequest(**{"algorithm": "PPO", "env_id": "CartPole-v1", "total_timesteps": 1000, **fields})


def _batch(policy_id: str) -> ppb.TrainingBatch:
    return ppb.TrainingBatch(policy_id=policy_id, states=[0.0, 0.0], actions=[0.0], rewards=[1.0], dones=[True])


def _many_keys() -> bytes:
    import torch
    from safetensors.torch import save

    return save({f"unexpected.{'k' * 200}.{i}": torch.zeros(1) for i in range(2000)})


CASES: dict[str, tuple[Callable[[ServerHandle, ppb_grpc.PolicyServiceStub], Any], grpc.StatusCode]] = {
    "run_id NUL": (lambda s, p: s.stub.GetTrainingStatus(pb.RunRequest(run_id="\x00" * HUGE), timeout=30),
                   NOT_FOUND),
    "run_id of Act": (lambda s, p: s.stub.Act(pb.ActRequest(run_id="é" * HUGE, observation=[0.0]), timeout=30),
                      NOT_FOUND),
    "env_id": (lambda s, p: s.stub.StartTraining(_start(env_id="é" * HUGE), timeout=30), INVALID),
    "external env_id": (lambda s, p: s.stub.StartTraining(_start(env_id="grpc://" + "a" * HUGE), timeout=30),
                        INVALID),
    "unix env_id": (lambda s, p: s.stub.StartTraining(_start(env_id="unix:" + "\x01" * 200), timeout=30),
                    None),
    "algorithm": (lambda s, p: s.stub.StartTraining(_start(algorithm="\n" * HUGE), timeout=30), INVALID),
    "hyperparameter key": (lambda s, p: s.stub.StartTraining(_start(hyperparameters={"\t" * HUGE: "1"}),
                                                             timeout=30), INVALID),
    "hyperparameter value": (lambda s, p: s.stub.StartTraining(_start(hyperparameters={"n_steps": "\x7f" * HUGE}),
                                                               timeout=30), INVALID),
    "model_output_path": (lambda s, p: s.stub.StartTraining(_start(model_output_path="../" * 300), timeout=30),
                          INVALID),
    "export format": (lambda s, p: s.stub.ExportModel(pb.ExportModelRequest(run_id="x" * HUGE, format="y" * HUGE),
                                                      timeout=30), NOT_FOUND),
    "policy_id": (lambda s, p: p.GetPolicy(ppb.PolicyRequest(policy_id="\x00" * HUGE), timeout=30), INVALID),
    "create policy_id": (lambda s, p: p.CreatePolicy(ppb.CreatePolicyRequest(
        policy_id="é" * HUGE, spec=ppb.PolicySpec(observation_shape=[2], discrete_n=2)), timeout=30), INVALID),
    "spec algorithm": (lambda s, p: p.CreatePolicy(ppb.CreatePolicyRequest(
        policy_id="q", spec=ppb.PolicySpec(observation_shape=[2], discrete_n=2, algorithm="é" * HUGE)),
        timeout=30), INVALID),
    "spec hyperparameter": (lambda s, p: p.CreatePolicy(ppb.CreatePolicyRequest(
        policy_id="q", spec=ppb.PolicySpec(observation_shape=[2], discrete_n=2,
                                           hyperparameters={"net_arch": "9" * HUGE})), timeout=30), INVALID),
    "log-prob checkpoint": (lambda s, p: p.ComputeLogProb(ppb.LogProbRequest(
        policy_id=POLICY, states=[0.0, 0.0], actions=[0.0], checkpoint="é" * HUGE), timeout=30), INVALID),
    "checkpoint name": (lambda s, p: p.SaveCheckpoint(ppb.CheckpointRequest(policy_id=POLICY, name="/" * HUGE),
                                                      timeout=30), INVALID),
    "observation_shape": (lambda s, p: p.CreatePolicy(ppb.CreatePolicyRequest(
        policy_id="q", spec=ppb.PolicySpec(observation_shape=[-217] * 100_000, discrete_n=2)), timeout=30), INVALID),
    "initial_weights keys": (lambda s, p: p.CreatePolicy(ppb.CreatePolicyRequest(
        policy_id="q", spec=ppb.PolicySpec(observation_shape=[2], discrete_n=2),
        initial_weights=_many_keys()), timeout=30), INVALID),
    "stream policy_id": (lambda s, p: p.SendTrainingBatchStream(iter([_batch("é" * HUGE), _batch(POLICY)]),
                                                                timeout=30), INVALID),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_huge_bad_value_gets_its_own_code_and_a_short_message(server: ServerHandle,
                                                                 policies: ppb_grpc.PolicyServiceStub,
                                                                 case: str) -> None:
    call, expected = CASES[case]
    with pytest.raises(grpc.RpcError) as info:
        result = call(server, policies)
        if isinstance(result, Iterator):
            list(result)
    error = info.value
    assert error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    if expected is not None:
        assert error.code() == expected, error.details()
    assert len(error.details()) <= MAX_DETAILS, error.details()[:200]


def test_fit_message_keeps_any_message_within_the_trailer_budget() -> None:
    for text in ("a" * 100_000, "é" * 100_000, "\U0001f600" * 100_000, "%" * 100_000):
        fitted = fit_message(text)
        wire = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in fitted.encode("utf-8"))
        assert wire <= MAX_TRAILER_BYTES and fitted.endswith("…") and text.startswith(fitted[:-1])
    assert fit_message("run_id: no run 'x'") == "run_id: no run 'x'"


def test_an_external_env_id_on_a_server_without_simulations_is_quoted() -> None:
    from rl_service.core.envs import env_spaces
    from rl_service.core.errors import PermissionDenied

    with pytest.raises(PermissionDenied) as info:
        env_spaces("grpc://" + "\x00" * HUGE, None)
    assert len(info.value.message) <= MAX_DETAILS
