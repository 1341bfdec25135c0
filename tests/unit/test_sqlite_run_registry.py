"""rl_service.infra.sqlite_run_registry: persistence, filters, ordering and start-up recovery."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rl_service.core.runs.records import Attempt, Evaluation, Metrics, RunFilter, RunRecord, RunState
from rl_service.infra.sqlite_run_registry import SCHEMA_VERSION, SqliteRunRegistry


def make_record(run_id: str, **changes: object) -> RunRecord:
    base = RunRecord(
        run_id=run_id, experiment_id="exp", algorithm="PPO", env_id="CartPole-v1", state=RunState.PENDING,
        total_timesteps=10_000, seed=42, hyperparameters={"gamma": "0.99", "net_arch": "64,64"},
        checkpoint_interval=1000, model_path=f"/models/{run_id}/model.zip", created_at=1000.0,
    )
    return base.evolve(**changes)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[SqliteRunRegistry]:
    reg = SqliteRunRegistry(tmp_path / "db" / "runs.sqlite3")
    yield reg
    reg.close()


def test_creates_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "runs.sqlite3"
    reg = SqliteRunRegistry(path)
    reg.close()
    assert path.is_file()


def test_get_missing_is_none(registry: SqliteRunRegistry) -> None:
    assert registry.get("nope") is None


def test_insert_get_round_trip_with_every_field(registry: SqliteRunRegistry) -> None:
    record = make_record(
        "run-1", state=RunState.RUNNING, timesteps_done=512, last_checkpoint_path="/ck/run-1/checkpoint_500_steps.zip",
        error="", created_at=1700000000.123456, started_at=1700000001.5, finished_at=0.0, stop_requested=True,
        model_saved=False, hyperparameters={"learning_rate": "lin_0.001", "use_sde": "false", "ключ": "значение"},
        metrics=Metrics(mean_episode_reward=21.5, mean_episode_length=21.5, episodes_completed=7,
                        steps_per_second=1234.5, losses={"loss": 0.25, "entropy_loss": -0.69}),
    )
    registry.insert(record)
    loaded = registry.get("run-1")
    assert loaded == record
    assert loaded is not None
    assert loaded.state is RunState.RUNNING
    assert loaded.metrics.losses == {"loss": 0.25, "entropy_loss": -0.69}
    assert loaded.stop_requested is True
    assert loaded.model_saved is False


def test_insert_duplicate_run_id_fails(registry: SqliteRunRegistry) -> None:
    registry.insert(make_record("run-1"))
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        registry.insert(make_record("run-1"))


def test_update_replaces_the_record(registry: SqliteRunRegistry) -> None:
    record = make_record("run-1")
    registry.insert(record)
    registry.insert(make_record("run-2"))
    done = record.evolve(
        state=RunState.SUCCEEDED, timesteps_done=10_000, finished_at=2000.0, model_saved=True,
        metrics=Metrics(mean_episode_reward=500.0, episodes_completed=40, losses={"value_loss": 1.5}),
    )
    registry.update(done)
    assert registry.get("run-1") == done
    assert registry.get("run-2") == make_record("run-2")


def test_find_filters_and_orders_newest_first(registry: SqliteRunRegistry) -> None:
    registry.insert(make_record("a", experiment_id="x", created_at=1.0, state=RunState.SUCCEEDED))
    registry.insert(make_record("b", experiment_id="y", created_at=2.0, state=RunState.RUNNING))
    registry.insert(make_record("c", experiment_id="x", created_at=3.0, state=RunState.RUNNING))
    registry.insert(make_record("d", experiment_id="x", created_at=4.0, state=RunState.FAILED))

    def ids(run_filter: RunFilter) -> list[str]:
        return [r.run_id for r in registry.find(run_filter)]

    assert ids(RunFilter()) == ["d", "c", "b", "a"]
    assert ids(RunFilter(experiment_id="x")) == ["d", "c", "a"]
    assert ids(RunFilter(state=RunState.RUNNING)) == ["c", "b"]
    assert ids(RunFilter(experiment_id="x", state=RunState.RUNNING)) == ["c"]
    assert ids(RunFilter(experiment_id="z")) == []
    assert ids(RunFilter(state=RunState.CANCELLED)) == []
    assert ids(RunFilter(experiment_id="")) == []


def test_find_breaks_created_at_ties_by_run_id(registry: SqliteRunRegistry) -> None:
    for run_id in ("b", "c", "a"):
        registry.insert(make_record(run_id, created_at=5.0))
    assert [r.run_id for r in registry.find(RunFilter())] == ["a", "b", "c"]


def test_filter_values_are_not_sql(registry: SqliteRunRegistry) -> None:
    registry.insert(make_record("a"))
    assert registry.find(RunFilter(experiment_id="x' OR '1'='1")) == []
    assert registry.get("a") is not None


def test_attempts_round_trip_and_delete_forgets(registry: SqliteRunRegistry) -> None:
    attempts = (Attempt(1, 0, 10.0, 3000, 20.0, "server died", "the server stopped"), Attempt(2, 3000, 30.0))
    record = make_record("run-a", state=RunState.RUNNING, attempt=2, attempts=attempts)
    registry.insert(record)
    assert registry.get("run-a") == record
    registry.delete("run-a")
    assert registry.get("run-a") is None and registry.find(RunFilter()) == []
    registry.delete("run-a")  # deleting twice is harmless


# The table as the first released registry wrote it (no schema version), with one run in it.
VERSION_1 = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, experiment_id TEXT NOT NULL, algorithm TEXT NOT NULL,
    env_id TEXT NOT NULL, state TEXT NOT NULL, total_timesteps INTEGER NOT NULL, timesteps_done INTEGER NOT NULL,
    seed INTEGER NOT NULL, hyperparameters TEXT NOT NULL, checkpoint_interval INTEGER NOT NULL,
    model_path TEXT NOT NULL, last_checkpoint_path TEXT NOT NULL, error TEXT NOT NULL, metrics TEXT NOT NULL,
    created_at REAL NOT NULL, started_at REAL NOT NULL, finished_at REAL NOT NULL, stop_requested INTEGER NOT NULL,
    model_saved INTEGER NOT NULL);
CREATE INDEX runs_experiment ON runs (experiment_id, created_at);
INSERT INTO runs VALUES ('run-old', 'exp', 'PPO', 'CartPole-v1', 'SUCCEEDED', 1000, 1024, 7, '{"n_steps": "64"}',
    500, '/m/run-old/model.zip', '/c/run-old/checkpoint_1024_steps.zip', '', '{"episodes_completed": 9}',
    1.0, 2.0, 3.0, 0, 1);
"""


