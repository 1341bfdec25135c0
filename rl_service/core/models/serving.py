"""Serving a managed run's policy: Act and ActBatch from the newest model or checkpoint, and exports of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rl_service.core.algorithms.registry import get_algorithm
from rl_service.core.envs import actions_to_flat, observations_from_flat
from rl_service.core.errors import CapacityExceeded, InvalidRequest, ModelNotReady
from rl_service.core.models.act_cache import ActCache
from rl_service.core.models.checkpoints import checkpoint_timesteps
from rl_service.core.models.ports import ModelStore
from rl_service.core.models.run_exporters import ExportedModel, ExportSource, export_model, get_export_format
from rl_service.core.runs.records import ActResult, RunRecord


class RunServing:
    """Answers Act and export requests for runs, loading each run's policy once per file."""

    def __init__(self, max_act_batch: int, store: ModelStore, cache: ActCache | None = None) -> None:
        self._max_act_batch = max_act_batch
        self._store = store
        self._cache = cache or ActCache()

    def forget(self, run_id: str) -> None:
        """Drop a deleted run's loaded policy."""
        self._cache.forget(run_id)

    def act(self, record: RunRecord, observations: list[float] | np.ndarray, deterministic: bool,
            single: bool) -> ActResult:
        """Actions from the run's newest model or checkpoint for one (single=True) or many observations."""
        path = record.model_path if record.model_saved else record.last_checkpoint_path
        try:  # the cache touches the file only when it loads it: a hit costs no system call
            if not path:
                raise FileNotFoundError(path)
            policy = self._cache.get(record.run_id, record.algorithm, path, record.timesteps_done)
        except FileNotFoundError:
            try:
                policy = self._cache.get(record.run_id, record.algorithm, self._fallback(record),
                                         record.timesteps_done)
            except FileNotFoundError:  # pruned between listing and loading
                raise not_ready(record) from None
        field = "observation" if single else "observations"
        batch = observations_from_flat(observations, policy.model.observation_space, field)
        if single and len(batch) != 1:
            raise InvalidRequest(
                f"observation: got {len(batch)} observations' worth of values; Act takes one (use ActBatch)",
                field="observation")
        if len(batch) > self._max_act_batch:
            raise CapacityExceeded(f"observations: {len(batch)} exceeds MAX_ACT_BATCH={self._max_act_batch}",
                                   field="observations")
        actions, _ = policy.model.predict(batch, deterministic=deterministic)
        flat, size = actions_to_flat(actions, policy.model.action_space, len(batch))
        return ActResult(flat, size, len(batch), policy.timesteps)

    def export(self, record: RunRecord, format_name: str) -> ExportedModel:
        """The policy Act would use (final model, else newest checkpoint) exported in a registered format."""
        fmt = get_export_format(format_name)
        path = Path(self.serving_path(record))
        steps = checkpoint_timesteps(path)
        source = ExportSource(run_id=record.run_id, algorithm=record.algorithm,
                              algorithm_cls=get_algorithm(record.algorithm).cls, env_id=record.env_id, path=path,
                              timesteps=record.timesteps_done if steps is None else steps)
        return export_model(fmt, source)


    def serving_path(self, record: RunRecord) -> str:
        """The file Act and exports use: the final model, else the run's recorded checkpoint, else the newest one
        on disk (a checkpoint the record names may be gone: pruned, or lost with a crash); ModelNotReady if none."""
        path = record.model_path if record.model_saved else record.last_checkpoint_path
        if path and Path(path).exists():
            return path
        return self._fallback(record)

    def _fallback(self, record: RunRecord) -> str:
        latest = self._store.latest_checkpoint(record.run_id)
        if latest is None:
            raise not_ready(record)
        return str(latest)


def not_ready(record: RunRecord) -> ModelNotReady:
    """The error for a run with nothing to serve yet."""
    return ModelNotReady(f"run_id: run {record.run_id} has no checkpoint or model yet (state {record.state.name}); "
                         "wait for its first checkpoint", field="run_id")
