"""PPO named policies over real gRPC: the new fields, metrics, values, errors by field, restart, watch, the client."""

from __future__ import annotations

import io
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from rl_service_proto.v1 import policy_pb2 as pb
from rl_service_proto.v1 import policy_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle, start_server
from tests.integration.test_policy_service import _run_client, batch, episode, new_id

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = start_server(tmp_path_factory.mktemp("server"))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def stub(server: ServerHandle) -> pb_grpc.PolicyServiceStub:
    return pb_grpc.PolicyServiceStub(server.channel)


def ppo_spec(**hyper: str) -> pb.PolicySpec:
    return pb.PolicySpec(observation_shape=[4], discrete_n=2, seed=0, algorithm="ppo",
                         hyperparameters={"n_epochs": "2", "batch_size": "8", **hyper})


def _field(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    return str(bad.field_violations[0].field)


def test_a_ppo_policy_trains_reports_ppo_metrics_and_critic_values(stub: pb_grpc.PolicyServiceStub) -> None:
    policy_id = new_id("ppo")
    info = stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=policy_id, spec=ppo_spec()))
    assert info.spec.algorithm == "ppo" and info.spec.hyperparameters["clip_range"] == "0.2"
    part = episode(12, seed=1)
    result = stub.SendTrainingBatch(batch(policy_id, part, truncated=[False] * 11 + [True], behaviour_version=0,
                                          return_model=True))
    assert result.updated and result.version == 1 and result.pending_steps == 0
    metrics = result.metrics
    assert metrics.steps_used == 12 and metrics.episodes_used == 1
    for name in ("value_loss", "approx_kl", "clip_fraction", "explained_variance"):
        assert metrics.HasField(name), name
    # The exported actor keeps REINFORCE's interface: probabilities (batch, 2).
    model = torch.jit.load(io.BytesIO(result.torchscript))
    assert tuple(model(torch.zeros(3, 4)).shape) == (3, 2)
    answer = stub.ComputeLogProb(pb.LogProbRequest(policy_id=policy_id, states=part["states"],
                                                   actions=part["actions"]))
    assert len(answer.values) == 12 and answer.version == 1
    kept = stub.ComputeLogProb(pb.LogProbRequest(policy_id=policy_id, states=part["states"],
                                                 actions=part["actions"], version=0))
    assert len(kept.values) == 12 and list(kept.values) != list(answer.values)


def test_reinforce_metrics_leave_the_ppo_fields_unset(stub: pb_grpc.PolicyServiceStub) -> None:
    policy_id = new_id("r")
    info = stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=policy_id, spec=pb.PolicySpec(
        observation_shape=[4], discrete_n=2, seed=0)))
    assert info.spec.algorithm == "reinforce"
    result = stub.SendTrainingBatch(batch(policy_id, episode(5)))
    assert result.updated and not result.metrics.HasField("value_loss")
    part = episode(3)
    answer = stub.ComputeLogProb(pb.LogProbRequest(policy_id=policy_id, states=part["states"],
                                                   actions=part["actions"]))
    assert len(answer.values) == 0


def test_bad_ppo_input_is_refused_naming_the_field(stub: pb_grpc.PolicyServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as unknown:
        stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=new_id(), spec=pb.PolicySpec(
            observation_shape=[4], discrete_n=2, algorithm="dqn")))
    assert unknown.value.code() == INVALID and _field(unknown.value) == "spec.algorithm"
    policy_id = new_id("ppo")
    stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=policy_id, spec=ppo_spec()))
    part = episode(4)
    cases = [({"log_probs": [-0.1] * 3}, "log_probs"), ({"log_probs": [-0.1, 0.2, -0.1, -0.1]}, "log_probs"),
             ({"log_probs": [-0.1, float("nan"), -0.1, -0.1]}, "log_probs"), ({"truncated": [True]}, "truncated"),
             ({"behaviour_version": 7}, "behaviour_version")]
    for options, field in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stub.SendTrainingBatch(batch(policy_id, part, **options))
        assert caught.value.code() == INVALID and _field(caught.value) == field, options
    assert stub.GetPolicy(pb.PolicyRequest(policy_id=policy_id)).version == 0


def test_a_behaviour_version_no_longer_kept_is_failed_precondition(stub: pb_grpc.PolicyServiceStub,
                                                                    server: ServerHandle) -> None:
    policy_id = new_id("ppo")
    stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=policy_id, spec=ppo_spec()))
    for seed in range(server.settings.policy_versions_kept + 1):
        stub.SendTrainingBatch(batch(policy_id, episode(4, seed=seed)))
    with pytest.raises(grpc.RpcError) as caught:
        stub.SendTrainingBatch(batch(policy_id, episode(4), behaviour_version=0))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "behaviour_version" in (caught.value.details() or "")


def test_a_ppo_policy_comes_back_after_a_restart_with_its_critic(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("restart")
    first = start_server(root)
    stub = pb_grpc.PolicyServiceStub(first.channel)
    policy_id = new_id("ppo")
    stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=policy_id, spec=ppo_spec()))
    watching = stub.WatchModelUpdates(pb.WatchModelRequest(policy_id=policy_id, from_version=0), timeout=30)
    stub.SendTrainingBatch(batch(policy_id, episode(6), sync=True))
    assert next(watching).version == 1
    watching.cancel()
    part = episode(3, seed=4)
    request = pb.LogProbRequest(policy_id=policy_id, states=part["states"], actions=part["actions"])
    before = stub.ComputeLogProb(request)
    first.stop()
    second = start_server(root)
    try:
        again = pb_grpc.PolicyServiceStub(second.channel).ComputeLogProb(request)
        assert again.version == 1 and list(again.values) == list(before.values)
        assert list(again.log_probs) == list(before.log_probs)
    finally:
        second.stop()


def test_the_client_script_trains_cartpole_with_ppo(server: ServerHandle) -> None:
    summary = _run_client(server, new_id("cartpole"), "--algorithm", "ppo", "--batches", "6", "--stop-after", "0")
    assert summary["final_version"] == 6 and summary["steps"] == 6 * 512
    returns = [h["mean_return"] for h in summary["history"] if h["episodes"]]
    assert np.mean(returns[-2:]) > np.mean(returns[:2]), returns
