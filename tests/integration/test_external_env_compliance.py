"""The compliance class runs against the reference server (several spaces and encodings, TCP and unix sockets,
action masks), catches a broken server, and the env-server and compliance command lines work as documented."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rl_service.envserver import cli
from rl_service.envserver.compliance import EnvironmentServiceCompliance, run_checks
from rl_service.envserver.faults import Fault, FaultyEnvironmentServicer
from rl_service.envserver.reference_server import (
    EnvServerHandle,
    ReferenceEnvironmentServicer,
    serve_gym,
    start_env_server,
)
from rl_service.infra.external_env.env_batch import EnvBatch
from rl_service_proto.v1 import environment_pb2 as pb
from tests.support.envs import MASKED_ENV_ID

ROOT = Path(__file__).resolve().parents[2]


class _ReferenceServer:
    """Serves `env_id` for the class; fresh_address starts a never-reset one."""

    __test__ = False
    env_id = "CartPole-v1"
    num_envs = 4
    raw_observations = False
    on_unix_socket = False  # serve on unix sockets in a temp directory rather than on 127.0.0.1
    handles: list[EnvServerHandle]
    socket_dir: Path

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _serve(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
        cls.socket_dir = tmp_path_factory.mktemp("socks")
        cls.handles = []
        cls.address = cls._start(raw_observations=cls.raw_observations)
        yield
        for started in cls.handles:
            started.stop()

    @classmethod
    def _start(cls, raw_observations: bool = False) -> str:
        path = cls.socket_dir / f"sim{len(cls.handles)}.sock" if cls.on_unix_socket else None
        handle = serve_gym(cls.env_id, cls.num_envs, raw_observations=raw_observations, unix_socket=path)
        cls.handles.append(handle)
        return handle.address

    def fresh_address(self) -> str | None:
        return self._start()


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


class TestCartPoleUnixSocketCompliance(_ReferenceServer, EnvironmentServiceCompliance):
    """The same contract over a unix domain socket (unix:///absolute/path)."""

    __test__ = True
    on_unix_socket = True


class TestMaskedChoiceCompliance(_ReferenceServer, EnvironmentServiceCompliance):
    """A simulation that sends action masks in every answer."""

    __test__ = True
    env_id = MASKED_ENV_ID
    num_envs = 3


MASK_CHECKS = ("test_action_masks_are_well_formed_and_sent_consistently",
               "test_illegal_actions_are_stepped_not_refused")


def checks_against(servicer: ReferenceEnvironmentServicer) -> dict[str, tuple[str, str]]:
    handle = start_env_server(servicer)
    try:
        return {name: (outcome, detail) for name, outcome, detail in run_checks(handle.address, timeout=5)}
    finally:
        handle.stop()


def test_the_mask_checks_run_for_a_simulation_with_masks_and_skip_without() -> None:
    masked = checks_against(ReferenceEnvironmentServicer(EnvBatch.from_gym_id(MASKED_ENV_ID, 2)))
    assert all(outcome in ("passed", "skipped") for outcome, _ in masked.values()), masked
    assert [masked[name][0] for name in MASK_CHECKS] == ["passed", "passed"]
    plain = checks_against(ReferenceEnvironmentServicer(EnvBatch.from_gym_id("CartPole-v1", 2)))
    assert [plain[name] for name in MASK_CHECKS] == [
        ("skipped", "the simulation sends no action masks (optional: every action is legal)"),
        ("skipped", "no action was masked as illegal within 32 steps")]


@pytest.mark.parametrize(("env_id", "fault", "detail"), [
    (MASKED_ENV_ID, "no_legal_action", "malformed answer: action_masks: env 0 has no legal action (all 8 flags false)"),
    ("CartPole-v1", "short_action_masks", "malformed answer: action_masks: 3 flags; expected 4 (2 envs x 2 actions"),
])
def test_the_checks_catch_broken_masks(env_id: str, fault: Fault, detail: str) -> None:
    outcomes = checks_against(FaultyEnvironmentServicer(EnvBatch.from_gym_id(env_id, 2), fault, persistent=True))
    outcome, message = outcomes["test_step_answers_every_env"]
    assert outcome == "failed" and message.startswith(detail)
    assert outcomes[MASK_CHECKS[0]][0] == "failed"


class _MasksInResetOnly(ReferenceEnvironmentServicer):
    def step(self, request: pb.StepRequest) -> pb.StepResponse:
        response = super().step(request)
        response.ClearField("action_masks")
        return response


def test_masks_sent_in_some_answers_only_are_flagged_unless_allowed() -> None:
    outcomes = checks_against(_MasksInResetOnly(EnvBatch.from_gym_id(MASKED_ENV_ID, 2)))
    assert outcomes[MASK_CHECKS[0]] == ("failed", (
        "action_masks: sent in some answers but missing from Step answers; a simulation with masks should send "
        "them in every answer (empty means every action legal; set masks_in_every_answer = False to allow it)"))
    handle = start_env_server(_MasksInResetOnly(EnvBatch.from_gym_id(MASKED_ENV_ID, 2)))
    suite = EnvironmentServiceCompliance()
    suite.address, suite.standalone, suite.masks_in_every_answer = handle.address, True, False
    suite.setup_method()
    try:
        suite.test_action_masks_are_well_formed_and_sent_consistently()  # allowed: passes
    finally:
        suite.teardown_method()
        handle.stop()


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


def test_env_server_serves_an_env_from_gym_packages_with_masks() -> None:
    server = subprocess.Popen([sys.executable, "-m", "rl_service.envserver", "--env", MASKED_ENV_ID, "--num-envs", "2",
                               "--port", "0", "--gym-packages", "tests.support.envs"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith(f"serving {MASKED_ENV_ID} (2 envs) on grpc://127.0.0.1:"), line
        check = subprocess.run([sys.executable, "-m", "rl_service.envserver.compliance", line.rsplit(" on ", 1)[1]],
                               capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        for name in MASK_CHECKS:
            assert f"PASSED   {name}" in check.stdout
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_env_server_on_a_unix_socket_and_compliance_command_lines(tmp_path: Path) -> None:
    path = tmp_path / "cartpole.sock"
    with socket.socket(socket.AF_UNIX) as stale:  # left behind by a previous run: replaced
        stale.bind(str(path))
    server = subprocess.Popen([sys.executable, "-m", "rl_service.envserver", "--env", "CartPole-v1", "--num-envs",
                               "2", "--unix", str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line == f"serving CartPole-v1 (2 envs) on unix://{path}\n", line
        check = subprocess.run([sys.executable, "-m", "rl_service.envserver.compliance", f"unix://{path}"],
                               capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.rstrip().endswith("compliant")
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
        assert not path.exists(), "the socket file is removed on exit"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_env_server_refuses_to_replace_a_file_that_is_not_a_socket(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    assert cli.main(["--env", "CartPole-v1", "--unix", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"env-server: cannot listen on unix:{path}: it exists and is not a socket; refusing to remove it\n"
    assert path.read_text() == "keep me"


@pytest.mark.parametrize("extra", [["--port", "0"], ["--host", "127.0.0.1"]])
def test_env_server_unix_excludes_host_and_port(tmp_path: Path, extra: list[str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--env", "CartPole-v1", "--unix", str(tmp_path / "sim.sock"), *extra])
    assert info.value.code == 2
    assert "--unix cannot be combined with --host or --port" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--env", "NoSuchEnv-v0"], "cannot create 'NoSuchEnv-v0'"),
    (["--env", "CartPole-v1", "--num-envs", "0"], "--num-envs must be in"),
    (["--env", "CartPole-v1", "--gym-packages", "no_such_module_xyz"],
     "env-server: --gym-packages: cannot import 'no_such_module_xyz': ModuleNotFoundError"),
    (["--env", MASKED_ENV_ID, "--gym-packages", ""], f"cannot create '{MASKED_ENV_ID}'"),  # needs tests.support.envs
])
def test_env_server_refuses_bad_arguments(argv: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "rl_service.envserver", *argv, "--port", "0"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and message in result.stderr


def test_compliance_command_reports_an_unreachable_server() -> None:
    from rl_service.envserver import compliance

    assert compliance.main(["grpc://127.0.0.1:1", "--timeout", "2"]) == 1
