"""The compliance class runs against the reference server (several spaces and encodings), catches a broken
server, and the env-server and compliance command lines work as documented."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rl_service.envserver.compliance import EnvironmentServiceCompliance, run_checks
from rl_service.envserver.faults import FaultyEnvironmentServicer
from rl_service.envserver.reference_server import EnvServerHandle, serve_gym, start_env_server
from rl_service.infra.external_env.env_batch import EnvBatch

ROOT = Path(__file__).resolve().parents[2]


class _ReferenceServer:
    """Serves `env_id` for the class; fresh_address starts a never-reset one."""

    __test__ = False
    env_id = "CartPole-v1"
    num_envs = 4
    raw_observations = False
    handles: list[EnvServerHandle]

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _serve(cls) -> Iterator[None]:
        handle = serve_gym(cls.env_id, cls.num_envs, raw_observations=cls.raw_observations)
        cls.address = handle.address
        cls.handles = [handle]
        yield
        for started in cls.handles:
            started.stop()

    def fresh_address(self) -> str | None:
        handle = serve_gym(self.env_id, self.num_envs)
        self.handles.append(handle)
        return handle.address


class TestCartPoleCompliance(_ReferenceServer, EnvironmentServiceCompliance):
    __test__ = True


class TestPendulumRawCompliance(_ReferenceServer, EnvironmentServiceCompliance):
    """Box actions, observations as raw bytes."""

    __test__ = True
    env_id = "Pendulum-v1"
    num_envs = 2
    raw_observations = True
    max_steps_to_episode_end = 400


class TestFrozenLakeCompliance(_ReferenceServer, EnvironmentServiceCompliance):
    """Discrete observations."""

    __test__ = True
    env_id = "FrozenLake-v1"
    num_envs = 3


def test_the_checks_catch_a_broken_server() -> None:
    servicer = FaultyEnvironmentServicer(EnvBatch.from_gym_id("CartPole-v1", 2), "short_observations", at_step=1,
                                         persistent=True)
    handle = start_env_server(servicer)
    try:
        outcomes = {name: (outcome, detail) for name, outcome, detail in run_checks(handle.address, timeout=5)}
    finally:
        handle.stop()
    assert outcomes["test_step_answers_every_env"][0] == "failed"
    assert "observations: 7 values; expected 8" in outcomes["test_step_answers_every_env"][1]
    assert outcomes["test_spec_is_well_formed"][0] == "passed"


def test_env_server_and_compliance_command_lines() -> None:
    server = subprocess.Popen([sys.executable, "-m", "rl_service.envserver", "--env", "CartPole-v1", "--num-envs",
                               "3", "--port", "0"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("serving CartPole-v1 (3 envs) on grpc://127.0.0.1:"), line
        address = line.rsplit(" on ", 1)[1].strip()
        check = subprocess.run([sys.executable, "-m", "rl_service.envserver.compliance", address],
                               capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.rstrip().endswith("compliant")
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.parametrize(("argv", "message"), [
    (["--env", "NoSuchEnv-v0"], "cannot create 'NoSuchEnv-v0'"),
    (["--env", "CartPole-v1", "--num-envs", "0"], "--num-envs must be in"),
])
def test_env_server_refuses_bad_arguments(argv: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "rl_service.envserver", *argv, "--port", "0"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and message in result.stderr


def test_compliance_command_reports_an_unreachable_server() -> None:
    from rl_service.envserver import compliance

    assert compliance.main(["grpc://127.0.0.1:1", "--timeout", "2"]) == 1
