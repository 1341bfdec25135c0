"""EXECUTOR=ray on a real two-node Ray cluster started by the test (`ray start --head` and `ray start --address`
on this machine, loopback only, token authentication): a lost node's run resumes on the other node from its
checkpoint, and a server killed with SIGKILL leaves no actor training. Slow: each node takes seconds to start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from rl_service_proto.v1 import training_pb2 as pb
from rl_service_proto.v1 import training_pb2_grpc as pb_grpc
from tests.conftest import FAST_PPO, start_server
from tests.support.ray_cluster import ROOT, RayTestCluster, listening_sockets, ray_env
from tests.unit.test_lifeline import alive, reaped, wait_all_dead

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayTestCluster]:
    """A head node with one CPU (and a "head" resource to pin things there); tests add nodes."""
    started = RayTestCluster(tmp_path_factory.mktemp("ray-cluster"))
    try:
        started.start_head(num_cpus=1, resources={"head": 1})
        yield started
    finally:
        started.stop()


def _actor_pids(pids: set[int]) -> set[int]:
    """Run actors among `pids` (Ray titles an actor's process ray::<class>.<method>)."""
    found = set()
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if command.startswith("ray::RunActor"):
            found.add(pid)
    return found


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


RESUMED_BUDGET = 16_384


def test_a_lost_node_s_run_resumes_on_the_head_from_its_checkpoint(
        cluster: RayTestCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node2 = cluster.add_node(num_cpus=1, resources={"node2": 1})
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    handle = start_server(tmp_path, executor="ray", ray_address=cluster.address, ray_cpus_per_run=1)
    import ray

    # The head's only CPU is taken, so the run lands on node2; released once node2 is gone.
    blocker = ray.remote(num_cpus=1, resources={"head": 1})(_Blocker).remote()
    try:
        assert ray.get(blocker.ready.remote(), timeout=60)
        # A budget the run cannot finish while the checks below run (3,072 steps once did, on a loaded machine).
        run_id = handle.start(total_timesteps=RESUMED_BUDGET, hyperparameters=FAST_PPO, checkpoint_interval=256)
        handle.wait_until(run_id, lambda s: bool(s.last_checkpoint_path) and s.timesteps_done >= 512, timeout=180)
        assert _actor_pids(node2.pids()), "the run's actor is on node2"
        loopback, beyond = listening_sockets(cluster.pids() | {os.getpid()})
        assert loopback and not beyond, beyond
        node2.kill()
        ray.kill(blocker)
        final = handle.watch_to_end(run_id, timeout=300)[-1]
        assert final.state == pb.SUCCEEDED and final.timesteps_done == RESUMED_BUDGET, final
        assert final.attempt == 2 and final.attempts[0].outcome != "SUCCEEDED", final
        assert final.attempts[1].start_timesteps >= 256, "resumed from a checkpoint, not from scratch"
        assert handle.stub.Act(pb.ActRequest(run_id=run_id, observation=[0.0] * 4), timeout=30).action
    finally:
        handle.stop()


class _Blocker:
    """Holds a CPU of the node it is placed on."""

    def ready(self) -> bool:
        return True


def test_sigkill_of_the_server_leaves_no_actor_training(cluster: RayTestCluster, tmp_path: Path) -> None:
    env = {k: v for k, v in ray_env().items() if not k.startswith(("GRPC_", "LOG_", "MAX_", "MODELS_", "GYM_"))}
    env.update({"DATA_DIR": str(tmp_path / "data"), "GRPC_HOST": "127.0.0.1", "GRPC_PORT": "0", "HTTP_PORT": "0",
                "LOG_FORMAT": "json", "EXECUTOR": "ray", "RAY_ADDRESS": cluster.address})
    server = subprocess.Popen([sys.executable, str(ROOT / "server.py")], cwd=tmp_path, env=env,
                              stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    port = 0
    for line in server.stderr:
        if '"server started"' in line:
            port = int(json.loads(line)["address"].rsplit(":", 1)[1])
            break
    assert port, "the server did not start"
    threading.Thread(target=server.stderr.read, daemon=True).start()  # keep its pipe drained
    actors: set[int] = set()
    with reaped(actors):
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.TrainingServiceStub(channel)
                run_id = stub.StartTraining(pb.StartTrainingRequest(
                    algorithm="PPO", env_id="CartPole-v1", total_timesteps=5_000_000, hyperparameters=FAST_PPO),
                    timeout=30).run_id
                _wait_for(lambda: stub.GetTrainingStatus(pb.RunRequest(run_id=run_id)).timesteps_done > 0, 180,
                          "the run to train")
            actors |= _actor_pids(cluster.pids())
            assert actors and all(alive(pid) for pid in actors)
        finally:
            os.kill(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        survivors, _ = wait_all_dead(actors, timeout=120)
        assert not survivors, f"actors still alive after the server's SIGKILL: {survivors}"
