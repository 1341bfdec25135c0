"""The run registry on SQLite (stdlib sqlite3): one file under DATA_DIR, safe across threads.

The schema is versioned with SQLite's `user_version`; opening a file of an older version applies each migration
in order, in one transaction, so an upgraded server keeps every run. A file of a newer version is refused.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from rl_service.core.runs.records import Attempt, Evaluation, Metrics, RunFilter, RunRecord, RunState

# Version 1: the first table (files written before versioning have user_version 0 and this table).
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    experiment_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    env_id TEXT NOT NULL,
    state TEXT NOT NULL,
    total_timesteps INTEGER NOT NULL,
    timesteps_done INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    hyperparameters TEXT NOT NULL,
    checkpoint_interval INTEGER NOT NULL,
    model_path TEXT NOT NULL,
    last_checkpoint_path TEXT NOT NULL,
    error TEXT NOT NULL,
    metrics TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    stop_requested INTEGER NOT NULL,
    model_saved INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_experiment ON runs (experiment_id, created_at);
"""
# Each entry takes the schema from version i to i + 1 (MIGRATIONS[0]: nothing -> 1).
MIGRATIONS: tuple[str, ...] = (
    _SCHEMA_V1,
    # 2: resumable runs: the attempt a run is on, and every attempt so far (JSON list).
    """
    ALTER TABLE runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE runs ADD COLUMN attempts TEXT NOT NULL DEFAULT '[]';
    CREATE INDEX IF NOT EXISTS runs_state ON runs (state, created_at);
    """,
    # 3: who started a run (a token's name), and its last and best evaluations (JSON objects, '' for none).
    """
    ALTER TABLE runs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE runs ADD COLUMN last_evaluation TEXT NOT NULL DEFAULT '';
    ALTER TABLE runs ADD COLUMN best_evaluation TEXT NOT NULL DEFAULT '';
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = (
    "run_id", "experiment_id", "algorithm", "env_id", "state", "total_timesteps", "timesteps_done", "seed",
    "hyperparameters", "checkpoint_interval", "model_path", "last_checkpoint_path", "error", "metrics",
    "created_at", "started_at", "finished_at", "stop_requested", "model_saved", "attempt", "attempts",
    "owner", "last_evaluation", "best_evaluation",
)


class SqliteRunRegistry:
    """RunRegistry on one SQLite file (WAL mode); one connection guarded by a lock."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._migrate(path)

    def insert(self, record: RunRecord) -> None:
        """Add a new run."""
        row = _to_row(record)
        placeholders = ",".join("?" for _ in _COLUMNS)
        with self._lock:
            self._conn.execute(f"INSERT INTO runs ({','.join(_COLUMNS)}) VALUES ({placeholders})", row)

    def update(self, record: RunRecord) -> None:
        """Replace a run's record."""
        row = _to_row(record)
        assignments = ",".join(f"{c}=?" for c in _COLUMNS[1:])
        with self._lock:
            self._conn.execute(f"UPDATE runs SET {assignments} WHERE run_id=?", (*row[1:], row[0]))

    def get(self, run_id: str) -> RunRecord | None:
        """One run, or None."""
        with self._lock:
            row = self._conn.execute(f"SELECT {','.join(_COLUMNS)} FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return _from_row(row) if row else None

    def find(self, run_filter: RunFilter) -> list[RunRecord]:
        """Matching runs, newest first."""
        clauses, params = [], []
        if run_filter.experiment_id is not None:
            clauses.append("experiment_id=?")
            params.append(run_filter.experiment_id)
        if run_filter.state is not None:
            clauses.append("state=?")
            params.append(run_filter.state.name)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        query = f"SELECT {','.join(_COLUMNS)} FROM runs{where} ORDER BY created_at DESC, run_id"
        with self._lock:
            rows = self._conn.execute(query, params).fetchall()
        return [_from_row(row) for row in rows]

    def delete(self, run_id: str) -> None:
        """Forget a run."""
        with self._lock:
            self._conn.execute("DELETE FROM runs WHERE run_id=?", (run_id,))

    def _migrate(self, path: Path) -> None:
        """Bring the file to SCHEMA_VERSION, one migration at a time, all in one transaction."""
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        if version == 0 and self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='runs'").fetchone():
            version = 1  # written before the schema was versioned
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{path} has run registry schema version {version}; this server reads up to "
                               f"{SCHEMA_VERSION} (it was written by a newer rl-service)")
        if version == SCHEMA_VERSION:
            return
        script = "".join(MIGRATIONS[version:])
        # executescript commits first; BEGIN ... COMMIT keeps the migration all-or-nothing.
        self._conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()


def _to_row(record: RunRecord) -> tuple[Any, ...]:
    return (
        record.run_id, record.experiment_id, record.algorithm, record.env_id, record.state.name,
        record.total_timesteps, record.timesteps_done, record.seed, json.dumps(dict(record.hyperparameters)),
        record.checkpoint_interval, record.model_path, record.last_checkpoint_path, record.error,
        json.dumps(record.metrics.to_dict()), record.created_at, record.started_at, record.finished_at,
        int(record.stop_requested), int(record.model_saved), record.attempt,
        json.dumps(record.attempt_dicts()), record.owner, _evaluation_json(record.last_evaluation),
        _evaluation_json(record.best_evaluation),
    )


def _evaluation_json(evaluation: Evaluation | None) -> str:
    return json.dumps(evaluation.to_dict()) if evaluation is not None else ""


def _evaluation(text: str) -> Evaluation | None:
    return Evaluation.from_dict(json.loads(text)) if text else None


def _from_row(row: tuple[Any, ...]) -> RunRecord:
    data = dict(zip(_COLUMNS, row, strict=True))
    return RunRecord(
        run_id=data["run_id"],
        experiment_id=data["experiment_id"],
        algorithm=data["algorithm"],
        env_id=data["env_id"],
        state=RunState[data["state"]],
        total_timesteps=int(data["total_timesteps"]),
        timesteps_done=int(data["timesteps_done"]),
        seed=int(data["seed"]),
        hyperparameters=json.loads(data["hyperparameters"]),
        checkpoint_interval=int(data["checkpoint_interval"]),
        model_path=data["model_path"],
        last_checkpoint_path=data["last_checkpoint_path"],
        error=data["error"],
        metrics=Metrics.from_dict(json.loads(data["metrics"])),
        created_at=float(data["created_at"]),
        started_at=float(data["started_at"]),
        finished_at=float(data["finished_at"]),
        stop_requested=bool(data["stop_requested"]),
        model_saved=bool(data["model_saved"]),
        attempt=int(data["attempt"]),
        attempts=tuple(Attempt.from_dict(item) for item in json.loads(data["attempts"])),
        owner=data["owner"],
        last_evaluation=_evaluation(data["last_evaluation"]),
        best_evaluation=_evaluation(data["best_evaluation"]),
    )
