"""proto <-> DTO conversion, kept beside each other and round-trip tested."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from rl_service.core.algorithms.hyperparams import Param, format_value
from rl_service.core.errors import InvalidRequest
from rl_service.core.models.run_exporters import ExportedModel
from rl_service.core.runs.history import Episode, HistoryPage
from rl_service.core.runs.records import (
    ActResult,
    Attempt,
    Evaluation,
    Metrics,
    RunFilter,
    RunRecord,
    RunState,
    TrainingRequest,
)
from rl_service_proto.v1 import training_pb2 as pb

if TYPE_CHECKING:  # the registry imports torch; conversion itself needs only the spec's fields
    from rl_service.core.algorithms.registry import AlgorithmSpec


def training_request_from_proto(msg: pb.StartTrainingRequest) -> TrainingRequest:
    """StartTrainingRequest -> TrainingRequest (shape only; the orchestrator checks meaning)."""
    return TrainingRequest(
        algorithm=msg.algorithm,
        env_id=msg.env_id,
        total_timesteps=msg.total_timesteps,
        experiment_id=msg.experiment_id,
        seed=msg.seed if msg.HasField("seed") else None,
        hyperparameters=dict(msg.hyperparameters),
        model_output_path=msg.model_output_path,
        checkpoint_interval=msg.checkpoint_interval,
    )


def training_request_to_proto(request: TrainingRequest) -> pb.StartTrainingRequest:
    """TrainingRequest -> StartTrainingRequest (used by clients and round-trip tests)."""
    msg = pb.StartTrainingRequest(
        algorithm=request.algorithm, env_id=request.env_id, total_timesteps=request.total_timesteps,
        experiment_id=request.experiment_id, hyperparameters=dict(request.hyperparameters),
        model_output_path=request.model_output_path, checkpoint_interval=request.checkpoint_interval,
    )
    if request.seed is not None:
        msg.seed = request.seed
    return msg


def metrics_to_proto(metrics: Metrics) -> pb.TrainingMetrics:
    """Metrics -> TrainingMetrics."""
    return pb.TrainingMetrics(
        mean_episode_reward=metrics.mean_episode_reward, mean_episode_length=metrics.mean_episode_length,
        episodes_completed=metrics.episodes_completed, steps_per_second=metrics.steps_per_second,
        losses=dict(metrics.losses),
    )


def metrics_from_proto(msg: pb.TrainingMetrics) -> Metrics:
    """TrainingMetrics -> Metrics."""
    return Metrics(msg.mean_episode_reward, msg.mean_episode_length, msg.episodes_completed,
                   msg.steps_per_second, dict(msg.losses))


def status_to_proto(record: RunRecord) -> pb.TrainingStatus:
    """RunRecord -> TrainingStatus (an evaluation left unset until the run has one)."""
    msg = pb.TrainingStatus(
        run_id=record.run_id, experiment_id=record.experiment_id, algorithm=record.algorithm,
        env_id=record.env_id, state=record.state.value, timesteps_done=record.timesteps_done,
        total_timesteps=record.total_timesteps, is_done=record.state.is_terminal,
        last_checkpoint_path=record.last_checkpoint_path,
        model_path=record.model_path if record.model_saved else "", error=record.error,
        metrics=metrics_to_proto(record.metrics), seed=record.seed, hyperparameters=dict(record.hyperparameters),
        created_at=record.created_at, started_at=record.started_at, finished_at=record.finished_at,
        stop_requested=record.stop_requested, attempt=record.attempt,
        attempts=[attempt_to_proto(a) for a in record.attempts], owner=record.owner,
    )
    if record.last_evaluation is not None:
        msg.last_evaluation.CopyFrom(evaluation_to_proto(record.last_evaluation))
    if record.best_evaluation is not None:
        msg.best_evaluation.CopyFrom(evaluation_to_proto(record.best_evaluation))
    return msg


def evaluation_to_proto(evaluation: Evaluation) -> pb.Evaluation:
    """Evaluation -> Evaluation message."""
    return pb.Evaluation(mean_reward=evaluation.mean_reward, std_reward=evaluation.std_reward,
                         timesteps=evaluation.timesteps, episodes=evaluation.episodes,
                         mean_length=evaluation.mean_length)


def evaluation_from_proto(msg: pb.Evaluation) -> Evaluation:
    """Evaluation message -> Evaluation (used by clients and round-trip tests)."""
    return Evaluation(msg.mean_reward, msg.std_reward, msg.timesteps, msg.episodes, msg.mean_length)


def attempt_to_proto(attempt: Attempt) -> pb.RunAttempt:
    """Attempt -> RunAttempt."""
    return pb.RunAttempt(attempt=attempt.number, start_timesteps=attempt.start_timesteps,
                         end_timesteps=attempt.end_timesteps, started_at=attempt.started_at,
                         finished_at=attempt.finished_at, outcome=attempt.outcome, error=attempt.error)


def run_filter_from_proto(msg: pb.ListRunsRequest) -> RunFilter:
    """ListRunsRequest -> RunFilter; an unknown state value is INVALID_ARGUMENT."""
    state = None
    if msg.HasField("state") and msg.state != pb.RUN_STATE_UNSPECIFIED:
        try:
            state = RunState(msg.state)
        except ValueError:
            raise InvalidRequest(f"state: unknown run state {msg.state}", field="state") from None
    return RunFilter(experiment_id=msg.experiment_id if msg.HasField("experiment_id") else None, state=state)


def act_response_to_proto(result: ActResult) -> pb.ActResponse:
    """One action -> ActResponse."""
    return pb.ActResponse(action=result.actions, model_timesteps=result.model_timesteps)


def act_batch_response_to_proto(result: ActResult) -> pb.ActBatchResponse:
    """Many actions -> ActBatchResponse."""
    return pb.ActBatchResponse(actions=result.actions, action_size=result.action_size, count=result.count,
                               model_timesteps=result.model_timesteps)


def history_page_to_proto(page: HistoryPage) -> pb.RunHistory:
    """HistoryPage -> RunHistory."""
    return pb.RunHistory(
        run_id=page.run_id, total_episodes=page.total_episodes, offset=page.offset,
        episodes=[pb.EpisodeRecord(reward=e.reward, length=e.length, time=e.time, timesteps=e.timesteps)
                  for e in page.episodes],
    )


def history_page_from_proto(msg: pb.RunHistory) -> HistoryPage:
    """RunHistory -> HistoryPage (used by clients and round-trip tests)."""
    return HistoryPage(run_id=msg.run_id, total_episodes=msg.total_episodes, offset=msg.offset,
                       episodes=[Episode(e.reward, e.length, e.time, e.timesteps) for e in msg.episodes])


def exported_model_to_proto(model: ExportedModel) -> pb.ExportModelResponse:
    """ExportedModel -> ExportModelResponse."""
    return pb.ExportModelResponse(data=model.data, filename=model.filename, format=model.format,
                                  model_timesteps=model.model_timesteps, signature=model.signature)


def exported_model_from_proto(msg: pb.ExportModelResponse) -> ExportedModel:
    """ExportModelResponse -> ExportedModel (used by clients and round-trip tests)."""
    return ExportedModel(data=msg.data, filename=msg.filename, format=msg.format,
                         model_timesteps=msg.model_timesteps, signature=msg.signature)


def hyperparameter_to_proto(param: Param) -> pb.HyperparameterInfo:
    """One schema entry -> HyperparameterInfo (the default as the text StartTraining accepts)."""
    msg = pb.HyperparameterInfo(
        name=param.name, kind=param.kind, default_value=format_value(param.default),
        low_exclusive=param.low_exclusive, schedule=param.schedule, accepts_none=param.optional,
        choices=list(param.choices), words=list(param.words), help=param.help, accepted=param.describe_range())
    if param.kind in ("float", "int"):  # bounds mean something for numbers only
        if param.low is not None:
            msg.low = param.low
        if param.high is not None:
            msg.high = param.high
    return msg


def algorithms_to_proto(specs: Iterable[AlgorithmSpec]) -> pb.ListAlgorithmsResponse:
    """The algorithm registry -> ListAlgorithmsResponse, hyperparameters sorted by name."""
    return pb.ListAlgorithmsResponse(algorithms=[
        pb.AlgorithmInfo(name=spec.name, source=spec.source,
                         action_spaces=[space.__name__ for space in spec.action_spaces],
                         needs_action_masks=spec.needs_action_masks,
                         hyperparameters=[hyperparameter_to_proto(p)
                                          for p in sorted(spec.schema.params, key=lambda p: p.name)])
        for spec in specs])
