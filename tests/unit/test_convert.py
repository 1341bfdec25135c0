"""rl_service.transport.convert: proto <-> DTO."""

from __future__ import annotations

import pytest

from rl_service.core.errors import InvalidRequest
from rl_service.core.runs.records import ActResult, Metrics, RunFilter, RunRecord, RunState, TrainingRequest
from rl_service.transport.convert import (
    act_batch_response_to_proto,
    act_response_to_proto,
    metrics_from_proto,
    metrics_to_proto,
    run_filter_from_proto,
    status_to_proto,
    training_request_from_proto,
    training_request_to_proto,
)
from rl_service_proto.v1 import training_pb2 as pb

METRICS = Metrics(mean_episode_reward=12.5, mean_episode_length=30.25, episodes_completed=9,
                  steps_per_second=800.5, losses={"loss": 0.5, "entropy_loss": -0.25})


def record(**changes: object) -> RunRecord:
    base = RunRecord(
        run_id="run-1", experiment_id="exp", algorithm="PPO", env_id="CartPole-v1", state=RunState.RUNNING,
        total_timesteps=10_000, seed=7, hyperparameters={"gamma": "0.99"}, checkpoint_interval=1000,
        model_path="/models/run-1/model.zip", timesteps_done=2048, last_checkpoint_path="/ck/c.zip",
        error="", metrics=METRICS, created_at=100.5, started_at=101.25, finished_at=0.0, stop_requested=False,
    )
    return base.evolve(**changes)


@pytest.mark.parametrize("seed", [None, 0, 1, 2**31 - 1, 2**62])
def test_training_request_round_trip(seed: int | None) -> None:
    request = TrainingRequest(
        algorithm="PPO", env_id="CartPole-v1", total_timesteps=50_000, experiment_id="e1", seed=seed,
        hyperparameters={"n_steps": "64", "learning_rate": "lin_0.001"}, model_output_path="cp/ppo.zip",
        checkpoint_interval=500,
    )
    msg = training_request_to_proto(request)
    assert msg.HasField("seed") is (seed is not None)
    back = training_request_from_proto(pb.StartTrainingRequest.FromString(msg.SerializeToString()))
    assert back == request
    assert back.seed == seed


def test_training_request_from_minimal_proto() -> None:
    request = training_request_from_proto(pb.StartTrainingRequest(algorithm="dqn", env_id="CartPole-v1"))
    assert request == TrainingRequest(algorithm="dqn", env_id="CartPole-v1", total_timesteps=0)
    assert request.seed is None
    assert dict(request.hyperparameters) == {}


def test_training_request_hyperparameters_are_a_plain_dict() -> None:
    msg = pb.StartTrainingRequest(hyperparameters={"a": "1"})
    request = training_request_from_proto(msg)
    assert type(request.hyperparameters) is dict
    msg.hyperparameters["b"] = "2"
    assert dict(request.hyperparameters) == {"a": "1"}


def test_metrics_round_trip() -> None:
    assert metrics_from_proto(metrics_to_proto(METRICS)) == METRICS
    assert metrics_from_proto(metrics_to_proto(Metrics())) == Metrics()


def test_status_fields() -> None:
    msg = status_to_proto(record())
    assert msg.run_id == "run-1"
    assert msg.experiment_id == "exp"
    assert msg.algorithm == "PPO"
    assert msg.env_id == "CartPole-v1"
    assert msg.state == pb.RUNNING
    assert msg.timesteps_done == 2048
    assert msg.total_timesteps == 10_000
    assert msg.is_done is False
    assert msg.last_checkpoint_path == "/ck/c.zip"
    assert msg.model_path == ""
    assert msg.seed == 7
    assert dict(msg.hyperparameters) == {"gamma": "0.99"}
    assert msg.created_at == 100.5
    assert msg.started_at == 101.25
    assert msg.finished_at == 0.0
    assert msg.stop_requested is False
    assert metrics_from_proto(msg.metrics) == METRICS


