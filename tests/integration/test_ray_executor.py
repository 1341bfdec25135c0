"""EXECUTOR=ray on a local Ray instance the server starts itself (RAY_ADDRESS unset): a real PPO run as a Ray
actor, Act, history and export as under the local executor, StopTraining, the shared-storage check, the local
instance on loopback only, and stopped with the server. The two-node cluster tests are in test_ray_cluster.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rl_service.infra.shared_storage import MARKER_FILE
from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import FAST_PPO, ServerHandle, start_server
from tests.support.ray_cluster import listening_sockets
from tests.unit.test_lifeline import descendants, reaped, wait_all_dead


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """One EXECUTOR=ray server (its own local Ray instance) for the module; the last test stops it."""
    handle = start_server(tmp_path_factory.mktemp("ray-server"), executor="ray", ray_cpus_per_run=1)
    yield handle
    handle.stop()


def test_a_ppo_run_trains_as_an_actor_and_act_history_export_answer(ray_server: ServerHandle) -> None:
    run_id = ray_server.start(total_timesteps=1024, hyperparameters=FAST_PPO, checkpoint_interval=512)
    statuses = ray_server.watch_to_end(run_id)
    final = statuses[-1]
    assert final.state == pb.SUCCEEDED and final.timesteps_done == 1024 and not final.error, final
    assert any(s.state == pb.RUNNING and s.timesteps_done > 0 for s in statuses), "progress came back"
    assert Path(final.model_path).is_file() and Path(final.last_checkpoint_path).is_file()
    act = ray_server.stub.Act(pb.ActRequest(run_id=run_id, observation=[0.0] * 4), timeout=30)
    assert len(act.action) == 1 and act.action[0] in (0.0, 1.0) and act.model_timesteps == 1024
    history = ray_server.stub.GetRunHistory(pb.RunHistoryRequest(run_id=run_id), timeout=30)
    assert history.total_episodes == len(history.episodes) > 0
    exported = ray_server.stub.ExportModel(pb.ExportModelRequest(run_id=run_id, format="torchscript"), timeout=60)
    assert exported.model_timesteps == 1024 and exported.data


def test_stop_training_reaches_the_actor_which_checkpoints_and_stops(ray_server: ServerHandle) -> None:
    run_id = ray_server.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO, checkpoint_interval=256)
    ray_server.wait_until(run_id, lambda s: s.timesteps_done >= 300, timeout=120)
    stopped = ray_server.stub.StopTraining(pb.RunRequest(run_id=run_id), timeout=60)
    assert stopped.state == pb.CANCELLED and stopped.stop_requested, stopped
    assert 0 < stopped.timesteps_done < 5_000_000
    checkpoint = Path(stopped.last_checkpoint_path)
    assert checkpoint.name == f"checkpoint_{stopped.timesteps_done}_steps.zip" and checkpoint.is_file()
    assert run_id not in ray_server.running.orchestrator._executor.active()


def test_a_node_that_does_not_see_the_data_dir_fails_the_run_naming_it(ray_server: ServerHandle) -> None:
    # What a node without the shared filesystem sees: no marker, or another server's. Swapped here, restored after.
    marker = ray_server.settings.data_dir / MARKER_FILE
    token = marker.read_text()
    marker.write_text("0" * 32 + "\n")
    try:
        run_id = ray_server.start(total_timesteps=1024, hyperparameters=FAST_PPO)
        final = ray_server.watch_to_end(run_id)[-1]
    finally:
        marker.write_text(token)
    assert final.state == pb.FAILED and final.attempt == 1, final
    assert f"DATA_DIR {ray_server.settings.data_dir.resolve()}" in final.error
    assert "shared by every node" in final.error and final.timesteps_done == 0


def test_the_local_ray_instance_listens_on_loopback_only(ray_server: ServerHandle) -> None:
    ours = descendants(os.getpid()) | {os.getpid()}
    loopback, beyond = listening_sockets(ours)
    assert not beyond, f"listening beyond loopback: {beyond}"
    assert any("gcs_server" in line for line in loopback), loopback
    assert any("raylet" in line for line in loopback), loopback


def test_stopping_the_server_stops_the_ray_instance_it_started(ray_server: ServerHandle) -> None:
    ray_processes = {pid for pid in descendants(os.getpid()) if _is_ray(pid)}
    assert ray_processes, "the local instance's processes are the server's children"
    with reaped(ray_processes):
        ray_server.stop()
        survivors, _ = wait_all_dead(ray_processes, timeout=60)
        assert not survivors, survivors


def _is_ray(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    # Ray's binaries and scripts live in its package; its workers and agents are titled ray::<what>.
    return command.startswith("ray::") or "site-packages/ray/" in command
