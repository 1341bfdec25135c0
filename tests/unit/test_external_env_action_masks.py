"""Action masks over real gRPC: the reference server sends a hosted env's masks, GrpcExternalEnvAdapter checks and
keeps them (Reset, Step, auto-reset, reconnect), and a broken or misplaced mask fails naming the address and field."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from rl_service.core.errors import EnvironmentProtocolError
from rl_service.envserver.faults import Fault, FaultyEnvironmentServicer
from rl_service.envserver.reference_server import (
    EnvServerHandle,
    ReferenceEnvironmentServicer,
    serve_gym,
    start_env_server,
)
from rl_service.infra.external_env.address import parse_address
from rl_service.infra.external_env.env_batch import EnvBatch
from rl_service.infra.external_env.grpc_adapter import ConnectionOptions, GrpcExternalEnvAdapter
from rl_service_proto.v1 import environment_pb2 as pb
from rl_service_proto.v1 import environment_pb2_grpc as pb_grpc
from tests.support.envs import MASKED_ENV_ID, MaskedChoiceEnv

FAST = ConnectionOptions(step_timeout=2.0, connect_timeout=1.0, retries=5, backoff=0.05)
N = MaskedChoiceEnv.N_ACTIONS


def shown_legal(observations: np.ndarray) -> np.ndarray:
    """MaskedChoice shows its legal actions as its first N observation values."""
    return observations[:, :N] > 0.5


@pytest.fixture
def servers() -> Iterator[Callable[..., EnvServerHandle]]:
    """Start env servers; all are stopped at the end of the test."""
    started: list[EnvServerHandle] = []

    def start(servicer: ReferenceEnvironmentServicer | None = None, port: int = 0) -> EnvServerHandle:
        servicer = servicer or ReferenceEnvironmentServicer(EnvBatch.from_gym_id(MASKED_ENV_ID, 3))
        started.append(start_env_server(servicer, port=port))
        return started[-1]

    yield start
    for handle in started:
        handle.stop()


def adapter_for(handle: EnvServerHandle, options: ConnectionOptions = FAST) -> GrpcExternalEnvAdapter:
    return GrpcExternalEnvAdapter(parse_address(handle.address), options)


@pytest.mark.parametrize("use_stream", [True, False], ids=["stream", "unary"])
def test_masks_of_every_answer_reach_the_adapter(use_stream: bool) -> None:
    handle = serve_gym(MASKED_ENV_ID, 3)
    adapter = GrpcExternalEnvAdapter(parse_address(handle.address), ConnectionOptions(use_stream=use_stream))
    try:
        assert adapter.action_masks() is None  # nothing answered yet
        observations = adapter.reset(seed=5)
        masks = adapter.action_masks()
        assert masks is not None and masks.shape == (3, N) and masks.dtype == bool
        np.testing.assert_array_equal(masks, shown_legal(observations))
        rng = np.random.default_rng(1)
        ended = 0
        for _ in range(40):
            result = adapter.step(rng.integers(0, N, size=3))
            # After an auto-reset too: the mask is that of the next episode's first observation.
            np.testing.assert_array_equal(adapter.action_masks(), shown_legal(result.observations))
            ended += len(result.final_observations)
        assert ended > 0
    finally:
        adapter.close()
        handle.stop()


def test_a_simulation_without_masks_leaves_them_unset(servers: Callable[..., EnvServerHandle]) -> None:
    handle = servers(ReferenceEnvironmentServicer(EnvBatch.from_gym_id("CartPole-v1", 2)))
    adapter = adapter_for(handle)
    adapter.reset()
    assert adapter.action_masks() is None
    adapter.step(np.zeros(2, dtype=np.int64))
    assert adapter.action_masks() is None
    adapter.close()


@pytest.mark.parametrize(("env_id", "fault", "message"), [
    (MASKED_ENV_ID, "short_action_masks", f"action_masks: {3 * N - 1} flags; expected {3 * N} (3 envs x {N} actions"),
    (MASKED_ENV_ID, "no_legal_action", f"action_masks: env 0 has no legal action (all {N} flags false)"),
    ("CartPole-v1", "short_action_masks", "action_masks: 5 flags; expected 6 (3 envs x 2 actions"),  # sends none
    ("CartPole-v1", "no_legal_action", "action_masks: env 0 has no legal action (all 2 flags false)"),
])
def test_malformed_masks_name_the_simulation_and_the_field(servers: Callable[..., EnvServerHandle], env_id: str,
                                                            fault: Fault, message: str) -> None:
    servicer = FaultyEnvironmentServicer(EnvBatch.from_gym_id(env_id, 3), fault, at_step=2)
    adapter = adapter_for(servers(servicer))
    adapter.reset(seed=1)
    adapter.step(np.zeros(3, dtype=np.int64))
    with pytest.raises(EnvironmentProtocolError) as info:
        adapter.step(np.zeros(3, dtype=np.int64))
    assert info.value.message.startswith(
        f"env {adapter.address} answered Step with a malformed field 'action_masks': {message}")
    assert info.value.field == "env_id"
    adapter.close()


class _MasksForBoxActions(ReferenceEnvironmentServicer):
    """Pendulum (Box actions) with masks in its Reset answer: the protocol defines masks for Discrete only."""

    def reset(self, request: pb.ResetRequest) -> pb.ResetResponse:
        response = super().reset(request)
        response.action_masks.legal[:] = [True] * self.batch.num_envs
        return response


def test_masks_for_a_non_discrete_action_space_are_refused(servers: Callable[..., EnvServerHandle]) -> None:
    adapter = adapter_for(servers(_MasksForBoxActions(EnvBatch.from_gym_id("Pendulum-v1", 2))))
    with pytest.raises(EnvironmentProtocolError) as info:
        adapter.reset()
    assert info.value.message.startswith(
        f"env {adapter.address} answered Reset with a malformed field 'action_masks': action_masks: 2 flags sent, "
        "but action masks are defined for Discrete action spaces only")
    assert adapter.action_masks() is None  # nothing half-kept
    adapter.close()


def test_a_reconnect_takes_the_masks_of_the_new_reset(servers: Callable[..., EnvServerHandle]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    first = servers(port=port)
    adapter = adapter_for(first)
    adapter.reset(seed=3)
    adapter.step(np.zeros(3, dtype=np.int64))
    first.stop()
    second: list[EnvServerHandle] = []
    timer = threading.Timer(0.15, lambda: second.append(servers(port=port)))
    timer.start()
    result = adapter.step(np.zeros(3, dtype=np.int64))
    timer.join()
    assert result.reconnected
    np.testing.assert_array_equal(adapter.action_masks(), shown_legal(result.observations))
    served = second[0].servicer.batch.last_action_masks
    np.testing.assert_array_equal(adapter.action_masks(), served)
    adapter.close()


def test_the_reference_server_reports_a_broken_action_masks_as_internal(
        servers: Callable[..., EnvServerHandle]) -> None:
    env = MaskedChoiceEnv()
    env.action_masks = lambda: np.zeros(N, dtype=bool)  # type: ignore[method-assign]
    handle = servers(ReferenceEnvironmentServicer(EnvBatch([lambda: env])))
    with (grpc.insecure_channel(handle.address.removeprefix("grpc://")) as channel,
          pytest.raises(grpc.RpcError) as info):
        pb_grpc.EnvironmentServiceStub(channel).Reset(pb.ResetRequest(seed=0), timeout=5)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "reset failed: ValueError: env 0: action_masks() leaves no legal action"
