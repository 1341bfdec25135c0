"""PolicyService proto <-> DTO conversion."""

from __future__ import annotations

import numpy as np

from rl_service.core.algorithms.reinforce_update import UpdateStats
from rl_service.core.policies.records import BatchOutcome, CheckpointInfo, ModelUpdate, PolicySnapshot
from rl_service.core.policies.spec import PolicySpec, PolicySpecRequest
from rl_service_proto.v1 import policy_pb2 as pb


def floats(values: object, dtype: type = np.float32) -> np.ndarray:
    """A repeated scalar field as a numpy array (one bulk copy, no per-element Python objects kept)."""
    return np.asarray(values, dtype=dtype)


def spec_request_from_proto(msg: pb.PolicySpec) -> PolicySpecRequest:
    """PolicySpec (as sent) -> PolicySpecRequest."""
    which = msg.WhichOneof("actions")
    return PolicySpecRequest(
        observation_shape=tuple(msg.observation_shape),
        discrete_actions=msg.discrete_n if which == "discrete_n" else None,
        box_shape=tuple(msg.box.shape) if which == "box" else (),
        box_low=tuple(msg.box.low) if which == "box" else (),
        box_high=tuple(msg.box.high) if which == "box" else (),
        hyperparameters=dict(msg.hyperparameters),
        seed=msg.seed if msg.HasField("seed") else None,
        algorithm=msg.algorithm,
    )


def spec_to_proto(spec: PolicySpec) -> pb.PolicySpec:
    """PolicySpec (validated) -> proto, with effective hyperparameters and the seed used."""
    msg = pb.PolicySpec(observation_shape=list(spec.observation_shape), hyperparameters=dict(spec.hyperparameters),
                        seed=spec.seed, algorithm=spec.algorithm)
    if spec.discrete_actions is not None:
        msg.discrete_n = spec.discrete_actions
    else:
        msg.box.CopyFrom(pb.BoxActions(shape=list(spec.action_shape), low=list(spec.action_low),
                                       high=list(spec.action_high)))
    return msg


def metrics_to_proto(stats: UpdateStats | None) -> pb.UpdateMetrics:
    """UpdateStats -> UpdateMetrics (empty when there was no update)."""
    if stats is None:
        return pb.UpdateMetrics()
    return pb.UpdateMetrics(loss=stats.loss, policy_loss=stats.policy_loss, entropy=stats.entropy,
                            episodes_used=stats.episodes, steps_used=stats.steps,
                            mean_episode_return=stats.mean_return, grad_norm=stats.grad_norm,
                            value_loss=stats.value_loss, approx_kl=stats.approx_kl,
                            clip_fraction=stats.clip_fraction, explained_variance=stats.explained_variance)


def snapshot_to_proto(snapshot: PolicySnapshot) -> pb.PolicyInfo:
    """PolicySnapshot -> PolicyInfo."""
    return pb.PolicyInfo(
        policy_id=snapshot.policy_id, spec=spec_to_proto(snapshot.spec), version=snapshot.version,
        pending_steps=snapshot.pending_steps, episodes_trained=snapshot.episodes_trained,
        steps_trained=snapshot.steps_trained, last_update=metrics_to_proto(snapshot.last_update),
        created_at=snapshot.created_at, updated_at=snapshot.updated_at, created=snapshot.created,
        durable_version=snapshot.durable_version, owner=snapshot.owner,
    )


def outcome_to_proto(outcome: BatchOutcome) -> pb.TrainingBatchResult:
    """BatchOutcome -> TrainingBatchResult."""
    return pb.TrainingBatchResult(policy_id=outcome.policy_id, version=outcome.version, updated=outcome.updated,
                                  metrics=metrics_to_proto(outcome.metrics), pending_steps=outcome.pending_steps,
                                  torchscript=outcome.torchscript, durable_version=outcome.durable_version)


def update_to_proto(update: ModelUpdate) -> pb.ModelUpdate:
    """ModelUpdate -> proto."""
    return pb.ModelUpdate(policy_id=update.policy_id, version=update.version,
                          metrics=metrics_to_proto(update.metrics), torchscript=update.torchscript,
                          durable_version=update.durable_version)


def checkpoint_to_proto(info: CheckpointInfo) -> pb.CheckpointInfo:
    """CheckpointInfo -> proto."""
    return pb.CheckpointInfo(name=info.name, version=info.version, saved_at=info.saved_at)
