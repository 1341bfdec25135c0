"""server.py and healthcheck.py as real processes: configuration errors, flags, health probe, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from rl_service_proto.v1 import training_pb2 as pb
from rl_service_proto.v1 import training_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPC_", "LOG_", "MAX_", "MODELS_", "GYM_"))}
    env.update({"DATA_DIR": str(tmp_path / "data"), "GRPC_HOST": "127.0.0.1", "GRPC_PORT": "0"})
    env.update(extra)
    return env


@pytest.mark.parametrize(("variable", "value"), [
    ("MAX_CONCURRENT_RUNS", "abc"),
    ("LOG_FORMAT", "xml"),
    ("GRPC_PORT", "70000"),
    ("KEEP_CHECKPOINTS", "0"),
    ("WORKER_START_METHOD", "threads"),
    ("EXTERNAL_ENV_SOCKET_DIR", "/dev/null"),
    ("GYM_PACKAGES", "no_such_module_xyz"),
    ("GYM_PACKAGES", "os;rm"),
])
def test_invalid_configuration_exits_nonzero_naming_the_variable(tmp_path: Path, variable: str, value: str) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "server.py")], cwd=tmp_path,
                            env=_env(tmp_path, **{variable: value}), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], result.stderr
    assert not (tmp_path / "data").exists(), "nothing is created before the configuration is valid"


def test_dotenv_file_is_read_and_flags_override_it(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MAX_QUEUED_RUNS=-3\n")
    bad = subprocess.run([sys.executable, str(ROOT / "server.py")], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "MAX_QUEUED_RUNS" in bad.stderr
    # A flag wins over the environment: LOG_FORMAT=xml is invalid, --log-format json is not.
    (tmp_path / ".env").write_text("")
    server = _start(tmp_path, ["--log-format", "json"], LOG_FORMAT="xml")
    _terminate(server)


def _start(tmp_path: Path, args: list[str], **env: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), *args], cwd=tmp_path,
                               env=_env(tmp_path, LOG_FORMAT=env.pop("LOG_FORMAT", "json"), **env),
                               stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        if '"server started"' in line:
            event = json.loads(line)
            return process, int(event["address"].rsplit(":", 1)[1])
    process.kill()
    raise AssertionError("server did not log 'server started'")


def _terminate(started: tuple[subprocess.Popen[str], int]) -> int:
    process, _ = started
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()


def _healthcheck(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "healthcheck.py"), "--address", f"127.0.0.1:{port}",
                           "--timeout", "3", *extra], capture_output=True, text=True, timeout=60)


def test_sigterm_checkpoints_runs_and_exits_zero_and_healthcheck_follows(tmp_path: Path) -> None:
    started = _start(tmp_path, [])
    process, port = started
    try:
        ok = _healthcheck(port)
        assert ok.returncode == 0 and "SERVING" in ok.stdout
        service = _healthcheck(port, "--service", "rl_service.v1.TrainingService")
        assert service.returncode == 0
        unknown = _healthcheck(port, "--service", "no.such.Service")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            # The suite's own environments exist only where GYM_PACKAGES names them, never on a default server.
            with pytest.raises(grpc.RpcError) as refused:
                stub.StartTraining(pb.StartTrainingRequest(algorithm="PPO", env_id="rl_service/CrashAfter-v0",
                                                           total_timesteps=1000))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "'rl_service/CrashAfter-v0' is not a registered Gymnasium environment" in refused.value.details()
            run_id = stub.StartTraining(pb.StartTrainingRequest(
                algorithm="PPO", env_id="CartPole-v1", total_timesteps=5_000_000, checkpoint_interval=100_000,
                hyperparameters={"n_steps": "128", "batch_size": "64", "n_epochs": "2"})).run_id
            deadline = time.monotonic() + 60
            while stub.GetTrainingStatus(pb.RunRequest(run_id=run_id)).timesteps_done < 500:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert _terminate(started) == 0
    finally:
        if process.poll() is None:
            process.kill()
    down = _healthcheck(port)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stdout
    # The run checkpointed on the way down, before its first periodic checkpoint was due.
    checkpoints = list((tmp_path / "data" / "checkpoints" / run_id).glob("checkpoint_*_steps.zip"))
    assert len(checkpoints) == 1
    metadata = json.loads((tmp_path / "data" / "models" / run_id / "metadata.json").read_text())
    assert metadata["training"] == "stopped early" and metadata["timesteps_done"] >= 500


def test_healthcheck_exits_one_when_nothing_listens() -> None:
    result = _healthcheck(1)
    assert result.returncode == 1 and "127.0.0.1:1" in result.stdout
