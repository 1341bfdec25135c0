"""rl_service.infra.sqlite_run_registry: persistence, filters, ordering and start-up recovery."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rl_service.core.runs.records import Metrics, RunFilter, RunRecord, RunState
from rl_service.infra.sqlite_run_registry import SqliteRunRegistry


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


def test_mark_interrupted(registry: SqliteRunRegistry) -> None:
    registry.insert(make_record("pending"))
    registry.insert(make_record("running", state=RunState.RUNNING,
                                last_checkpoint_path="/ck/running/checkpoint_3000_steps.zip"))
    terminal = {
        state: make_record(f"t-{state.name}", state=state, finished_at=99.0, error="old")
        for state in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.INTERRUPTED)
    }
    for record in terminal.values():
        registry.insert(record)

    changed = registry.mark_interrupted("the server restarted")
    assert sorted(r.run_id for r in changed) == ["pending", "running"]

    running = registry.get("running")
    assert running is not None
    assert running.state is RunState.INTERRUPTED
    assert "the server restarted" in running.error
    assert "RUNNING" in running.error
    assert "/ck/running/checkpoint_3000_steps.zip" in running.error
    assert running.finished_at > 0

    pending = registry.get("pending")
    assert pending is not None
    assert pending.state is RunState.INTERRUPTED
    assert "PENDING" in pending.error
    assert "last checkpoint: none" in pending.error

    for record in terminal.values():
        assert registry.get(record.run_id) == record
    assert registry.mark_interrupted("again") == []


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