def test_a_registry_from_before_schema_versions_is_migrated_keeping_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite3"
    with sqlite3.connect(path) as old:
        old.executescript(VERSION_1)
    registry = SqliteRunRegistry(path)
    try:
        record = registry.get("run-old")
        assert record is not None and record.state is RunState.SUCCEEDED and record.timesteps_done == 1024
        assert record.hyperparameters == {"n_steps": "64"} and record.metrics.episodes_completed == 9
        assert record.attempt == 1 and record.attempts == ()
        registry.update(record.evolve(attempt=2))
    finally:
        registry.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    reopened = SqliteRunRegistry(path)  # a second open migrates nothing
    try:
        assert reopened.get("run-old").attempt == 2  # type: ignore[union-attr]
    finally:
        reopened.close()


def test_a_registry_from_a_newer_server_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite3"
    SqliteRunRegistry(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match=f"schema version {SCHEMA_VERSION + 1}; this server reads up to"):
        SqliteRunRegistry(path)


def test_data_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite3"
    first = SqliteRunRegistry(path)
    record = make_record("run-1", metrics=Metrics(mean_episode_reward=3.0, losses={"loss": 1.0}))
    first.insert(record)
    first.update(record.evolve(state=RunState.RUNNING, timesteps_done=64))
    first.close()

    second = SqliteRunRegistry(path)
    try:
        assert second.get("run-1") == record.evolve(state=RunState.RUNNING, timesteps_done=64)
        assert [r.run_id for r in second.find(RunFilter(state=RunState.RUNNING))] == ["run-1"]
    finally:
        second.close()


def test_usable_from_several_threads(registry: SqliteRunRegistry) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                registry.insert(make_record(f"t{n}-{i}", created_at=float(i)))
                registry.find(RunFilter(experiment_id="exp"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(registry.find(RunFilter())) == 80


def test_owner_and_evaluations_round_trip(registry: SqliteRunRegistry) -> None:
    last = Evaluation(mean_reward=120.5, std_reward=3.25, timesteps=5000, episodes=5, mean_length=120.5)
    best = Evaluation(mean_reward=200.0, std_reward=0.0, timesteps=4000, episodes=5)
    registry.insert(make_record("run-owned", owner="alice"))
    assert registry.get("run-owned").last_evaluation is None  # type: ignore[union-attr]
    registry.update(make_record("run-owned", owner="alice", last_evaluation=last, best_evaluation=best))
    got = registry.get("run-owned")
    assert got is not None
    assert (got.owner, got.last_evaluation, got.best_evaluation) == ("alice", last, best)
