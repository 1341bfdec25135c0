"""examples/node-simulation (a CartPole simulation in Node.js, written from docs/environment-protocol.md alone)
passes the compliance suite and trains PPO through a real training service.

Needs `node` on PATH and `npm ci` run in examples/node-simulation; skipped otherwise."""

from __future__ import annotations

import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from rl_service.envserver.compliance import EnvironmentServiceCompliance
from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import FAST_PPO, ServerHandle

ROOT = Path(__file__).resolve().parents[2]
SIM_DIR = ROOT / "examples" / "node-simulation"
NUM_ENVS = 4
ACTION_SPACE = gym.spaces.Discrete(2)


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH (examples/node-simulation needs Node.js >= 18)"
    if not (SIM_DIR / "node_modules").is_dir():
        return f"{SIM_DIR / 'node_modules'} is missing: run `npm ci` in examples/node-simulation"
    return None


@pytest.fixture(autouse=True, scope="module")
def _needs_node() -> None:
    reason = _missing()
    if reason:
        pytest.skip(reason)


class NodeSimulation:
    """`node server.js --port 0`, its address read from its first stdout line."""

    def __init__(self, num_envs: int = NUM_ENVS, *extra: str) -> None:
        node = shutil.which("node")
        assert node is not None
        self.process = subprocess.Popen([node, "server.js", "--port", "0", "--num-envs", str(num_envs), *extra],
                                        cwd=SIM_DIR, stdout=subprocess.PIPE, text=True)
        try:
            assert self.process.stdout is not None
            ready, _, _ = select.select([self.process.stdout], [], [], 15)
            line = self.process.stdout.readline() if ready else ""
            assert line.startswith(f"serving CartPole-v1 ({num_envs} envs) on grpc://127.0.0.1:"), (
                f"unexpected first line {line!r} (exit code {self.process.poll()})")
            self.address = line.rsplit(" on ", 1)[1].strip()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


@pytest.fixture
def node_sim() -> Iterator[NodeSimulation]:
    sim = NodeSimulation()
    try:
        yield sim
    finally:
        sim.stop()


def test_compliance_command_line_passes(node_sim: NodeSimulation) -> None:
    check = subprocess.run([sys.executable, "-m", "rl_service.envserver.compliance", node_sim.address],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.rstrip().endswith("compliant")
    assert node_sim.stop() == 0, "SIGTERM stops the simulation with exit code 0"


class TestNodeSimulationCompliance(EnvironmentServiceCompliance):
    """The same checks in pytest, plus the start-up one the command line cannot run (Step before any Reset)."""

    __test__ = True
    sims: list[NodeSimulation]

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _serve(cls, _needs_node: None) -> Iterator[None]:
        cls.sims = []
        try:
            cls.address = cls._start()
            yield
        finally:
            for sim in cls.sims:
                sim.stop()

    @classmethod
    def _start(cls) -> str:
        cls.sims.append(NodeSimulation())
        return cls.sims[-1].address

    def fresh_address(self) -> str | None:
        return self._start()


def test_ppo_trains_through_the_node_simulation(node_sim: NodeSimulation,
                                                server_factory: Callable[..., ServerHandle]) -> None:
    training = server_factory()
    started = time.monotonic()
    run_id = training.start("PPO", env_id=node_sim.address, total_timesteps=2048, seed=7,
                            checkpoint_interval=1024, hyperparameters=FAST_PPO)
    final = training.watch_to_end(run_id, timeout=120)[-1]
    assert final.state == pb.SUCCEEDED, final.error
    assert final.env_id == node_sim.address
    assert final.hyperparameters["n_envs"] == str(NUM_ENVS), "the run's n_envs is the simulation's num_envs"
    assert final.timesteps_done >= 2048 and final.metrics.episodes_completed > 0
    assert final.metrics.mean_episode_length > 0 and Path(final.model_path).is_file()
    assert time.monotonic() - started < 60


def test_step_cost_spends_at_least_the_cost_per_env_and_leaves_the_answers_as_they_were() -> None:
    import grpc

    from rl_service.infra.external_env.codec import encode_batch
    from rl_service_proto.v1 import environment_pb2 as env_pb
    from rl_service_proto.v1 import environment_pb2_grpc as env_grpc

    def steps(sim: NodeSimulation) -> tuple[list[env_pb.StepResponse], list[float]]:
        channel = grpc.insecure_channel(sim.address.replace("grpc://", ""))
        try:
            stub = env_grpc.EnvironmentServiceStub(channel)
            stub.Reset(env_pb.ResetRequest(seed=5), timeout=10)
            answers, seconds = [], []
            for _ in range(3):
                request = env_pb.StepRequest(actions=encode_batch(np.ones(NUM_ENVS, dtype=np.int64), ACTION_SPACE))
                started = time.perf_counter()
                answers.append(stub.Step(request, timeout=10))
                seconds.append(time.perf_counter() - started)
            return answers, seconds
        finally:
            channel.close()

    plain, costly = NodeSimulation(), NodeSimulation(NUM_ENVS, "--step-cost-us", "2000")
    try:
        expected, _ = steps(plain)
        got, seconds = steps(costly)
    finally:
        plain.stop()
        costly.stop()
    assert got == expected
    # A lower bound: busy waiting cannot finish early (2 ms for each of the 4 envs).
    assert min(seconds) >= 0.008, seconds


@pytest.mark.parametrize("value", ["x", "-1", "1000001"])
def test_a_bad_step_cost_is_refused_with_its_usage(value: str) -> None:
    node = shutil.which("node")
    assert node is not None
    done = subprocess.run([node, "server.js", "--step-cost-us", value], cwd=SIM_DIR, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert f"--step-cost-us: expected a number in 0..1000000, got '{value}'" in done.stderr
