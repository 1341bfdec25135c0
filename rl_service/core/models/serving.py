"""Serving a managed run's policy: Act and ActBatch from its newest (or best) model, and exports of it.

Every answer comes from the run's CompiledActor (compiled_actor.py), built from the run's record and the model
file's tensors without unpickling anything (run_policy_build.py, policy_weights.py), and cached per file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from rl_service.core.envs import actions_to_flat, observations_from_flat
from rl_service.core.errors import CapacityExceeded, InvalidRequest, ModelNotReady, ServiceError, quoted
from rl_service.core.models.act_cache import ActCache, LoadedPolicy
from rl_service.core.models.checkpoints import BEST_MODEL_NAME
from rl_service.core.models.ports import ModelStore
from rl_service.core.models.run_exporters import (
    ExportedModel,
    ExportSource,
    describe_space,
    export_model,
    get_export_format,
)
from rl_service.core.models.run_policy_build import run_build
from rl_service.core.models.served_policy import ServedPolicy, load_served_policy
from rl_service.core.runs.records import ActResult, RunRecord

LATEST, BEST = "latest", "best"


def model_choice(value: str) -> str:
    """'latest' (also for an empty value) or 'best'; InvalidRequest naming `model` for anything else."""
    choice = value.strip().lower() or LATEST
    if choice not in (LATEST, BEST):
        raise InvalidRequest(f"model: {quoted(value)} is not a model choice; use 'latest' (or leave it empty) or "
                             "'best'", field="model")
    return choice


class RunServing:
    """Answers Act and export requests for runs, compiling each run's policy once per file."""

    def __init__(self, max_act_batch: int, store: ModelStore, cache: ActCache | None = None) -> None:
        self._max_act_batch = max_act_batch
        self._store = store
        self._cache = cache or ActCache()

    def forget(self, run_id: str) -> None:
        """Drop a deleted run's loaded policies."""
        self._cache.forget(run_id)

    def act(self, record: RunRecord, observations: list[float] | np.ndarray, deterministic: bool, single: bool,
            action_mask: np.ndarray | None = None, model: str = "") -> ActResult:
        """Actions from the run's chosen model for one (single=True) or many observations, optionally masked."""
        loaded = self._policy(record, model_choice(model))
        served = loaded.served
        field = "observation" if single else "observations"
        batch = observations_from_flat(observations, served.observation_space, field)
        if single and len(batch) != 1:
            raise InvalidRequest(
                f"observation: got {len(batch)} observations' worth of values; Act takes one (use ActBatch)",
                field="observation")
        if len(batch) > self._max_act_batch:
            raise CapacityExceeded(f"observations: {len(batch)} exceeds MAX_ACT_BATCH={self._max_act_batch}",
                                   field="observations")
        mask = checked_mask(action_mask, served, len(batch), "action_mask" if single else "action_masks")
        actions = served.act(batch, mask, deterministic)
        flat, size = actions_to_flat(actions, served.action_space, len(batch))
        return ActResult(flat, size, len(batch), loaded.timesteps)

    def export(self, record: RunRecord, format_name: str, model: str = "") -> ExportedModel:
        """The policy Act would use for the same model choice, exported in a registered format."""
        fmt = get_export_format(format_name)
        loaded = self._policy(record, model_choice(model))
        source = ExportSource(run_id=record.run_id, algorithm=record.algorithm, env_id=record.env_id,
                              path=Path(loaded.path), timesteps=loaded.timesteps, served=loaded.served)
        return export_model(fmt, source)

    def _policy(self, record: RunRecord, choice: str) -> LoadedPolicy:
        if choice == BEST:
            return self._best(record)
        return self._latest(record)

    def _best(self, record: RunRecord) -> LoadedPolicy:
        """The run's best evaluated model; ModelNotReady naming `model` before its first evaluation."""
        best = record.best_evaluation
        path = self._store.run_dir(record.run_id) / BEST_MODEL_NAME
        if best is None:
            raise ModelNotReady(f"model: run {record.run_id} has no evaluated model yet ('best' needs the "
                                "hyperparameter eval_freq and a first evaluation); use model 'latest'", field="model")
        try:
            return self._cache.get(record.run_id, BEST, str(path), best.timesteps, best.timesteps,
                                   self._loader(record))
        except FileNotFoundError:
            raise ModelNotReady(f"model: run {record.run_id}'s best model file is missing", field="model") from None

    def _latest(self, record: RunRecord) -> LoadedPolicy:
        """The final model, else the checkpoint the record names, else the newest on disk that loads (the named
        one may be gone, pruned or lost with a crash, or cut short); ModelNotReady when there is none."""
        path = record.model_path if record.model_saved else record.last_checkpoint_path
        try:  # the cache touches the file only when it loads it: a hit costs no system call
            if not path:
                raise FileNotFoundError(path)
            return self._cache.get(record.run_id, LATEST, path, 0, record.timesteps_done, self._loader(record))
        except Exception as exc:
            return self._newest_loadable(record, failed=path, reason=exc)

    def _loader(self, record: RunRecord) -> Callable[[Path], ServedPolicy]:
        """Loads a model file of the run; what rebuilding takes is read from the record only on a cache miss."""
        def load(path: Path) -> ServedPolicy:
            run = run_build(record, self._store)
            return load_served_policy(path, run.build, run.requires_stats)

        return load

    def _newest_loadable(self, record: RunRecord, failed: str, reason: Exception) -> LoadedPolicy:
        """The run's newest checkpoint on disk that loads, other than the one that just `failed`; when none does,
        the clearest reason (a model that does not fit the run), else ModelNotReady."""
        for checkpoint in reversed(self._store.checkpoints(record.run_id)):
            if str(checkpoint) == failed:  # loading it again would fail again
                continue
            try:
                return self._cache.get(record.run_id, LATEST, str(checkpoint), 0, record.timesteps_done,
                                       self._loader(record))
            except Exception as exc:  # pruned meanwhile, or cut short by a crash: try the one before
                reason = reason if isinstance(reason, ServiceError) else exc
                continue
        if isinstance(reason, ServiceError):
            raise reason
        raise not_ready(record)


def checked_mask(mask: np.ndarray | None, served: ServedPolicy, count: int, field: str) -> np.ndarray | None:
    """A request's action mask as [count, n] bools, or None; InvalidRequest naming `field` when it cannot apply."""
    if mask is None or mask.size == 0:
        return None
    if not served.maskable:
        raise InvalidRequest(f"{field}: action masks apply to Discrete action spaces only; this run acts in "
                             f"{describe_space(served.action_space)}", field=field)
    n = int(served.action_space.n)  # type: ignore[attr-defined]
    if mask.size != count * n:
        raise InvalidRequest(f"{field}: got {mask.size} flags; the action space has {n} actions, so "
                             f"{count * n} are needed for {count} observation{'s' if count != 1 else ''}",
                             field=field)
    rows = np.asarray(mask, dtype=bool).reshape(count, n)
    empty = np.flatnonzero(~rows.any(axis=1))
    if empty.size:
        raise InvalidRequest(f"{field}: observation {int(empty[0])} has no legal action; at least one flag per "
                             "observation must be true", field=field)
    return rows


def not_ready(record: RunRecord) -> ModelNotReady:
    """The error for a run with nothing to serve yet."""
    return ModelNotReady(f"run_id: run {record.run_id} has no checkpoint or model yet (state {record.state.name}); "
                         "wait for its first checkpoint", field="run_id")
