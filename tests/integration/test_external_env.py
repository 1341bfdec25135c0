"""External environments end to end: StartTraining with env_id grpc://... or unix:..., training through the
reference server over real sockets, and every fault the issue lists with its documented result
(docs/environment-protocol.md)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import gymnasium as gym
import pytest
from grpc_health.v1 import health_pb2

from rl_service.core.algorithms.registry import ALGORITHMS
from rl_service.envserver.faults import Fault, FaultyEnvironmentServicer
from rl_service.envserver.reference_server import (
    EnvServerHandle,
    ReferenceEnvironmentServicer,
    serve_gym,
    start_env_server,
)
from rl_service.infra.external_env.env_batch import EnvBatch
from rl_service_proto.v1 import environment_pb2 as env_pb
from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import ServerHandle, start_server

ROOT = Path(__file__).resolve().parents[2]
# Short deadlines so that every fault resolves in a second or two.
FAULT_SETTINGS = {"env_step_timeout_seconds": 1.0, "env_connect_timeout_seconds": 1.0, "env_connect_retries": 2,
                  "env_retry_backoff_seconds": 0.1}
# Per registry key: small, quick settings (keys a schema lacks are dropped, so new entries work unchanged).
QUICK = {"n_steps": "64", "batch_size": "64", "n_epochs": "2", "learning_starts": "200",
         "target_update_interval": "500", "buffer_size": "5000", "net_arch": "32,32"}
NUM_ENVS = 4


def quick(key: str, **extra: str) -> dict[str, str]:
    names = ALGORITHMS[key].schema.names
    return {k: v for k, v in {**QUICK, **extra}.items() if k in names}


def supports(key: str, action_space: gym.Space[Any]) -> bool:
    return isinstance(action_space, ALGORITHMS[key].action_spaces)


@pytest.fixture(scope="module")
def socket_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training server's EXTERNAL_ENV_SOCKET_DIR (a short path: a socket path holds at most 107 bytes)."""
    return tmp_path_factory.mktemp("socks")


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory, socket_dir: Path) -> Iterator[ServerHandle]:
    handle = start_server(tmp_path_factory.mktemp("external"), external_env_socket_dir=socket_dir, **FAULT_SETTINGS)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def cartpole() -> Iterator[EnvServerHandle]:
    handle = serve_gym("CartPole-v1", NUM_ENVS)
    yield handle
    handle.stop()


@pytest.fixture
def env_servers() -> Iterator[Callable[..., EnvServerHandle]]:
    """Start env servers for one test (a fault each); all stopped at the end."""
    started: list[EnvServerHandle] = []

    def start(servicer: ReferenceEnvironmentServicer, port: int = 0) -> EnvServerHandle:
        handle = start_env_server(servicer, port=port)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


def faulty(fault: Fault, at_step: int, **kwargs: Any) -> FaultyEnvironmentServicer:
    return FaultyEnvironmentServicer(EnvBatch.from_gym_id("CartPole-v1", NUM_ENVS), fault, at_step, **kwargs)


