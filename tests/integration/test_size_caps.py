"""Through a real server: the issue's CreatePolicy (1,000,000-value observations, width 64) and a 4096-wide run
are refused INVALID_ARGUMENT naming net_arch and MAX_NETWORK_PARAMETERS, writing nothing; CreatePolicy past
MAX_POLICIES is RESOURCE_EXHAUSTED."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from rl_service_proto.v1 import policy_pb2 as ppb
from rl_service_proto.v1 import policy_pb2_grpc as ppb_grpc
from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import ServerHandle, files_under
from tests.support.grpc_errors import field_violations


def _spec(observation: int, net_arch: str = "64") -> ppb.PolicySpec:
    return ppb.PolicySpec(observation_shape=[observation], discrete_n=2, hyperparameters={"net_arch": net_arch})


def test_network_and_policy_caps(server_factory: Callable[..., ServerHandle], tmp_path: Path) -> None:
    server = server_factory(tmp_path, max_policies=2)
    policies = ppb_grpc.PolicyServiceStub(server.channel)
    roots = (server.settings.policies_root, server.settings.models_root, server.settings.checkpoint_root)
    before = files_under(*roots)

    with pytest.raises(grpc.RpcError) as info:
        policies.CreatePolicy(ppb.CreatePolicyRequest(policy_id="big", spec=_spec(1_000_000)), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "MAX_NETWORK_PARAMETERS" in info.value.details() and "10,000,000" in info.value.details()
    assert field_violations(info.value) == ["spec.hyperparameters.net_arch"]

    with pytest.raises(grpc.RpcError) as info:
        server.stub.StartTraining(pb.StartTrainingRequest(algorithm="PPO", env_id="CartPole-v1",
                                                          total_timesteps=1000,
                                                          hyperparameters={"net_arch": "4096,4096"}), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(info.value) == ["hyperparameters.net_arch"]
    assert files_under(*roots) == before

    for policy_id in ("a", "b"):
        policies.CreatePolicy(ppb.CreatePolicyRequest(policy_id=policy_id, spec=_spec(4)), timeout=30)
    with pytest.raises(grpc.RpcError) as info:
        policies.CreatePolicy(ppb.CreatePolicyRequest(policy_id="c", spec=_spec(4)), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "MAX_POLICIES=2" in info.value.details()
    assert not (server.settings.policies_root / "c").exists()
