"""Learning breadth over real gRPC: a SAC run on Pendulum-v1, MaskablePPO on the masked env, evaluations in
TrainingStatus with best_model.zip and stop_at_reward, normalisation statistics beside every model file, resuming
with both, and the refusals naming their field in google.rpc.BadRequest."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from rl_service.core.models.checkpoints import BEST_MODEL_NAME
from rl_service.core.models.normalization import load_stats, stats_path
from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import FAST_PPO, ServerHandle, files_under
from tests.support.envs import MASKED_ENV_ID, MaskedChoiceEnv
from tests.support.grpc_errors import field_violations

SAC_QUICK = {"learning_starts": "100", "batch_size": "64", "net_arch": "64,64", "buffer_size": "2000"}
MASKED_QUICK = {"n_steps": "128", "batch_size": "64", "n_epochs": "2", "net_arch": "32"}


def history(server: ServerHandle, run_id: str) -> list[pb.EpisodeRecord]:
    return list(server.stub.GetRunHistory(pb.RunHistoryRequest(run_id=run_id), timeout=10).episodes)


def test_sac_trains_on_pendulum_and_acts(server: ServerHandle) -> None:
    run_id = server.start("SAC", env_id="Pendulum-v1", total_timesteps=800, seed=1, checkpoint_interval=400,
                          hyperparameters=SAC_QUICK)
    final = server.watch_to_end(run_id)[-1]
    assert final.state == pb.SUCCEEDED and final.algorithm == "SAC" and final.timesteps_done == 800, final.error
    assert final.metrics.episodes_completed == 4  # 200-step episodes
    assert {"actor_loss", "critic_loss", "ent_coef"} <= set(final.metrics.losses)
    assert final.hyperparameters["buffer_size"] == "2000" and final.hyperparameters["ent_coef"] == "auto"
    checkpoint = Path(final.last_checkpoint_path)
    assert checkpoint.with_name("checkpoint_800_steps.replay_buffer.pkl").is_file()
    reply = server.stub.Act(pb.ActRequest(run_id=run_id, observation=[1.0, 0.0, 0.5], deterministic=True))
    assert len(reply.action) == 1 and -2.0 <= reply.action[0] <= 2.0 and reply.model_timesteps == 800
    assert not final.HasField("last_evaluation") and not final.HasField("best_evaluation")


def test_maskable_ppo_acts_only_legally_and_ppo_does_not(server: ServerHandle) -> None:
    # An illegal action ends the env's episode at once (with reward -1); a legal one never does before step 16.
    length = MaskedChoiceEnv().episode_length
    masked = server.start("MaskablePPO", env_id=MASKED_ENV_ID, total_timesteps=1024, seed=2,
                          hyperparameters={**MASKED_QUICK, "eval_freq": "512", "n_eval_episodes": "4"})
    plain = server.start("PPO", env_id=MASKED_ENV_ID, total_timesteps=1024, seed=2, hyperparameters=MASKED_QUICK)
    masked_final, plain_final = server.watch_to_end(masked)[-1], server.watch_to_end(plain)[-1]
    assert masked_final.state == plain_final.state == pb.SUCCEEDED, (masked_final.error, plain_final.error)
    masked_episodes = history(server, masked)
    assert len(masked_episodes) == 1024 // length
    assert all(e.length == length and e.reward >= 0.1 * length for e in masked_episodes)
    assert masked_final.best_evaluation.mean_length == masked_final.last_evaluation.mean_length == length
    plain_episodes = history(server, plain)
    illegal = [e for e in plain_episodes if e.length < length]
    assert len(illegal) > len(plain_episodes) // 2, "unmasked PPO ends most episodes on an illegal action"


def test_evaluations_appear_in_status_and_keep_the_best_model(server: ServerHandle) -> None:
    run_id = server.start(total_timesteps=2048, seed=3, checkpoint_interval=1024,
                          hyperparameters={**FAST_PPO, "eval_freq": "512", "n_eval_episodes": "3"})
    statuses = server.watch_to_end(run_id)
    final = statuses[-1]
    assert final.state == pb.SUCCEEDED, final.error
    last, best = final.last_evaluation, final.best_evaluation
    assert last.timesteps == 2048 and last.episodes == 3 and last.mean_reward == last.mean_length > 0
    assert best.mean_reward >= last.mean_reward and best.timesteps in (512, 1024, 1536, 2048)
    assert best.std_reward >= 0 and best.episodes == 3
    seen = {s.last_evaluation.timesteps for s in statuses if s.HasField("last_evaluation")}
    assert seen <= {512, 1024, 1536, 2048} and 2048 in seen
    run_dir = Path(final.model_path).parent
    assert (run_dir / BEST_MODEL_NAME).is_file()
    from stable_baselines3 import PPO

    assert PPO.load(run_dir / BEST_MODEL_NAME, device="cpu").num_timesteps == best.timesteps
    listed = {r.run_id: r for r in server.stub.ListRuns(pb.ListRunsRequest()).runs}[run_id]
    assert listed.best_evaluation == best


def test_stop_at_reward_ends_the_run_succeeded_early(server: ServerHandle) -> None:
    run_id = server.start(total_timesteps=100_000, seed=4, checkpoint_interval=10_000,
                          hyperparameters={**FAST_PPO, "eval_freq": "256", "stop_at_reward": "5"})
    final = server.watch_to_end(run_id)[-1]
    assert final.state == pb.SUCCEEDED and not final.error
    assert final.timesteps_done == 256 < final.total_timesteps  # CartPole lasts at least 8 steps: 5 is reached
    assert final.last_evaluation.mean_reward >= 5 and final.best_evaluation == final.last_evaluation
    assert Path(final.model_path).is_file() and Path(final.last_checkpoint_path).is_file()
    metadata = json.loads((Path(final.model_path).parent / "metadata.json").read_text())
    assert metadata["training"] == "reached stop_at_reward"


def test_normalized_runs_keep_statistics_beside_every_model_and_resume_with_them(server: ServerHandle) -> None:
    run_id = server.start(total_timesteps=4000, seed=5, checkpoint_interval=512,
                          hyperparameters={**FAST_PPO, "normalize": "true", "eval_freq": "512"})
    server.wait_until(run_id, lambda s: s.timesteps_done >= 1100)
    stopped = server.stub.StopTraining(pb.RunRequest(run_id=run_id), timeout=60)
    assert stopped.state == pb.CANCELLED and stopped.HasField("best_evaluation")
    checkpoint = Path(stopped.last_checkpoint_path)
    checkpoints = sorted(checkpoint.parent.glob("checkpoint_*_steps.zip"))
    assert checkpoints and all(stats_path(c).is_file() for c in checkpoints)
    saved = load_stats(stats_path(checkpoint))
    assert saved.norm_obs and saved.norm_reward and saved.obs_count > stopped.timesteps_done

    server.stub.ResumeTraining(pb.ResumeTrainingRequest(run_id=run_id), timeout=30)
    final = server.watch_to_end(run_id)[-1]
    assert final.state == pb.SUCCEEDED and final.attempt == 2, final.attempts
    model = Path(final.model_path)
    final_stats = load_stats(stats_path(model))
    # The statistics went on from the checkpoint's: every step of both attempts counted once (plus resets).
    assert final_stats.obs_count >= saved.obs_count + (final.timesteps_done - stopped.timesteps_done)
    assert final_stats.obs_count < final.timesteps_done + 100
    assert final.best_evaluation.mean_reward >= stopped.best_evaluation.mean_reward
    best = model.parent / BEST_MODEL_NAME
    assert best.is_file() and stats_path(best).is_file()

    server.stub.DeleteRun(pb.DeleteRunRequest(run_id=run_id), timeout=30)
    assert not model.parent.exists() and not checkpoint.parent.exists()


def test_deleting_a_run_with_a_model_elsewhere_removes_its_statistics(server: ServerHandle) -> None:
    run_id = server.start(total_timesteps=256, hyperparameters={**FAST_PPO, "normalize": "obs"},
                          model_output_path="breadth/normalized.zip")
    final = server.watch_to_end(run_id)[-1]
    model = Path(final.model_path)
    assert model.is_file() and stats_path(model).is_file()
    assert not load_stats(stats_path(model)).norm_reward
    server.stub.DeleteRun(pb.DeleteRunRequest(run_id=run_id), timeout=30)
    assert not model.exists() and not stats_path(model).exists()


@pytest.mark.parametrize(("algorithm", "env_id", "hyperparameters", "field"), [
    ("SAC", "CartPole-v1", {}, "env_id"),
    ("TD3", "CartPole-v1", {}, "env_id"),
    ("DDPG", "CartPole-v1", {}, "env_id"),
    ("TQC", "CartPole-v1", {}, "env_id"),
    ("QRDQN", "Pendulum-v1", {}, "env_id"),
    ("MaskablePPO", "Pendulum-v1", {}, "env_id"),
    ("MaskablePPO", "CartPole-v1", {}, "algorithm"),
    ("PPO", "CartPole-v1", {"normalize": "{\"clip_obs\": -1}"}, "hyperparameters.normalize"),
    ("PPO", "CartPole-v1", {"normalize": "__import__('os')"}, "hyperparameters.normalize"),
    ("PPO", "FrozenLake-v1", {"normalize": "true"}, "hyperparameters.normalize"),
    ("PPO", "CartPole-v1", {"eval_freq": "-5"}, "hyperparameters.eval_freq"),
    ("PPO", "CartPole-v1", {"n_eval_episodes": "0"}, "hyperparameters.n_eval_episodes"),
    ("SAC", "Pendulum-v1", {"buffer_size": "5000001"}, "hyperparameters.buffer_size"),
])
def test_refusals_name_their_field_and_write_nothing(server: ServerHandle, algorithm: str, env_id: str,
                                                     hyperparameters: dict[str, str], field: str) -> None:
    roots = (Path(server.settings.models_root), Path(server.settings.checkpoint_root))
    before = files_under(*roots)
    with pytest.raises(grpc.RpcError) as info:
        server.start(algorithm, env_id=env_id, total_timesteps=1000, hyperparameters=hyperparameters)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field.split(".")[-1] in error.details().split(":")[0], error.details()  # named before the reason
    status = rpc_status.from_call(error)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == [field]
    assert files_under(*roots) == before


def test_maskable_ppo_on_a_simulation_without_masks_trains_as_ppo(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from rl_service.envserver.reference_server import serve_gym

    handle: ServerHandle = server_factory(tmp_path)
    simulation = serve_gym("CartPole-v1", 2)
    try:
        # The protocol makes masks optional: a simulation that sends none has every action legal (see
        # docs/environment-protocol.md), so MaskablePPO trains as PPO would.
        run_id = handle.start("MaskablePPO", env_id=simulation.address, total_timesteps=512,
                              hyperparameters={"n_steps": "64", "batch_size": "64"})
        final = handle.watch_to_end(run_id)[-1]
    finally:
        simulation.stop()
    assert final.state == pb.SUCCEEDED and final.timesteps_done == 512, final.error


def test_evaluations_on_a_simulation_are_refused_naming_eval_freq(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from rl_service.envserver.reference_server import serve_gym

    handle: ServerHandle = server_factory(tmp_path)
    simulation = serve_gym("CartPole-v1", 2)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            handle.start("PPO", env_id=simulation.address, total_timesteps=512,
                         hyperparameters={**FAST_PPO, "eval_freq": "256"})
    finally:
        simulation.stop()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "eval_freq" in caught.value.details() and "one client at a time" in caught.value.details()
    assert field_violations(caught.value) == ["hyperparameters.eval_freq"]
    assert not list(handle.stub.ListRuns(pb.ListRunsRequest(), timeout=10).runs)


def test_a_normalised_runs_exports_answer_as_act_for_raw_observations(server: ServerHandle) -> None:
    import io

    import numpy as np
    import torch

    run_id = server.start(total_timesteps=1024, seed=9, checkpoint_interval=512,
                          hyperparameters={**FAST_PPO, "normalize": "true", "eval_freq": "512",
                                           "n_eval_episodes": "2"})
    final = server.watch_to_end(run_id)[-1]
    assert final.state == pb.SUCCEEDED and final.HasField("best_evaluation")
    stats = load_stats(stats_path(Path(final.model_path)))
    # Raw CartPole states well away from the statistics' mean: normalisation changes what the policy sees.
    raw = np.random.default_rng(0).uniform(-2.0, 2.0, size=(64, 4)).astype(np.float32)
    assert not np.allclose(stats.normalize_observations(raw), raw)
    for model in ("latest", "best"):
        answered = server.stub.ActBatch(pb.ActBatchRequest(run_id=run_id, observations=raw.ravel().tolist(),
                                                           deterministic=True, model=model), timeout=30)
        exported = server.stub.ExportModel(pb.ExportModelRequest(run_id=run_id, format="torchscript", model=model),
                                           timeout=60)
        program = torch.jit.load(io.BytesIO(exported.data))
        with torch.inference_mode():
            actions = program(torch.from_numpy(raw)).numpy().reshape(-1)
        assert actions.tolist() == list(answered.actions), model
        assert exported.model_timesteps == answered.model_timesteps