@pytest.mark.parametrize("state", list(RunState))
def test_status_state_and_is_done(state: RunState) -> None:
    msg = status_to_proto(record(state=state))
    assert msg.state == state.value
    assert pb.RunState.Name(msg.state) == state.name
    assert msg.is_done is (state not in (RunState.PENDING, RunState.RUNNING))


def test_run_state_values_match_proto_enum() -> None:
    for state in RunState:
        assert pb.RunState.Value(state.name) == state.value


def test_model_path_only_once_saved() -> None:
    assert status_to_proto(record(state=RunState.FAILED, error="boom")).model_path == ""
    assert status_to_proto(record(state=RunState.SUCCEEDED, model_saved=False)).model_path == ""
    saved = status_to_proto(record(state=RunState.SUCCEEDED, model_saved=True))
    assert saved.model_path == "/models/run-1/model.zip"
    cancelled = status_to_proto(record(state=RunState.CANCELLED, model_saved=True, stop_requested=True))
    assert cancelled.model_path == "/models/run-1/model.zip"
    assert cancelled.stop_requested is True


def test_status_error_passes_through() -> None:
    msg = status_to_proto(record(state=RunState.FAILED, error="RuntimeError: boom", finished_at=200.0))
    assert msg.error == "RuntimeError: boom"
    assert msg.finished_at == 200.0


def test_run_filter_empty() -> None:
    assert run_filter_from_proto(pb.ListRunsRequest()) == RunFilter(experiment_id=None, state=None)


def test_run_filter_fields() -> None:
    assert run_filter_from_proto(pb.ListRunsRequest(experiment_id="x", state=pb.FAILED)) == RunFilter(
        experiment_id="x", state=RunState.FAILED)
    # An explicitly set empty experiment id filters on "", unlike an unset one.
    assert run_filter_from_proto(pb.ListRunsRequest(experiment_id="")).experiment_id == ""


@pytest.mark.parametrize("value", [99, 7, -1])
def test_run_filter_unknown_state_is_invalid_request(value: int) -> None:
    msg = pb.ListRunsRequest(state=value)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest) as info:
        run_filter_from_proto(msg)
    assert info.value.field == "state"
    assert str(value) in info.value.message


def test_act_responses() -> None:
    result = ActResult(actions=[1.0, 0.0, 1.0], action_size=1, count=3, model_timesteps=4096)
    single = act_response_to_proto(ActResult(actions=[0.5, -0.25], action_size=2, count=1, model_timesteps=8))
    assert list(single.action) == [0.5, -0.25]
    assert single.model_timesteps == 8
    batch = act_batch_response_to_proto(result)
    assert list(batch.actions) == [1.0, 0.0, 1.0]
    assert batch.action_size == 1
    assert batch.count == 3
    assert batch.model_timesteps == 4096


def test_evaluations_are_unset_until_the_run_has_them_and_round_trip() -> None:
    from rl_service.core.runs.records import Evaluation
    from rl_service.transport.convert import evaluation_from_proto, evaluation_to_proto

    bare = status_to_proto(record())
    assert not bare.HasField("last_evaluation") and not bare.HasField("best_evaluation")
    last, best = Evaluation(-150.5, 20.25, 4096, 5, 200.0), Evaluation(-120.0, 3.5, 2048, 5, 200.0)
    msg = status_to_proto(record(last_evaluation=last, best_evaluation=best))
    assert evaluation_from_proto(msg.last_evaluation) == last and evaluation_from_proto(msg.best_evaluation) == best
    assert (msg.best_evaluation.mean_reward, msg.best_evaluation.std_reward, msg.best_evaluation.timesteps,
            msg.best_evaluation.episodes, msg.best_evaluation.mean_length) == (-120.0, 3.5, 2048, 5, 200.0)
    assert evaluation_from_proto(evaluation_to_proto(last)) == last
