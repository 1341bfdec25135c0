"""GrpcExternalEnvAdapter against real servers on 127.0.0.1 and on unix sockets: data, deadlines, reconnects,
malformed answers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from rl_service.core.errors import EnvironmentProtocolError, EnvironmentUnavailable
from rl_service.envserver.faults import Fault, FaultyEnvironmentServicer
from rl_service.envserver.reference_server import (
    EnvServerHandle,
    ReferenceEnvironmentServicer,
    serve_gym,
    start_env_server,
)
from rl_service.infra.external_env.address import SocketDirectory, parse_address
from rl_service.infra.external_env.connector import GrpcExternalEnvironments
from rl_service.infra.external_env.env_batch import EnvBatch
from rl_service.infra.external_env.grpc_adapter import ConnectionOptions, GrpcExternalEnvAdapter, fetch_spec
from rl_service_proto.v1 import environment_pb2 as pb
from tests.support.envs import CRASH_ENV_ID

FAST = ConnectionOptions(step_timeout=0.5, connect_timeout=1.0, retries=2, backoff=0.05)


@pytest.fixture
def servers() -> Iterator[Callable[..., EnvServerHandle]]:
    """Start env servers; all are stopped at the end of the test."""
    started: list[EnvServerHandle] = []

    def start(servicer: ReferenceEnvironmentServicer | None = None, port: int = 0, env_id: str = "CartPole-v1",
              num_envs: int = 3, unix_socket: Path | None = None) -> EnvServerHandle:
        servicer = servicer or ReferenceEnvironmentServicer(EnvBatch.from_gym_id(env_id, num_envs))
        handle = start_env_server(servicer, port=port, unix_socket=unix_socket)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


def adapter_for(handle: EnvServerHandle, options: ConnectionOptions = FAST, **kwargs: bool) -> GrpcExternalEnvAdapter:
    return GrpcExternalEnvAdapter(parse_address(handle.address), options, **kwargs)


def faulty(fault: Fault, at_step: int = 3, env_id: str = "CartPole-v1", num_envs: int = 3,
           **kwargs: float) -> FaultyEnvironmentServicer:
    return FaultyEnvironmentServicer(EnvBatch.from_gym_id(env_id, num_envs), fault, at_step, **kwargs)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------ data


@pytest.mark.parametrize(("use_stream", "raw"), [(True, False), (False, False), (True, True)],
                         ids=["stream", "unary", "stream-raw"])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "FrozenLake-v1"])
def test_transitions_match_the_envs_in_process(use_stream: bool, raw: bool, env_id: str) -> None:
    handle = serve_gym(env_id, 3, raw_observations=raw)
    adapter = GrpcExternalEnvAdapter(parse_address(handle.address), ConnectionOptions(use_stream=use_stream))
    local = EnvBatch.from_gym_id(env_id, 3)
    try:
        assert adapter.spec.compatible_with(local.spec) and adapter.spec.name == env_id
        np.testing.assert_array_equal(adapter.reset(seed=9), local.reset(seed=9))
        space = local.action_space
        space.seed(0)
        ended = 0
        for _ in range(120):
            actions = np.stack([np.asarray(space.sample()) for _ in range(3)])
            got, want = adapter.step(actions), local.step(actions)
            np.testing.assert_array_equal(got.observations, want.observations)
            np.testing.assert_array_equal(got.rewards, want.rewards)
            np.testing.assert_array_equal(got.terminated, want.terminated)
            np.testing.assert_array_equal(got.truncated, want.truncated)
            assert sorted(got.final_observations) == want.ended.tolist()
            for j, i in enumerate(want.ended):
                np.testing.assert_array_equal(got.final_observations[int(i)], want.final_observations[j])
            ended += len(want.ended)
            assert not got.reconnected
        assert adapter.using_stream == use_stream
        assert handle.servicer.steps_served == 120, "one message per vector step"
        if env_id != "Pendulum-v1":
            assert ended > 0
    finally:
        adapter.close()
        adapter.close()
        handle.stop()
        local.close()


def test_closed_adapter_refuses_calls(servers: Callable[..., EnvServerHandle]) -> None:
    adapter = adapter_for(servers())
    adapter.reset()
    adapter.close()
    with pytest.raises(EnvironmentUnavailable, match="closed"):
        adapter.step(np.zeros(3, dtype=np.int64))


# ------------------------------------------------------------------------------------ connecting


def test_unreachable_address_fails_fast_with_the_cause() -> None:
    address = parse_address(f"grpc://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(EnvironmentUnavailable) as info:
        fetch_spec(address, ConnectionOptions(connect_timeout=3))
    assert time.monotonic() - started < 3
    assert str(address) in info.value.message and "not reachable" in info.value.message
    assert "UNAVAILABLE" in info.value.message
    with pytest.raises(EnvironmentUnavailable, match="not reachable"):
        GrpcExternalEnvAdapter(address, FAST)


def test_a_server_that_is_not_a_simulation() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(EnvironmentUnavailable, match="GetSpec failed: UNIMPLEMENTED"):
            fetch_spec(parse_address(f"grpc://127.0.0.1:{port}"), FAST)
    finally:
        server.stop(0)


class _BadSpec(ReferenceEnvironmentServicer):
    def GetSpec(self, request: pb.GetSpecRequest, context: grpc.ServicerContext) -> pb.EnvironmentSpec:
        spec = pb.EnvironmentSpec()
        spec.CopyFrom(super().GetSpec(request, context))
        spec.num_envs = 0
        return spec


def test_a_malformed_spec_names_the_field(servers: Callable[..., EnvServerHandle]) -> None:
    handle = servers(_BadSpec(EnvBatch.from_gym_id("CartPole-v1", 2)))
    with pytest.raises(EnvironmentProtocolError, match="malformed spec: num_envs: must be in"):
        fetch_spec(parse_address(handle.address), FAST)


def test_first_connection_is_retried_in_the_worker(servers: Callable[..., EnvServerHandle]) -> None:
    port = free_port()
    timer = threading.Timer(0.1, lambda: servers(port=port))
    timer.start()
    adapter = GrpcExternalEnvAdapter(parse_address(f"grpc://127.0.0.1:{port}"),
                                     ConnectionOptions(retries=5, backoff=0.1, connect_timeout=1), retry_connect=True)
    timer.join()
    assert adapter.spec.num_envs == 3 and adapter.reset().shape == (3, 4)
    adapter.close()


# ------------------------------------------------------------------------------------ faults


@pytest.mark.parametrize("use_stream", [True, False], ids=["stream", "unary"])
def test_a_slow_step_ends_at_the_deadline(servers: Callable[..., EnvServerHandle], use_stream: bool) -> None:
    servicer = faulty("slow", at_step=3, delay=10)
    adapter = adapter_for(servers(servicer), ConnectionOptions(step_timeout=0.5, use_stream=use_stream))
    adapter.reset()
    adapter.step(np.zeros(3, dtype=np.int64))
    adapter.step(np.zeros(3, dtype=np.int64))
    started = time.monotonic()
    try:
        with pytest.raises(EnvironmentUnavailable) as info:
            adapter.step(np.zeros(3, dtype=np.int64))
        assert 0.45 < time.monotonic() - started < 2.0
        assert "Step did not answer within 0.5s (ENV_STEP_TIMEOUT_SECONDS)" in info.value.message
        assert adapter.address in info.value.message
    finally:
        servicer.release.set()
        adapter.close()


@pytest.mark.parametrize(("fault", "field"), [
    ("nan_reward", "rewards"),
    ("short_observations", "observations"),
    ("short_terminated", "terminated"),
    ("missing_final_observation", "final_observations"),
])
def test_malformed_answers_name_the_field(servers: Callable[..., EnvServerHandle], fault: Fault, field: str) -> None:
    adapter = adapter_for(servers(faulty(fault, at_step=2)))
    adapter.reset()
    adapter.step(np.zeros(3, dtype=np.int64))
    with pytest.raises(EnvironmentProtocolError) as info:
        adapter.step(np.zeros(3, dtype=np.int64))
    assert f"answered Step with a malformed field '{field}'" in info.value.message
    assert adapter.address in info.value.message
    adapter.close()


def test_a_simulation_error_is_reported_not_retried(servers: Callable[..., EnvServerHandle]) -> None:
    adapter = adapter_for(servers(faulty("internal", at_step=1)))
    adapter.reset()
    with pytest.raises(EnvironmentUnavailable, match="Step failed: INTERNAL: step failed: physics engine diverged"):
        adapter.step(np.zeros(3, dtype=np.int64))
    assert adapter.reconnects == 0


def test_step_after_a_failure_needs_a_reset(servers: Callable[..., EnvServerHandle]) -> None:
    handle = servers(ReferenceEnvironmentServicer(EnvBatch.from_gym_id(CRASH_ENV_ID, 2)))
    adapter = adapter_for(handle, ConnectionOptions(use_stream=False))
    adapter.reset()
    with pytest.raises(EnvironmentUnavailable, match="INTERNAL: step failed: RuntimeError"):
        for _ in range(400):
            adapter.step(np.zeros(2, dtype=np.int64))
    with pytest.raises(EnvironmentUnavailable, match="FAILED_PRECONDITION: Reset is required"):
        adapter.step(np.zeros(2, dtype=np.int64))
    adapter.reset()
    with pytest.raises(EnvironmentUnavailable, match="INTERNAL"):  # stepped again (this env keeps crashing)
        adapter.step(np.zeros(2, dtype=np.int64))


def test_a_simulation_without_session_is_driven_by_unary_calls(servers: Callable[..., EnvServerHandle]) -> None:
    servicer = faulty("no_session")
    adapter = adapter_for(servers(servicer))
    assert adapter.using_stream
    adapter.reset(seed=1)
    for _ in range(5):
        adapter.step(np.ones(3, dtype=np.int64))
    assert not adapter.using_stream
    assert servicer.calls["Reset"] == 1 and servicer.calls["Step"] == 5 and servicer.steps_served == 5


@pytest.mark.parametrize("use_stream", [True, False], ids=["stream", "unary"])
def test_a_restarted_simulation_is_reconnected(servers: Callable[..., EnvServerHandle], use_stream: bool) -> None:
    port = free_port()
    first = servers(port=port)
    options = ConnectionOptions(step_timeout=2, connect_timeout=1, retries=5, backoff=0.1, use_stream=use_stream)
    adapter = GrpcExternalEnvAdapter(parse_address(first.address), options)
    adapter.reset(seed=3)
    before = adapter.step(np.zeros(3, dtype=np.int64)).observations
    first.stop()
    timer = threading.Timer(0.15, lambda: servers(port=port))
    timer.start()
    result = adapter.step(np.zeros(3, dtype=np.int64))
    timer.join()
    assert result.reconnected and adapter.reconnects == 1
    assert result.truncated.all() and not result.terminated.any() and not result.rewards.any()
    assert sorted(result.final_observations) == [0, 1, 2], "every episode was cut"
    np.testing.assert_array_equal(np.stack([result.final_observations[i] for i in range(3)]), before)
    after = adapter.step(np.zeros(3, dtype=np.int64))
    assert not after.reconnected
    adapter.close()


def test_a_lost_simulation_fails_after_the_retries(servers: Callable[..., EnvServerHandle]) -> None:
    handle = servers()
    adapter = adapter_for(handle)
    adapter.reset()
    handle.stop()
    started = time.monotonic()
    with pytest.raises(EnvironmentUnavailable) as info:
        adapter.step(np.zeros(3, dtype=np.int64))
    assert time.monotonic() - started < 5
    message = info.value.message
    assert message.startswith(f"env {handle.address}: connection lost during Step (")
    assert "2 reconnect attempts failed (ENV_CONNECT_RETRIES=2)" in message and "UNAVAILABLE" in message


def test_a_simulation_that_comes_back_different_is_refused(servers: Callable[..., EnvServerHandle]) -> None:
    port = free_port()
    first = servers(port=port)
    adapter = GrpcExternalEnvAdapter(parse_address(first.address), FAST)
    adapter.reset()
    first.stop()
    servers(port=port, num_envs=5)
    with pytest.raises(EnvironmentProtocolError, match="came back with a different spec"):
        adapter.step(np.zeros(3, dtype=np.int64))


def test_message_size_is_capped(servers: Callable[..., EnvServerHandle]) -> None:
    handle = servers(env_id="CartPole-v1", num_envs=64)
    adapter = adapter_for(handle, ConnectionOptions(max_message_bytes=512, retries=0))
    with pytest.raises(EnvironmentUnavailable, match="RESOURCE_EXHAUSTED"):
        adapter.reset()


def test_box_actions_are_clipped_to_the_bounds(servers: Callable[..., EnvServerHandle]) -> None:
    handle = servers(env_id="Pendulum-v1", num_envs=2)  # the reference server refuses actions outside [-2, 2]
    adapter = adapter_for(handle)
    adapter.reset(seed=0)
    result = adapter.step(np.array([[5.0], [-7.5]], dtype=np.float32))
    assert result.observations.shape == (2, 3) and handle.servicer.steps_served == 1
    adapter.close()


# ------------------------------------------------------------------------------------ unix domain sockets


def test_a_simulation_on_a_unix_socket(servers: Callable[..., EnvServerHandle], tmp_path: Path) -> None:
    path = tmp_path / "cartpole.sock"
    first = servers(unix_socket=path)
    assert first.address == f"unix://{path}" and path.is_socket()
    options = ConnectionOptions(step_timeout=2, connect_timeout=1, retries=5, backoff=0.1)
    adapter = GrpcExternalEnvironments(socket_dir=SocketDirectory(tmp_path), options=options).adapter(
        "unix:cartpole.sock")
    assert adapter.address == "unix:cartpole.sock" and adapter.spec.num_envs == 3
    adapter.reset(seed=1)
    assert adapter.step(np.zeros(3, dtype=np.int64)).observations.shape == (3, 4)
    first.stop()
    assert not path.exists(), "stopping removes the socket file"
    # A simulation restarted on the same path is reconnected like one restarted on the same port.
    timer = threading.Timer(0.1, lambda: servers(unix_socket=path))
    timer.start()
    result = adapter.step(np.zeros(3, dtype=np.int64))
    timer.join()
    assert result.reconnected and result.truncated.all()
    adapter.close()


def test_a_lost_unix_simulation_is_named_as_written(servers: Callable[..., EnvServerHandle], tmp_path: Path) -> None:
    handle = servers(unix_socket=tmp_path / "sim.sock")
    adapter = GrpcExternalEnvironments(socket_dir=SocketDirectory(tmp_path), options=FAST).adapter("unix:sim.sock")
    adapter.reset()
    handle.stop()
    with pytest.raises(EnvironmentUnavailable) as info:
        adapter.step(np.zeros(3, dtype=np.int64))
    assert info.value.message.startswith("env unix:sim.sock: connection lost during Step (")


def test_binding_replaces_only_a_stale_socket(servers: Callable[..., EnvServerHandle], tmp_path: Path) -> None:
    path = tmp_path / "sim.sock"
    with socket.socket(socket.AF_UNIX) as stale:  # bound, then closed: the file stays, nobody listens
        stale.bind(str(path))
    servers(unix_socket=path).stop()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(OSError, match="exists and is not a socket; refusing to remove it"):
        servers(unix_socket=path)
    assert path.read_text() == "not a socket"
    path.unlink()
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen(1)
        with pytest.raises(OSError, match="another server is listening on it"):
            servers(unix_socket=path)
        assert path.is_socket()
    with pytest.raises(OSError, match="sun_path"):
        servers(unix_socket=tmp_path / ("s" * 120))
    with pytest.raises(OSError, match="does not exist"):
        servers(unix_socket=tmp_path / "missing" / "sim.sock")