def start_error(server: ServerHandle, env_id: str, algorithm: str = "PPO", **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        server.start(algorithm, env_id=env_id, total_timesteps=1000, **kwargs)
    return info.value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_healthy(server: ServerHandle, cartpole: EnvServerHandle) -> None:
    """Health SERVING, and a new run through a good simulation trains to the end."""
    assert server.health_status() == health_pb2.HealthCheckResponse.SERVING
    run_id = server.start("PPO", env_id=cartpole.address, total_timesteps=256, hyperparameters=quick("ppo"))
    final = server.watch_to_end(run_id)[-1]
    assert final.state == pb.SUCCEEDED, final.error


class _Stopper:
    """contextlib.closing() for an env server."""

    def __init__(self, handle: EnvServerHandle) -> None:
        self.handle = handle

    def close(self) -> None:
        self.handle.stop()


# ------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("key", sorted(ALGORITHMS))
def test_registry_trains_through_the_reference_server(training: ServerHandle, cartpole: EnvServerHandle,
                                                      key: str) -> None:
    spec = ALGORITHMS[key]
    if not supports(key, gym.spaces.Discrete(2)):
        pytest.skip(f"{spec.name} cannot act in CartPole's Discrete action space")
    if spec.needs_action_masks:
        pytest.skip(f"{spec.name} needs action masks, which CartPole's simulation does not send")
    served = cartpole.servicer.steps_served
    run_id = training.start(spec.name, env_id=cartpole.address, total_timesteps=2048, seed=3,
                            checkpoint_interval=1000, hyperparameters=quick(key))
    final = training.watch_to_end(run_id, timeout=240)[-1]

    assert final.state == pb.SUCCEEDED, final.error
    assert final.env_id == cartpole.address and final.hyperparameters["n_envs"] == str(NUM_ENVS)
    assert final.timesteps_done >= 2048 and final.metrics.episodes_completed > 0
    assert final.metrics.mean_episode_length > 0
    assert Path(final.model_path).is_file() and Path(final.last_checkpoint_path).is_file()
    # One message per vector step, carrying every env.
    assert cartpole.servicer.steps_served - served == final.timesteps_done // NUM_ENVS
    reply = training.stub.Act(pb.ActRequest(run_id=run_id, observation=[0.0] * 4, deterministic=True))
    assert reply.action[0] in (0.0, 1.0)


@pytest.mark.parametrize("key", sorted(ALGORITHMS))
def test_box_actions_train_through_the_reference_server(training: ServerHandle, key: str) -> None:
    if not supports(key, gym.spaces.Box(-2, 2, (1,))):
        pytest.skip(f"{ALGORITHMS[key].name} cannot act in a Box action space")
    with contextlib.closing(_Stopper(serve_gym("Pendulum-v1", 2, raw_observations=True))) as pendulum:
        run_id = training.start(ALGORITHMS[key].name, env_id=pendulum.handle.address, total_timesteps=512,
                                hyperparameters=quick(key))
        final = training.watch_to_end(run_id, timeout=120)[-1]
    assert final.state == pb.SUCCEEDED, final.error
    assert final.hyperparameters["n_envs"] == "2"
    action = training.stub.Act(pb.ActRequest(run_id=run_id, observation=[1.0, 0.0, 0.0])).action
    assert len(action) == 1 and -2.0 <= action[0] <= 2.0


def test_a_simulation_without_session_trains_over_unary_calls(training: ServerHandle,
                                                              env_servers: Callable[..., EnvServerHandle]) -> None:
    servicer = faulty("no_session", at_step=1)
    handle = env_servers(servicer)
    run_id = training.start("PPO", env_id=handle.address, total_timesteps=512, hyperparameters=quick("ppo"))
    assert training.watch_to_end(run_id)[-1].state == pb.SUCCEEDED
    assert servicer.calls["Step"] == servicer.steps_served == 512 // NUM_ENVS


def test_a_run_trains_through_a_unix_socket(training: ServerHandle, socket_dir: Path) -> None:
    with contextlib.closing(_Stopper(serve_gym("CartPole-v1", NUM_ENVS, unix_socket=socket_dir / "cp.sock"))) as sim:
        run_id = training.start("PPO", env_id="unix:cp.sock", total_timesteps=1024, hyperparameters=quick("ppo"))
        final = training.watch_to_end(run_id)[-1]
        assert final.state == pb.SUCCEEDED, final.error
        assert final.env_id == "unix:cp.sock" and final.hyperparameters["n_envs"] == str(NUM_ENVS)
        assert final.timesteps_done >= 1024 and final.metrics.episodes_completed > 0
        assert sim.handle.servicer.steps_served == final.timesteps_done // NUM_ENVS
    assert not (socket_dir / "cp.sock").exists()


# ------------------------------------------------------------------------------------ checked at StartTraining


def test_a_host_off_the_allow_list_is_refused_before_any_contact(server_factory: Callable[..., ServerHandle],
                                                                  cartpole: EnvServerHandle) -> None:
    server = server_factory(external_env_allowed_hosts="127.0.0.1")
    contacted = cartpole.servicer.calls["GetSpec"]
    before = len(server.stub.ListRuns(pb.ListRunsRequest()).runs)
    address = f"grpc://localhost:{cartpole.port}"  # a real, listening simulation: only the name is off the list
    error = start_error(server, address)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert address in error.details() and "EXTERNAL_ENV_ALLOWED_HOSTS" in error.details()
    assert cartpole.servicer.calls["GetSpec"] == contacted, "nothing was contacted"
    assert len(server.stub.ListRuns(pb.ListRunsRequest()).runs) == before, "no run was recorded"


def test_a_socket_outside_the_socket_dir_is_refused_before_any_contact(training: ServerHandle, socket_dir: Path,
                                                                        tmp_path: Path) -> None:
    outside = tmp_path / "sim.sock"  # a real, listening simulation, outside EXTERNAL_ENV_SOCKET_DIR
    escape = socket_dir / "escape"
    escape.symlink_to(tmp_path)
    with contextlib.closing(_Stopper(serve_gym("CartPole-v1", NUM_ENVS, unix_socket=outside))) as sim:
        before = len(training.stub.ListRuns(pb.ListRunsRequest()).runs)
        relative = os.path.relpath(outside, os.path.realpath(socket_dir))
        for address in (f"unix://{outside}", f"unix:{relative}", "unix:escape/sim.sock"):
            error = start_error(training, address)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, address
            assert error.details() == (f"env_id: {address} is not allowed: the socket must lie inside "
                                       f"EXTERNAL_ENV_SOCKET_DIR ({socket_dir}); nothing was contacted")
        assert sim.handle.servicer.calls["GetSpec"] == 0, "nothing was contacted"
        assert len(training.stub.ListRuns(pb.ListRunsRequest()).runs) == before, "no run was recorded"
    escape.unlink()


def test_unix_addresses_are_refused_without_a_socket_dir(server_factory: Callable[..., ServerHandle],
                                                         tmp_path: Path) -> None:
    server = server_factory()
    with contextlib.closing(_Stopper(serve_gym("CartPole-v1", 2, unix_socket=tmp_path / "sim.sock"))) as sim:
        error = start_error(server, f"unix://{tmp_path}/sim.sock")
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "unix socket addresses are disabled; set EXTERNAL_ENV_SOCKET_DIR" in error.details()
        assert sim.handle.servicer.calls["GetSpec"] == 0


@pytest.mark.parametrize(("address", "expected"), [
    ("unix:", "has no socket path"), ("unix:sim.sock?x=1", "no ?, # or %"), ("unix://host/sim.sock", "names a host"),
    ("unix:" + "s" * 120, "(sun_path)"),
])
def test_malformed_unix_addresses_are_invalid_argument(training: ServerHandle, address: str, expected: str) -> None:
    error = start_error(training, address)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in error.details()
    assert error.details().startswith("env_id: ")


def test_default_allow_list_is_loopback_only(training: ServerHandle) -> None:
    for address in ("grpc://10.1.2.3:50061", "grpc://example.com:50061", "grpc://[fe80::1]:50061"):
        started = time.monotonic()
        error = start_error(training, address)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, address
        assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("address", ["grpc://127.0.0.1", "grpc://127.0.0.1:1/x", "grpc://user@localhost:1"])
def test_malformed_addresses_are_invalid_argument(training: ServerHandle, address: str) -> None:
    error = start_error(training, address)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "grpc://HOST:PORT" in error.details()


def test_an_unreachable_simulation_is_failed_precondition_at_once(training: ServerHandle) -> None:
    address = f"grpc://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    error = start_error(training, address)
    assert time.monotonic() - started < 3
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert address in error.details() and "not reachable" in error.details() and "UNAVAILABLE" in error.details()


def test_a_silent_host_is_failed_precondition_within_the_connect_timeout(training: ServerHandle) -> None:
    with socket.socket() as silent:  # accepts TCP connections (backlog) but never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"grpc://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        error = start_error(training, address)
        elapsed = time.monotonic() - started
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert 0.9 < elapsed < 4, "answers at ENV_CONNECT_TIMEOUT_SECONDS (1s here), never hangs"
    assert address in error.details() and "ENV_CONNECT_TIMEOUT_SECONDS" in error.details()


def test_spaces_the_algorithm_cannot_handle_are_invalid_argument(training: ServerHandle) -> None:
    with contextlib.closing(_Stopper(serve_gym("Pendulum-v1", 2))) as pendulum:
        error = start_error(training, pendulum.handle.address, algorithm="DQN")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "DQN cannot act in a Box action space" in error.details()


def test_n_envs_is_the_simulations(training: ServerHandle, cartpole: EnvServerHandle) -> None:
    error = start_error(training, cartpole.address, hyperparameters={"n_envs": "2"})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"hosts {NUM_ENVS} envs" in error.details() and "n_envs" in error.details()
    # PPO checks batch_size against the simulation's n_envs, not the default of 1.
    error = start_error(training, cartpole.address, hyperparameters={"n_steps": "8", "batch_size": "64"})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "n_steps * n_envs = 32" in error.details()


class _BadSpec(ReferenceEnvironmentServicer):
    def GetSpec(self, request: env_pb.GetSpecRequest, context: grpc.ServicerContext) -> env_pb.EnvironmentSpec:
        spec = env_pb.EnvironmentSpec()
        spec.CopyFrom(super().GetSpec(request, context))
        spec.action_space.discrete.n = 0
        return spec


def test_a_malformed_spec_is_failed_precondition(training: ServerHandle,
                                                 env_servers: Callable[..., EnvServerHandle]) -> None:
    handle = env_servers(_BadSpec(EnvBatch.from_gym_id("CartPole-v1", 2)))
    error = start_error(training, handle.address)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "malformed spec: action_space.discrete.n: must be at least 1" in error.details()


# ------------------------------------------------------------------------------------ faults during a run


@contextlib.contextmanager
def env_server_process(num_envs: int = NUM_ENVS) -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "rl_service.envserver", "--env", "CartPole-v1", "--num-envs", str(num_envs),
         "--port", "0"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert " on grpc://127.0.0.1:" in line, line
        yield process, line.rsplit(" on ", 1)[1].strip()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_simulation_killed_mid_run_fails_the_run_and_keeps_its_checkpoints(training: ServerHandle,
                                                                           cartpole: EnvServerHandle) -> None:
    with env_server_process() as (process, address):
        run_id = training.start("PPO", env_id=address, total_timesteps=5_000_000, checkpoint_interval=500,
                                hyperparameters=quick("ppo"))
        training.wait_until(run_id, lambda s: s.timesteps_done >= 1200 and bool(s.last_checkpoint_path))
        os.kill(process.pid, signal.SIGKILL)
        started = time.monotonic()
        final = training.wait_until(run_id, lambda s: s.is_done, timeout=30)
    assert time.monotonic() - started < 10
    assert final.state == pb.FAILED
    assert final.error.startswith(f"EnvironmentUnavailable: env {address}: connection lost during Step")
    assert "2 reconnect attempts failed (ENV_CONNECT_RETRIES=2)" in final.error
    kept = Path(final.last_checkpoint_path)
    assert kept.is_file() and kept.parent.name == run_id and final.timesteps_done >= 1200
    assert_healthy(training, cartpole)


def test_a_failed_simulation_leaves_a_checkpoint_of_what_was_learnt(training: ServerHandle,
                                                                     cartpole: EnvServerHandle) -> None:
    with env_server_process() as (process, address):
        # No periodic checkpoint is due before the simulation dies: the one found after is the failure's own.
        run_id = training.start("PPO", env_id=address, total_timesteps=5_000_000, checkpoint_interval=1_000_000,
                                hyperparameters=quick("ppo"))
        training.wait_until(run_id, lambda s: s.timesteps_done >= 1200)
        os.kill(process.pid, signal.SIGKILL)
        final = training.wait_until(run_id, lambda s: s.is_done, timeout=30)
    assert final.state == pb.FAILED and final.error.startswith("EnvironmentUnavailable")
    kept = Path(final.last_checkpoint_path)
    assert kept.is_file() and kept.name == f"checkpoint_{final.timesteps_done}_steps.zip"
    reply = training.stub.Act(pb.ActRequest(run_id=run_id, observation=[0.0] * 4, deterministic=True))
    # The failed run still serves the policy it had learnt when the simulation died.
    assert list(reply.action) in ([0.0], [1.0]) and reply.model_timesteps == final.timesteps_done
    assert_healthy(training, cartpole)


def test_a_restarted_simulation_is_reconnected_and_the_run_goes_on(training: ServerHandle,
                                                                   env_servers: Callable[..., EnvServerHandle]) -> None:
    port = free_port()
    first = env_servers(ReferenceEnvironmentServicer(EnvBatch.from_gym_id("CartPole-v1", NUM_ENVS)), port=port)
    run_id = training.start("PPO", env_id=first.address, total_timesteps=1536, hyperparameters=quick("ppo"))
    deadline = time.monotonic() + 60
    while first.servicer.steps_served < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    first.stop()
    threading.Timer(0.05, lambda: env_servers(
        ReferenceEnvironmentServicer(EnvBatch.from_gym_id("CartPole-v1", NUM_ENVS)), port=port)).start()
    final = training.watch_to_end(run_id)[-1]
    assert final.state == pb.SUCCEEDED, final.error
    assert final.timesteps_done >= 1536


def test_a_slow_step_past_the_deadline_fails_the_run(training: ServerHandle, cartpole: EnvServerHandle,
                                                     env_servers: Callable[..., EnvServerHandle]) -> None:
    servicer = faulty("slow", at_step=200, delay=30)
    handle = env_servers(servicer)
    run_id = training.start("PPO", env_id=handle.address, total_timesteps=5_000_000, checkpoint_interval=500,
                            hyperparameters=quick("ppo"))
    assert servicer.injected.wait(60)
    started = time.monotonic()
    final = training.wait_until(run_id, lambda s: s.is_done, timeout=30)
    servicer.release.set()
    assert time.monotonic() - started < 5
    assert final.state == pb.FAILED
    assert final.error == (f"EnvironmentUnavailable: env {handle.address}: Step did not answer within 1s "
                           "(ENV_STEP_TIMEOUT_SECONDS); the simulation is too slow or stuck")
    assert Path(final.last_checkpoint_path).is_file()
    assert_healthy(training, cartpole)


@pytest.mark.parametrize(("fault", "field"), [("nan_reward", "rewards"), ("short_observations", "observations"),
                                              ("missing_final_observation", "final_observations"),
                                              ("no_legal_action", "action_masks")])
def test_a_malformed_answer_fails_the_run_naming_the_field(training: ServerHandle, cartpole: EnvServerHandle,
                                                           env_servers: Callable[..., EnvServerHandle],
                                                           fault: Fault, field: str) -> None:
    handle = env_servers(faulty(fault, at_step=150))
    run_id = training.start("PPO", env_id=handle.address, total_timesteps=5_000_000, checkpoint_interval=500,
                            hyperparameters=quick("ppo"))
    final = training.watch_to_end(run_id)[-1]
    assert final.state == pb.FAILED
    assert final.error.startswith(
        f"EnvironmentProtocolError: env {handle.address} answered Step with a malformed field '{field}': {field}: ")
    assert math.isclose(final.timesteps_done, 149 * NUM_ENVS, abs_tol=NUM_ENVS)
    assert Path(final.last_checkpoint_path).is_file()
    assert training.health_status() == health_pb2.HealthCheckResponse.SERVING


def test_a_simulation_error_fails_the_run_with_its_message(training: ServerHandle,
                                                           env_servers: Callable[..., EnvServerHandle]) -> None:
    handle = env_servers(faulty("internal", at_step=50))
    run_id = training.start("PPO", env_id=handle.address, total_timesteps=5_000_000, hyperparameters=quick("ppo"))
    final = training.watch_to_end(run_id)[-1]
    assert final.state == pb.FAILED
    assert final.error == (f"EnvironmentUnavailable: env {handle.address}: Step failed: INTERNAL: step failed: "
                           "physics engine diverged (injected fault)")


def test_a_simulation_gone_before_the_worker_starts_fails_the_run(training: ServerHandle,
                                                                  env_servers: Callable[..., EnvServerHandle]) -> None:
    handle = env_servers(ReferenceEnvironmentServicer(EnvBatch.from_gym_id("CartPole-v1", NUM_ENVS)))
    run_id = training.start("PPO", env_id=handle.address, total_timesteps=100_000, hyperparameters=quick("ppo"))
    handle.stop()  # accepted; the worker's first connection is retried, then the run fails
    final = training.watch_to_end(run_id)[-1]
    assert final.state == pb.FAILED and handle.address in final.error
    assert final.error.startswith("EnvironmentUnavailable: ") and "ENV_CONNECT_RETRIES=2" in final.error
