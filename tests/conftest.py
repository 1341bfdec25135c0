"""Shared fixtures: a real server on 127.0.0.1 port 0 with its data in a temp directory, stopped by the test."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rl_service.infra.logging_setup import configure_logging
from rl_service.infra.settings import Settings
from rl_service.transport.server_factory import RunningServer, build_server
from rl_service_proto.v1 import training_pb2 as pb
from rl_service_proto.v1 import training_pb2_grpc as pb_grpc

TEST_GYM_PACKAGES = "tests.support.envs"
# Small enough to train in a second or two on one core, large enough to checkpoint and finish episodes.
FAST_PPO = {"n_steps": "128", "batch_size": "64", "n_epochs": "2"}


@dataclass
class ServerHandle:
    """A running server and clients connected to it."""

    running: RunningServer
    channel: grpc.Channel
    stub: pb_grpc.TrainingServiceStub
    health: health_pb2_grpc.HealthStub
    settings: Settings

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def stop(self) -> None:
        self.channel.close()
        self.running.stop(grace=10)

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def start(self, algorithm: str = "PPO", env_id: str = "CartPole-v1", total_timesteps: int = 1024,
              **kwargs: Any) -> str:
        request = pb.StartTrainingRequest(algorithm=algorithm, env_id=env_id, total_timesteps=total_timesteps,
                                          **kwargs)
        return self.stub.StartTraining(request, timeout=30).run_id

    def status(self, run_id: str) -> pb.TrainingStatus:
        return self.stub.GetTrainingStatus(pb.RunRequest(run_id=run_id), timeout=10)

    def watch_to_end(self, run_id: str, timeout: float = 120) -> list[pb.TrainingStatus]:
        return list(self.stub.WatchTraining(pb.RunRequest(run_id=run_id), timeout=timeout))

    def wait_until(self, run_id: str, predicate: Callable[[pb.TrainingStatus], bool],
                   timeout: float = 60) -> pb.TrainingStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(run_id)
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting on {run_id}; last status: {status}")
            time.sleep(0.05)


def make_settings(root: Path, **overrides: Any) -> Settings:
    """Settings for a test server: port 0 on loopback, every directory under `root`, quick progress reports."""
    values: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "data_dir": root / "data",
        "models_dir": root / "models",
        "checkpoint_dir": root / "checkpoints",
        "progress_interval_seconds": 0.2,
        "shutdown_grace_seconds": 20,
        "stop_timeout_seconds": 30,
        "log_format": "console",
        "log_level": "WARNING",
        # The suite's own environments (rl_service/CrashAfter-v0): registered by the server and its workers.
        "gym_packages": TEST_GYM_PACKAGES,
        # No HTTP API unless a test asks for it (http_enabled=True): fewer servers; and then port 0, never 8080.
        "http_enabled": False,
        "http_port": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def start_server(root: Path, **overrides: Any) -> ServerHandle:
    """Build and start a server, connect, and wait for the channel to be ready."""
    settings = make_settings(root, **overrides)
    configure_logging(settings.log_level, settings.log_format)
    running = build_server(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    grpc.channel_ready_future(channel).result(timeout=10)
    return ServerHandle(running, channel, pb_grpc.TrainingServiceStub(channel),
                        health_pb2_grpc.HealthStub(channel), settings)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """One server shared by a test module (runs are independent; each test uses its own runs)."""
    handle = start_server(tmp_path_factory.mktemp("server"))
    yield handle
    handle.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerHandle]]:
    """Start servers with custom settings; all are stopped at the end of the test."""
    started: list[ServerHandle] = []

    def factory(root: Path | None = None, **overrides: Any) -> ServerHandle:
        handle = start_server(root or tmp_path, **overrides)
        started.append(handle)
        return handle

    yield factory
    for handle in reversed(started):
        handle.stop()


def files_under(*roots: Path) -> set[Path]:
    """Every file and directory below the roots (to prove a refused request wrote nothing)."""
    found: set[Path] = set()
    for root in roots:
        if root.exists():
            found.update(root.rglob("*"))
    return found
