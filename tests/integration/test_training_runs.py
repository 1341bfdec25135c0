"""Managed runs end to end over real gRPC: train, watch, act, list, stop, crash, queue, restart."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from stable_baselines3 import PPO

from rl_service.core.algorithms.registry import ALGORITHMS, get_algorithm
from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import FAST_PPO, ServerHandle
from tests.support.envs import CRASH_ENV_ID, MASKED_ENV_ID

# Per registry entry: a budget that finishes in a few seconds and still completes episodes and checkpoints.
QUICK_RUNS = {
    "PPO": (1024, FAST_PPO),
    "A2C": (1000, {"n_envs": "2"}),
    "DQN": (1500, {"learning_starts": "200", "target_update_interval": "500"}),
    "REINFORCE": (1000, {"n_envs": "2", "episodes_per_update": "2"}),
    "QRDQN": (1000, {"learning_starts": "200", "target_update_interval": "500",
                "n_quantiles": "10"}),
    "TRPO": (1024, {"n_steps": "256", "batch_size": "64", "n_critic_updates": "2"}),
    "MaskablePPO": (1024, FAST_PPO),
    # Continuous control on Pendulum-v1 (200-step episodes): small networks and batches keep them quick.
    "SAC": (1000, {"learning_starts": "100", "batch_size": "64", "net_arch": "64,64", "buffer_size": "2000"}),
    "TQC": (1000, {"learning_starts": "100", "batch_size": "64", "net_arch": "64,64", "buffer_size": "2000",
                   "n_quantiles": "5", "n_critics": "3", "top_quantiles_to_drop_per_net": "1"}),
    "TD3": (1000, {"learning_starts": "100", "batch_size": "64", "net_arch": "64,64", "buffer_size": "2000",
                   "action_noise": "normal"}),
    "DDPG": (1000, {"learning_starts": "100", "batch_size": "64", "net_arch": "64,64", "buffer_size": "2000",
                    "action_noise": "normal"}),
}
ENVS = {"SAC": "Pendulum-v1", "TQC": "Pendulum-v1", "TD3": "Pendulum-v1", "DDPG": "Pendulum-v1",
        "MaskablePPO": MASKED_ENV_ID}


def test_every_registered_algorithm_has_a_quick_run() -> None:
    assert {spec.name for spec in ALGORITHMS.values()} == set(QUICK_RUNS)


@pytest.mark.parametrize("algorithm", sorted(QUICK_RUNS))
def test_run_is_watched_to_success_and_act_matches_saved_model(server: ServerHandle, algorithm: str) -> None:
    timesteps, hyperparameters = QUICK_RUNS[algorithm]
    env_id = ENVS.get(algorithm, "CartPole-v1")
    run_id = server.start(algorithm.lower(), env_id=env_id, total_timesteps=timesteps, seed=7,
                          checkpoint_interval=400, hyperparameters=hyperparameters,
                          experiment_id=f"quick-{algorithm}")
    statuses = server.watch_to_end(run_id)

    assert statuses[0].run_id == run_id
    assert statuses[0].state in (pb.PENDING, pb.RUNNING)
    progress = [s.timesteps_done for s in statuses]
    assert progress == sorted(progress), "timesteps never go backwards"
    final = statuses[-1]
    assert final.state == pb.SUCCEEDED and final.is_done and not final.error
    assert all(not s.is_done for s in statuses[:-1])
    assert final.algorithm == algorithm and final.env_id == env_id and final.seed == 7
    assert final.timesteps_done >= timesteps and final.total_timesteps == timesteps
    assert final.metrics.episodes_completed > 0
    assert (final.metrics.mean_episode_reward > 0) == (env_id != "Pendulum-v1")  # Pendulum's rewards are costs
    assert final.metrics.mean_episode_length > 0 and final.metrics.steps_per_second > 0
    assert final.metrics.losses, "the latest train/* values are reported"
    assert final.hyperparameters["learning_rate"], "effective hyperparameters include defaults"

    model_path = Path(final.model_path)
    run_dir = model_path.parent
    assert model_path == Path(server.settings.models_root).resolve() / run_id / "model.zip"
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["algorithm"] == algorithm.upper() and metadata["seed"] == 7 and metadata["training"] == "completed"
    assert metadata["timesteps_done"] == final.timesteps_done
    assert {"torch", "stable_baselines3", "gymnasium"} <= set(metadata["versions"])
    history = json.loads((run_dir / "history.json").read_text())["episodes"]
    assert len(history) == final.metrics.episodes_completed
    assert {"reward", "length", "time", "timesteps"} <= set(history[0])
    checkpoints = sorted(Path(server.settings.checkpoint_root).resolve().glob(f"{run_id}/checkpoint_*_steps.zip"))
    assert checkpoints and Path(final.last_checkpoint_path) in checkpoints
    assert len(checkpoints) <= server.settings.keep_checkpoints

    # The zip is stable-baselines3's own format, and Act answers with the same deterministic policy.
    model = get_algorithm(algorithm).cls.load(model_path, device="cpu")
    rng = np.random.default_rng(0)
    size = model.observation_space.shape[0]
    observations = rng.uniform(-0.2, 0.2, size=(16, size)).astype(np.float32)
    if env_id == MASKED_ENV_ID:  # flags: two legal actions, the better one of them marked
        observations = np.zeros((16, size), dtype=np.float32)
        observations[:, [1, 5, 8 + 5]] = 1.0
    expected, _ = model.predict(observations, deterministic=True)
    # Box actions come out of float32 arithmetic, whose last bits differ between one observation and a batch.
    same = (lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)) \
        if env_id == "Pendulum-v1" else (lambda got, want: np.testing.assert_array_equal(got, want))
    for obs, want in zip(observations, expected, strict=True):
        reply = server.stub.Act(pb.ActRequest(run_id=run_id, observation=obs.tolist(), deterministic=True))
        same(list(reply.action), [float(v) for v in np.ravel(want)])
        assert reply.model_timesteps == final.timesteps_done
    batch = server.stub.ActBatch(pb.ActBatchRequest(run_id=run_id, observations=observations.ravel().tolist(),
                                                    deterministic=True))
    assert batch.count == 16 and batch.action_size == 1
    same(list(batch.actions), [float(a) for a in np.ravel(expected)])
    sampled = server.stub.Act(pb.ActRequest(run_id=run_id, observation=observations[0].tolist(),
                                            deterministic=False))
    if env_id == "Pendulum-v1":
        assert len(sampled.action) == 1 and -2.0 <= sampled.action[0] <= 2.0
    else:
        assert sampled.action[0] in range(model.action_space.n)


def test_list_runs_filters_by_experiment_and_state(server: ServerHandle) -> None:
    first = server.start(total_timesteps=256, hyperparameters=FAST_PPO, experiment_id="listing")
    second = server.start(total_timesteps=256, hyperparameters=FAST_PPO, experiment_id="listing")
    other = server.start(total_timesteps=256, hyperparameters=FAST_PPO, experiment_id="elsewhere")
    for run_id in (first, second, other):
        server.watch_to_end(run_id)

    listed = server.stub.ListRuns(pb.ListRunsRequest(experiment_id="listing")).runs
    assert [r.run_id for r in listed] == [second, first], "newest first, only that experiment"
    succeeded = server.stub.ListRuns(pb.ListRunsRequest(experiment_id="listing", state=pb.SUCCEEDED)).runs
    assert {r.run_id for r in succeeded} == {first, second}
    assert not server.stub.ListRuns(pb.ListRunsRequest(experiment_id="listing", state=pb.FAILED)).runs
    everything = {r.run_id for r in server.stub.ListRuns(pb.ListRunsRequest()).runs}
    assert {first, second, other} <= everything


def test_stop_training_mid_run_saves_checkpoint_and_cancels(server: ServerHandle) -> None:
    run_id = server.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO, checkpoint_interval=1000)
    server.wait_until(run_id, lambda s: s.timesteps_done >= 1500)
    # Status, Watch and Act stay responsive while the run trains.
    assert next(iter(server.stub.WatchTraining(pb.RunRequest(run_id=run_id), timeout=10))).state == pb.RUNNING
    server.wait_until(run_id, lambda s: bool(s.last_checkpoint_path))
    assert server.stub.Act(pb.ActRequest(run_id=run_id, observation=[0.0] * 4), timeout=10).action

    stopped = server.stub.StopTraining(pb.RunRequest(run_id=run_id), timeout=60)
    assert stopped.state == pb.CANCELLED and stopped.is_done and stopped.stop_requested
    assert 0 < stopped.timesteps_done < 5_000_000
    assert Path(stopped.model_path).is_file()
    final_checkpoint = Path(stopped.last_checkpoint_path)
    assert final_checkpoint.name == f"checkpoint_{stopped.timesteps_done}_steps.zip" and final_checkpoint.is_file()
    PPO.load(stopped.model_path, device="cpu")

    again = server.stub.StopTraining(pb.RunRequest(run_id=run_id), timeout=10)
    assert again == stopped, "stopping a finished run returns its status unchanged"


def test_crashing_run_fails_keeps_checkpoints_and_server_survives(server: ServerHandle) -> None:
    run_id = server.start(env_id=CRASH_ENV_ID, total_timesteps=10_000, checkpoint_interval=100,
                          hyperparameters={"n_steps": "64", "batch_size": "32", "n_epochs": "1"})
    final = server.watch_to_end(run_id)[-1]
    assert final.state == pb.FAILED and final.is_done
    assert "RuntimeError" in final.error and "deliberate crash" in final.error
    assert not final.model_path
    kept = sorted(Path(server.settings.checkpoint_root).resolve().glob(f"{run_id}/checkpoint_*_steps.zip"))
    assert kept, "checkpoints written before the crash are kept"
    assert final.last_checkpoint_path == str(kept[-1])
    assert server.health_status() == health_pb2.HealthCheckResponse.SERVING
    # The last good checkpoint still answers.
    assert server.stub.Act(pb.ActRequest(run_id=run_id, observation=[0.1, 0.0])).model_timesteps > 0


def test_a_killed_worker_resumes_from_its_checkpoint_until_the_attempt_cap(server_factory) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal

    handle: ServerHandle = server_factory(max_run_attempts=2)
    run_id = handle.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO, checkpoint_interval=300)
    first = handle.wait_until(run_id, lambda s: s.timesteps_done >= 400)
    checkpoint = int(Path(first.last_checkpoint_path).name.split("_")[1])
    os.kill(_worker_processes(run_id)[0].pid, signal.SIGKILL)
    again = handle.wait_until(run_id, lambda s: s.attempt == 2 and s.state == pb.RUNNING and s.timesteps_done > 0)
    assert again.attempts[0].outcome == "worker died" and "exited with code -9" in again.attempts[0].error
    handle.wait_until(run_id, lambda s: len(s.attempts) == 2)
    assert handle.status(run_id).attempts[1].start_timesteps == checkpoint, "it resumed from the checkpoint"
    os.kill(_worker_processes(run_id)[0].pid, signal.SIGKILL)
    final = handle.wait_until(run_id, lambda s: s.is_done, timeout=30)
    assert final.state == pb.FAILED and "exited with code -9" in final.error
    assert "has died 2 times (MAX_RUN_ATTEMPTS=2)" in final.error
    assert handle.health_status() == health_pb2.HealthCheckResponse.SERVING


def _worker_processes(run_id: str) -> list:
    import multiprocessing

    return [p for p in multiprocessing.active_children() if p.name == f"rl-run-{run_id}"]


def test_queue_cap_gives_resource_exhausted(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle: ServerHandle = server_factory(max_concurrent_runs=1, max_queued_runs=1)
    running = handle.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO)
    queued = handle.start(total_timesteps=1000, hyperparameters=FAST_PPO)
    assert handle.status(running).state == pb.RUNNING
    assert handle.status(queued).state == pb.PENDING
    before = len(handle.stub.ListRuns(pb.ListRunsRequest()).runs)
    with pytest.raises(grpc.RpcError) as info:
        handle.start(total_timesteps=1000, hyperparameters=FAST_PPO)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "MAX_QUEUED_RUNS" in info.value.details()
    assert len(handle.stub.ListRuns(pb.ListRunsRequest()).runs) == before

    cancelled = handle.stub.StopTraining(pb.RunRequest(run_id=queued))
    assert cancelled.state == pb.CANCELLED and cancelled.started_at == 0
    # A freed queue slot accepts a run again; stopping the running one lets it start.
    third = handle.start(total_timesteps=512, hyperparameters=FAST_PPO)
    assert handle.status(third).state == pb.PENDING
    handle.stub.StopTraining(pb.RunRequest(run_id=running), timeout=60)
    assert handle.watch_to_end(third)[-1].state == pb.SUCCEEDED


def test_shutdown_interrupts_runs_and_restart_keeps_history(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = server_factory(tmp_path, max_concurrent_runs=1)
    done = first.start(total_timesteps=256, hyperparameters=FAST_PPO)
    first.watch_to_end(done)
    long_run = first.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO, checkpoint_interval=500)
    waiting = first.start(total_timesteps=1000, hyperparameters=FAST_PPO)
    first.wait_until(long_run, lambda s: s.timesteps_done >= 600)

    seen_states: list[int] = []
    import threading

    stopper = threading.Thread(target=first.running.stop)
    stopper.start()
    deadline = time.monotonic() + 20
    while stopper.is_alive() and time.monotonic() < deadline:
        try:
            seen_states.append(first.health_status())
        except grpc.RpcError:
            break
        time.sleep(0.02)
    stopper.join(timeout=60)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen_states
    assert health_pb2.HealthCheckResponse.SERVING not in seen_states[1:]

    second = server_factory(tmp_path, auto_resume=False)
    assert second.health_status() == health_pb2.HealthCheckResponse.SERVING
    assert second.status(done).state == pb.SUCCEEDED
    interrupted = second.status(long_run)
    assert interrupted.state == pb.INTERRUPTED and interrupted.is_done
    assert Path(interrupted.last_checkpoint_path).is_file(), "running runs checkpoint before the server stops"
    assert Path(interrupted.model_path).is_file()
    never_started = second.status(waiting)
    assert never_started.state == pb.INTERRUPTED and "before the run started" in never_started.error


@pytest.mark.parametrize("auto_resume", [True, False])
def test_runs_left_running_by_a_crashed_server(server_factory, tmp_path: Path, auto_resume: bool) -> None:  # type: ignore[no-untyped-def]
    first = server_factory(tmp_path)
    run_id = first.start(total_timesteps=256, hyperparameters=FAST_PPO)
    first.watch_to_end(run_id)
    first.stop()
    # Simulate a server that died (SIGKILL) mid-run: its record is still RUNNING on disk.
    with sqlite3.connect(tmp_path / "data" / "runs.sqlite3") as conn:
        conn.execute("UPDATE runs SET state='RUNNING', model_saved=0, "
                     "attempts=json_set(attempts, '$[0].outcome', '') WHERE run_id=?", (run_id,))
    second = server_factory(tmp_path, auto_resume=auto_resume)
    if auto_resume:  # it resumes from its last checkpoint, which already holds its whole budget
        status = second.watch_to_end(run_id)[-1]
        assert status.state == pb.SUCCEEDED and status.attempt == 2 and status.timesteps_done >= 256
        assert [a.outcome for a in status.attempts] == ["server died", "SUCCEEDED"]
    else:
        status = second.status(run_id)
        assert status.state == pb.INTERRUPTED and status.attempt == 1
        assert status.error == "interrupted: the server stopped while the run was in progress"
        assert [a.outcome for a in status.attempts] == ["server died"]


def test_watch_streams_are_capped(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle: ServerHandle = server_factory(max_watch_streams=1)
    run_id = handle.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO)
    first = handle.stub.WatchTraining(pb.RunRequest(run_id=run_id), timeout=60)
    assert next(first).run_id == run_id
    with pytest.raises(grpc.RpcError) as info:
        next(handle.stub.WatchTraining(pb.RunRequest(run_id=run_id), timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "MAX_WATCH_STREAMS" in info.value.details()
    first.cancel()
    deadline = time.monotonic() + 10
    while True:  # the server frees the slot once it notices the cancelled stream
        try:
            assert next(handle.stub.WatchTraining(pb.RunRequest(run_id=run_id), timeout=10)).run_id == run_id
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.2)
    handle.stub.StopTraining(pb.RunRequest(run_id=run_id), timeout=60)


def test_act_follows_newer_checkpoints_during_a_run(server: ServerHandle) -> None:
    run_id = server.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO, checkpoint_interval=500)
    first = server.wait_until(run_id, lambda s: bool(s.last_checkpoint_path))
    seen = {server.stub.Act(pb.ActRequest(run_id=run_id, observation=[0.0] * 4)).model_timesteps}
    assert min(seen) >= 500
    server.wait_until(run_id, lambda s: s.last_checkpoint_path != first.last_checkpoint_path)
    seen.add(server.stub.Act(pb.ActRequest(run_id=run_id, observation=[0.0] * 4)).model_timesteps)
    assert len(seen) == 2 and max(seen) > min(seen), "Act reloads when a newer checkpoint lands"
    server.stub.StopTraining(pb.RunRequest(run_id=run_id), timeout=60)
