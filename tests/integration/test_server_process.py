"""server.py and healthcheck.py as real processes: configuration errors, flags, health probe, SIGTERM, and a
server's processes living and dying together (SIGKILL, a second server on the same DATA_DIR, crash leftovers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from rl_service_proto.v1 import training_pb2 as pb
from rl_service_proto.v1 import training_pb2_grpc as pb_grpc
from tests.unit.test_lifeline import alive, descendants, reaped, wait_all_dead

ROOT = Path(__file__).resolve().parents[2]
FAST_PPO = {"n_steps": "128", "batch_size": "64", "n_epochs": "2"}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPC_", "LOG_", "MAX_", "MODELS_", "GYM_"))}
    env.update({"DATA_DIR": str(tmp_path / "data"), "GRPC_HOST": "127.0.0.1", "GRPC_PORT": "0", "HTTP_PORT": "0"})
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


def _start(tmp_path: Path, args: list[str], log: list[str] | None = None,
           **env: str) -> tuple[subprocess.Popen[str], int]:
    """server.py started and listening; its stderr lines go to `log`, read on so that a full pipe never blocks it."""
    process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), *args], cwd=tmp_path,
                               env=_env(tmp_path, LOG_FORMAT=env.pop("LOG_FORMAT", "json"), **env),
                               stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    lines = [] if log is None else log
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if '"server started"' in line:
            threading.Thread(target=lines.extend, args=(process.stderr,), daemon=True).start()
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


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below `root` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _train_until(port: int, timesteps: int, count: int = 1, **request: object) -> list[str]:
    """Start `count` long PPO CartPole runs and wait until each has trained `timesteps`."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TrainingServiceStub(channel)
        run_ids = [stub.StartTraining(pb.StartTrainingRequest(
            algorithm="PPO", env_id="CartPole-v1", total_timesteps=5_000_000, hyperparameters=FAST_PPO,
            **request)).run_id for _ in range(count)]
        deadline = time.monotonic() + 120
        for run_id in run_ids:
            while stub.GetTrainingStatus(pb.RunRequest(run_id=run_id)).timesteps_done < timesteps:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    return run_ids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the server's processes in /proc")
def test_sigkill_of_the_server_alone_ends_its_workers_and_nothing_writes_after(tmp_path: Path) -> None:
    process, port = _start(tmp_path, [], KEEP_CHECKPOINTS="2")
    family: set[int] = set()
    with reaped(family):
        # Checkpoints every 128 timesteps, so a worker that trained on would change the directory at once.
        (run_id,) = _train_until(port, 600, checkpoint_interval=128)
        family |= descendants(process.pid)  # the fork server, the worker, multiprocessing's resource tracker
        assert len(family) >= 3, family
        os.kill(process.pid, signal.SIGKILL)  # the server alone, not its process group
        process.wait()
        data = tmp_path / "data"
        survivors, seconds = wait_all_dead(family, timeout=10)
        assert not survivors, f"alive {seconds:.2f}s after the server's SIGKILL: {survivors}"
        # The worker dies a few milliseconds after its server (the kernel signals it once the fork server is
        # gone), so a write it had begun may leave a temp file; after that, nothing of it writes again.
        before = _snapshot(data)
        time.sleep(1)
        assert _snapshot(data) == before, "a file changed after the server's processes were gone"
        assert any(name.startswith(f"checkpoints/{run_id}/checkpoint_") for name in before)
    newest = max(int(name.split("_")[1]) for name in before if name.startswith(f"checkpoints/{run_id}/checkpoint_"))
    # A plain restart resumes the run once, from the newest checkpoint the killed worker left.
    restarted = _start(tmp_path, [], KEEP_CHECKPOINTS="2")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{restarted[1]}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            deadline = time.monotonic() + 60
            while (status := stub.GetTrainingStatus(pb.RunRequest(run_id=run_id))).timesteps_done <= newest:
                assert time.monotonic() < deadline, status
                time.sleep(0.1)
            time.sleep(1)
            status = stub.GetTrainingStatus(pb.RunRequest(run_id=run_id))
            assert status.state == pb.RUNNING and status.attempt == 2, status
            assert [a.outcome for a in status.attempts] == ["server died", ""]
            assert status.attempts[1].start_timesteps == newest
            act = stub.Act(pb.ActRequest(run_id=run_id, observation=[0.0] * 4), timeout=30)
            assert act.model_timesteps >= newest
    finally:
        assert _terminate(restarted) == 0


def test_a_second_server_on_the_same_data_dir_refuses_and_a_restart_clears_temp_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    temps = [data / ".runs.sqlite3.abcd1234.tmp",
             data / "checkpoints" / "run-x" / ".checkpoint_9_steps.zip.a1b2c3d4.tmp",
             data / "models" / "run-x" / ".model.zip.zz_zz_zz.tmp",
             data / "policies" / "p" / ".state.safetensors.k2j3h4g5.tmp"]
    outside = tmp_path / "elsewhere" / ".model.zip.abcd1234.tmp"
    first = _start(tmp_path, [])
    try:
        for path in [*temps, outside]:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half a file")
        started = time.monotonic()
        second = subprocess.run([sys.executable, str(ROOT / "server.py")], cwd=tmp_path, env=_env(tmp_path),
                                capture_output=True, text=True, timeout=60)
        waited = time.monotonic() - started
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        error = json.loads(lines[0])
        assert error["event"] == "cannot start", error
        assert f"DATA_DIR {data} is in use by another server (pid {first[0].pid})" in error["error"]
        assert waited < 30
        assert all(path.exists() for path in temps), "a refused server touches nothing"
    finally:
        assert _terminate(first) == 0
    log: list[str] = []
    third = _start(tmp_path, [], log=log)
    try:
        removed = [json.loads(line) for line in log if "removed temp files" in line]
        assert [event["count"] for event in removed] == [len(temps)]
        assert not any(path.exists() for path in temps) and outside.exists()
    finally:
        assert _terminate(third) == 0


def test_sigterm_under_load_ends_within_the_grace_period_plus_the_overrun(tmp_path: Path) -> None:
    from rl_service.transport.server_factory import SHUTDOWN_OVERRUN_SECONDS

    grace = 2.0
    process, port = _start(tmp_path, [], SHUTDOWN_GRACE_SECONDS=str(grace), MAX_CONCURRENT_RUNS="2")
    _train_until(port, 300, count=2)
    stop = threading.Event()

    def hammer() -> None:  # RPCs in flight while the server stops
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.ListRuns(pb.ListRunsRequest(), timeout=5)
                except grpc.RpcError:
                    time.sleep(0.05)

    with ThreadPoolExecutor(8) as clients:
        for _ in range(8):
            clients.submit(hammer)
        time.sleep(0.5)
        started = time.monotonic()
        code = _terminate((process, port))
        seconds = time.monotonic() - started
        stop.set()
    assert code == 0
    assert seconds < grace + SHUTDOWN_OVERRUN_SECONDS, f"SIGTERM took {seconds:.1f}s"
    assert not alive(process.pid)
