"""Jobs and worker events as versioned plain dicts: JSON round trips, refusals, and no torch to define them."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest

from rl_service.core.runs.events import (
    EVENT_VERSION,
    CheckpointSaved,
    Evaluated,
    Failed,
    Finished,
    Progress,
    Started,
    WorkerEvent,
    event_from_dict,
    event_to_dict,
)
from rl_service.core.runs.jobs import JOB_VERSION, RunJob
from rl_service.core.runs.records import Evaluation, Metrics

METRICS = Metrics(mean_episode_reward=1.5, mean_episode_length=2.5, episodes_completed=3, steps_per_second=4.0,
                  losses={"loss": 0.25})
EVENTS: list[WorkerEvent] = [
    Started("run-1", 42),
    Progress("run-1", 10, METRICS),
    CheckpointSaved("run-1", 20, "/c/checkpoint_20_steps.zip"),
    Evaluated("run-1", Evaluation(-150.25, 12.5, 20, 5, 200.0), best=True),
    Evaluated("run-1", Evaluation(1.0, 0.0, 25, 1), best=False),
    Finished("run-1", 30, METRICS, "/m/model.zip", "/c/checkpoint_30_steps.zip", stopped_early=True),
    Failed("run-1", 5, "RuntimeError: boom"),
]
JOB = RunJob(run_id="run-1", experiment_id="e", algorithm="ppo", env_id="CartPole-v1", total_timesteps=512,
             seed=3, hyperparameters={"n_steps": "64", "learning_rate": "lin_0.001"}, checkpoint_interval=100,
             model_path="/m/model.zip", progress_interval=0.5, torch_threads=1, tensorboard_dir=None,
             created_at=12.5)


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_survives_json(event: WorkerEvent) -> None:
    data = json.loads(json.dumps(event_to_dict(event)))
    assert data["version"] == EVENT_VERSION == 2 and data["kind"] == event.kind
    assert event_from_dict(data) == event


def test_a_job_survives_json() -> None:
    best = Evaluation(99.5, 1.5, 300, 5, 99.5).to_dict()
    for job in (JOB, replace(JOB, resume=True, attempt=2, save_replay_buffer=False, best_evaluation=best,
                             attempts=({"attempt": 1, "start_timesteps": 0, "outcome": "server died"},))):
        data = json.loads(json.dumps(job.to_dict()))
        assert data["version"] == JOB_VERSION == 3
        assert RunJob.from_dict(data) == job


@pytest.mark.parametrize(("data", "message"), [
    ({"version": 1, "kind": "started", "run_id": "r", "pid": 1}, "version 1"),  # an older worker's form
    ({"version": 3, "kind": "started", "run_id": "r", "pid": 1}, "version 3"),
    ({"version": 2, "kind": "exploded", "run_id": "r"}, "unknown worker event kind 'exploded'"),
    ({"version": 2, "kind": "started", "run_id": "r"}, "malformed started event"),
    ({"version": 2, "kind": "started", "run_id": "r", "pid": 1, "extra": 2}, "malformed started event"),
    ({"version": 2, "kind": "evaluated", "run_id": "r", "best": True, "evaluation": {"mean_reward": 1.0}},
     "malformed evaluated event"),
    ({"version": 2, "kind": "evaluated", "run_id": "r", "best": True, "evaluation": "1.0"},
     "malformed evaluated event"),
])
def test_malformed_events_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        event_from_dict(data)


def test_malformed_jobs_are_refused() -> None:
    with pytest.raises(ValueError, match="version 0"):
        RunJob.from_dict({**JOB.to_dict(), "version": 0})
    with pytest.raises(ValueError, match="malformed run job"):
        RunJob.from_dict({k: v for k, v in JOB.to_dict().items() if k != "seed"})


def test_defining_jobs_events_and_the_state_machine_imports_no_torch() -> None:
    code = ("import sys, rl_service.core.runs.jobs, rl_service.core.runs.events, rl_service.core.runs.state_machine;"
            "heavy = sorted(m for m in ('torch', 'stable_baselines3', 'gymnasium', 'grpc') if m in sys.modules);"
            "print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
