"""What rebuilding a managed run's policy takes, from the server's own records: the algorithm and effective
hyperparameters of the RunRecord (turned into constructor arguments by the registry, as the worker does) and the
spaces the worker recorded in metadata.json. Nothing here reads a model file's pickled data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym

from rl_service.core.algorithms.registry import get_algorithm
from rl_service.core.envs import env_spaces, is_external_env
from rl_service.core.errors import ModelNotReady, ServiceError
from rl_service.core.models.policy_weights import PolicyBuild
from rl_service.core.models.ports import ModelStore
from rl_service.core.models.space_json import SpaceFormatError, spaces_from_json
from rl_service.core.runs.records import RunRecord

METADATA_NAME = "metadata.json"
SPACES_KEY = "spaces"  # metadata.json's plain-JSON spaces (space_json.py), written by the worker
MAX_METADATA_BYTES = 64 << 20
# Values of the `normalize` hyperparameter that mean "off"; any other value means statistics are saved.
_NORMALIZE_OFF = frozenset({"", "false", "0", "no", "off", "none"})


@dataclass(frozen=True)
class RunBuild:
    """A run's PolicyBuild, and whether each of its model files must have normalisation statistics beside it."""

    build: PolicyBuild
    requires_stats: bool


def run_build(record: RunRecord, store: ModelStore) -> RunBuild:
    """How to rebuild the run's policy; ModelNotReady (FAILED_PRECONDITION) when its spaces cannot be known."""
    spec = get_algorithm(record.algorithm)
    kwargs = spec.constructor_kwargs(spec.schema.parse(dict(record.hyperparameters)))
    observation_space, action_space = run_spaces(record, store.run_dir(record.run_id) / METADATA_NAME)
    normalize = str(record.hyperparameters.get("normalize", "")).strip().lower()
    return RunBuild(PolicyBuild(spec.cls, kwargs, observation_space, action_space),
                    requires_stats=normalize not in _NORMALIZE_OFF)


def run_spaces(record: RunRecord, metadata_path: Path) -> tuple[gym.Space[Any], gym.Space[Any]]:
    """The spaces recorded in metadata.json; for runs recorded before that, a registered Gymnasium id's spaces."""
    recorded = _recorded_spaces(metadata_path)
    if recorded is not None:
        try:
            return spaces_from_json(recorded)
        except SpaceFormatError as exc:
            raise ModelNotReady(f"run_id: run {record.run_id}'s metadata.json holds unreadable spaces ({exc})",
                                field="run_id") from None
    if is_external_env(record.env_id):
        raise ModelNotReady(
            f"run_id: run {record.run_id} trained on an external environment before this server recorded spaces "
            "in metadata.json, so its policy cannot be rebuilt without unpickling; resume it (its next model records "
            "them) or retrain it", field="run_id")
    try:  # a registered id names code the operator installed, not code a client sent
        spaces = env_spaces(record.env_id)
    except ServiceError as exc:
        raise ModelNotReady(f"run_id: run {record.run_id}'s environment cannot be created on this server to learn "
                            f"its spaces: {exc}", field="run_id") from None
    return spaces.observation_space, spaces.action_space


def _recorded_spaces(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            data = json.loads(handle.read(MAX_METADATA_BYTES + 1)[:MAX_METADATA_BYTES] or b"{}")
    except (OSError, ValueError):  # no metadata yet (a run recorded before this change, or a test's record)
        return None
    return data.get(SPACES_KEY) if isinstance(data, dict) else None
