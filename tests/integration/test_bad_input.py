"""Every bad input gets its gRPC status code, a message naming the field, and leaves nothing written."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import FAST_PPO, ServerHandle, files_under

INVALID = grpc.StatusCode.INVALID_ARGUMENT

# (case id, StartTrainingRequest fields, expected code, words the message must contain)
BAD_STARTS: list[tuple[str, dict[str, Any], grpc.StatusCode, tuple[str, ...]]] = [
    ("unknown algorithm", {"algorithm": "HER"}, INVALID, ("algorithm", "HER", "PPO", "A2C", "DQN", "SAC", "TRPO")),
    ("empty algorithm", {"algorithm": ""}, INVALID, ("algorithm",)),
    ("unknown env", {"env_id": "NoSuchEnv-v0"}, INVALID, ("env_id", "NoSuchEnv-v0")),
    ("env typo suggests", {"env_id": "CartPol-v1"}, INVALID, ("env_id", "CartPole-v1")),
    ("env that imports a module", {"env_id": "os:Evil-v0"}, INVALID, ("env_id", "module")),
    ("empty env", {"env_id": ""}, INVALID, ("env_id",)),
    ("unknown hyperparameter", {"hyperparameters": {"bogus": "1"}}, INVALID,
     ("bogus", "accepted keys", "learning_rate", "n_steps", "clip_range")),
    ("unparsable value", {"hyperparameters": {"learning_rate": "fast"}}, INVALID, ("learning_rate", "fast")),
    ("out of range", {"hyperparameters": {"gamma": "1.5"}}, INVALID, ("gamma", "1.5")),
    ("nan value", {"hyperparameters": {"ent_coef": "nan"}}, INVALID, ("ent_coef",)),
    ("code in a value", {"hyperparameters": {"learning_rate": "__import__('os').system('true')"}}, INVALID,
     ("learning_rate",)),
    ("fractional int", {"hyperparameters": {"n_steps": "12.5"}}, INVALID, ("n_steps",)),
    ("bad schedule", {"hyperparameters": {"learning_rate": "lin_abc"}}, INVALID, ("learning_rate",)),
    ("batch larger than rollout", {"hyperparameters": {"n_steps": "32", "batch_size": "64"}}, INVALID,
     ("batch_size",)),
    ("zero timesteps", {"total_timesteps": 0}, INVALID, ("total_timesteps",)),
    ("negative timesteps", {"total_timesteps": -5}, INVALID, ("total_timesteps",)),
    ("timesteps over cap", {"total_timesteps": 10**12}, INVALID, ("total_timesteps", "MAX_TOTAL_TIMESTEPS")),
    ("tiny checkpoint interval", {"checkpoint_interval": 5}, INVALID, ("checkpoint_interval",)),
    ("negative seed", {"seed": -1}, INVALID, ("seed",)),
    ("dqn on continuous actions", {"algorithm": "DQN", "env_id": "Pendulum-v1"}, INVALID,
     ("env_id", "DQN", "Box")),
    ("sde on discrete actions", {"hyperparameters": {"use_sde": "true"}}, INVALID, ("use_sde",)),
    ("sac on discrete actions", {"algorithm": "SAC"}, INVALID, ("env_id", "SAC", "Discrete", "Box")),
    ("qrdqn on continuous actions", {"algorithm": "QRDQN", "env_id": "Pendulum-v1"}, INVALID,
     ("env_id", "QRDQN", "Box")),
    ("maskable ppo without masks", {"algorithm": "MaskablePPO"}, INVALID, ("algorithm", "action_masks")),
    ("unparsable normalize", {"hyperparameters": {"normalize": "{'norm_obs': True}"}}, INVALID,
     ("normalize", "JSON")),
    ("normalize with an unknown key", {"hyperparameters": {"normalize": '{"norm_ob": true}'}}, INVALID,
     ("normalize", "norm_ob")),
    ("negative eval_freq", {"hyperparameters": {"eval_freq": "-1"}}, INVALID, ("eval_freq",)),
    ("no eval episodes", {"hyperparameters": {"n_eval_episodes": "0"}}, INVALID, ("n_eval_episodes",)),
    ("too many eval episodes", {"hyperparameters": {"n_eval_episodes": "1000"}}, INVALID, ("n_eval_episodes",)),
    ("stop_at_reward without evaluations", {"hyperparameters": {"stop_at_reward": "100"}}, INVALID,
     ("stop_at_reward", "eval_freq")),
    ("absolute path elsewhere", {"model_output_path": "/tmp/elsewhere/model.zip"}, INVALID,
     ("model_output_path", "MODELS_DIR")),
    ("dot-dot escape", {"model_output_path": "../escape.zip"}, INVALID, ("model_output_path",)),
    ("deep dot-dot escape", {"model_output_path": "a/b/../../../escape.zip"}, INVALID, ("model_output_path",)),
    ("the root itself", {"model_output_path": "."}, INVALID, ("model_output_path",)),
]


def _request(**fields: Any) -> pb.StartTrainingRequest:
    # PPO gets the fast settings; other algorithms their defaults (PPO's keys are not theirs).
    ppo = fields.get("algorithm", "PPO") == "PPO"
    base: dict[str, Any] = {"algorithm": "PPO", "env_id": "CartPole-v1", "total_timesteps": 1000,
                            "hyperparameters": dict(FAST_PPO) if ppo else {}}
    if "hyperparameters" in fields:
        base["hyperparameters"] = {**base["hyperparameters"], **fields.pop("hyperparameters")}
    base.update(fields)
    return pb.StartTrainingRequest(**base)


@pytest.fixture
def roots(server: ServerHandle) -> Iterator[tuple[Path, ...]]:
    yield (Path(server.settings.models_root), Path(server.settings.checkpoint_root))


@pytest.mark.parametrize(("fields", "code", "words"), [c[1:] for c in BAD_STARTS], ids=[c[0] for c in BAD_STARTS])
def test_bad_start_training_is_refused_and_writes_nothing(server: ServerHandle, roots: tuple[Path, ...],
                                                          fields: dict[str, Any], code: grpc.StatusCode,
                                                          words: tuple[str, ...]) -> None:
    before_files = files_under(*roots)
    before_runs = len(server.stub.ListRuns(pb.ListRunsRequest()).runs)
    with pytest.raises(grpc.RpcError) as info:
        server.stub.StartTraining(_request(**dict(fields)), timeout=30)
    assert info.value.code() == code, info.value.details()
    for word in words:
        assert word in info.value.details(), f"{word!r} missing from {info.value.details()!r}"
    assert "Traceback" not in info.value.details()
    assert files_under(*roots) == before_files
    assert len(server.stub.ListRuns(pb.ListRunsRequest()).runs) == before_runs


def test_symlink_out_of_models_dir_is_refused(server: ServerHandle, roots: tuple[Path, ...],
                                              tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    link = Path(server.settings.models_root) / "sneaky-link"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    try:
        before = files_under(*roots)
        with pytest.raises(grpc.RpcError) as info:
            server.stub.StartTraining(_request(model_output_path="sneaky-link/model.zip"))
        assert info.value.code() == INVALID and "model_output_path" in info.value.details()
        assert files_under(*roots) == before and not any(outside.iterdir())
    finally:
        link.unlink()


def test_model_output_path_inside_models_dir_is_used_and_never_overwritten(server: ServerHandle) -> None:
    run_id = server.start(total_timesteps=256, hyperparameters=FAST_PPO, model_output_path="team/cartpole.zip")
    final = server.watch_to_end(run_id)[-1]
    expected = Path(server.settings.models_root).resolve() / "team" / "cartpole.zip"
    assert final.state == pb.SUCCEEDED and Path(final.model_path) == expected and expected.is_file()
    with pytest.raises(grpc.RpcError) as info:
        server.start(total_timesteps=256, hyperparameters=FAST_PPO, model_output_path="team/cartpole.zip")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and "model_output_path" in info.value.details()


@pytest.mark.parametrize("rpc", ["GetTrainingStatus", "StopTraining", "WatchTraining"])
def test_unknown_run_id_is_not_found(server: ServerHandle, rpc: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        result = getattr(server.stub, rpc)(pb.RunRequest(run_id="run-doesnotexist"), timeout=10)
        list(result) if rpc == "WatchTraining" else None
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "run-doesnotexist" in info.value.details()


def test_empty_run_id_is_invalid(server: ServerHandle) -> None:
    with pytest.raises(grpc.RpcError) as info:
        server.stub.GetTrainingStatus(pb.RunRequest(run_id=""))
    assert info.value.code() == INVALID and "run_id" in info.value.details()


def test_act_on_unknown_run_is_not_found(server: ServerHandle) -> None:
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Act(pb.ActRequest(run_id="run-doesnotexist", observation=[0, 0, 0, 0]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_act_before_a_model_exists_is_failed_precondition(server: ServerHandle) -> None:
    run_id = server.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO, checkpoint_interval=10_000_000)
    try:
        with pytest.raises(grpc.RpcError) as info:
            server.stub.Act(pb.ActRequest(run_id=run_id, observation=[0, 0, 0, 0]))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "checkpoint" in info.value.details()
    finally:
        server.stub.StopTraining(pb.RunRequest(run_id=run_id), timeout=60)


@pytest.fixture(scope="module")
def finished_run(server: ServerHandle) -> str:
    run_id = server.start(total_timesteps=256, hyperparameters=FAST_PPO)
    assert server.watch_to_end(run_id)[-1].state == pb.SUCCEEDED
    return run_id


@pytest.mark.parametrize(("observation", "words"), [
    ([0.0, 0.0, 0.0], ("observation", "3 values", "4 per observation")),
    ([0.0] * 5, ("observation", "5 values")),
    ([], ("observation", "0 values")),
    ([0.0, math.nan, 0.0, 0.0], ("observation", "index 1", "NaN")),
    ([0.0, 0.0, math.inf, 0.0], ("observation", "index 2")),
    ([0.0] * 8, ("observation", "ActBatch")),
])
def test_act_with_bad_observation_is_invalid(server: ServerHandle, finished_run: str, observation: list[float],
                                              words: tuple[str, ...]) -> None:
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Act(pb.ActRequest(run_id=finished_run, observation=observation))
    assert info.value.code() == INVALID
    for word in words:
        assert word in info.value.details()


def test_act_batch_with_ragged_observations_is_invalid(server: ServerHandle, finished_run: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        server.stub.ActBatch(pb.ActBatchRequest(run_id=finished_run, observations=[0.0] * 6))
    assert info.value.code() == INVALID and "observations" in info.value.details()


def test_act_batch_over_the_cap_is_resource_exhausted(server: ServerHandle, finished_run: str) -> None:
    too_many = server.settings.max_act_batch + 1
    with pytest.raises(grpc.RpcError) as info:
        server.stub.ActBatch(pb.ActBatchRequest(run_id=finished_run, observations=[0.0] * (4 * too_many)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "MAX_ACT_BATCH" in info.value.details()


def test_list_runs_with_unknown_state_is_invalid(server: ServerHandle) -> None:
    with pytest.raises(grpc.RpcError) as info:
        server.stub.ListRuns(pb.ListRunsRequest(state=42))
    assert info.value.code() == INVALID and "state" in info.value.details()
