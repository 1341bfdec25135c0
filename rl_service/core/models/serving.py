"""Serving a managed run's policy: Act and ActBatch from the newest model or checkpoint, and exports of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rl_service.core.algorithms.registry import get_algorithm
from rl_service.core.envs import actions_to_flat, observations_from_flat
from rl_service.core.errors import CapacityExceeded, InvalidRequest, ModelNotReady
from rl_service.core.models.act_cache import ActCache, LoadedPolicy
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
        policy = self._policy(record)
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
        policy = self._policy(record)
        source = ExportSource(run_id=record.run_id, algorithm=record.algorithm,
                              algorithm_cls=get_algorithm(record.algorithm).cls, env_id=record.env_id,
                              path=Path(policy.path), timesteps=policy.timesteps)
        return export_model(fmt, source)

    def _policy(self, record: RunRecord) -> LoadedPolicy:
        """The final model, else the checkpoint the record names, else the newest on disk that loads (the named
        one may be gone, pruned or lost with a crash, or cut short); ModelNotReady when there is none."""
        path = record.model_path if record.model_saved else record.last_checkpoint_path
        try:  # the cache touches the file only when it loads it: a hit costs no system call
            if not path:
                raise FileNotFoundError(path)
            return self._cache.get(record.run_id, record.algorithm, path, record.timesteps_done)
        except Exception:
            return self._newest_loadable(record, failed=path)

    def _newest_loadable(self, record: RunRecord, failed: str) -> LoadedPolicy:
        """The run's newest checkpoint on disk that loads, other than the one that just `failed`; ModelNotReady
        when none does."""
        for checkpoint in reversed(self._store.checkpoints(record.run_id)):
            if str(checkpoint) == failed:  # loading it again would fail again
                continue
            try:
                return self._cache.get(record.run_id, record.algorithm, str(checkpoint), record.timesteps_done)
            except Exception:  # pruned meanwhile, or cut short by a crash: try the one before
                continue
        raise not_ready(record)


def not_ready(record: RunRecord) -> ModelNotReady:
    """The error for a run with nothing to serve yet."""
    return ModelNotReady(f"run_id: run {record.run_id} has no checkpoint or model yet (state {record.state.name}); "
                         "wait for its first checkpoint", field="run_id")
