"""The benchmark runner's pure helpers: statistics, formatting, interleaving and the results writer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import (
    Section,
    Table,
    fmt,
    fmt_ratio,
    goal_cell,
    interleaved,
    median,
    percentile,
    ratio,
    render_markdown,
    write_results,
)
from benchmarks.footprint import descendants, rss_kib
from benchmarks.learning import CONFIGS, _jobs

FACTS = {"cpu": "Test CPU", "cores": 2, "platform": "Linux", "versions": {"python": "3.11"}}


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    values = [5.0, 1.0, 3.0, 2.0, 8.0, 13.0, 0.5]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_and_median_edge_cases() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([4.0], 99) == 4.0
    assert math.isnan(median([]))
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0, 3.0, 4.0]) == 2.5


def test_ratio_and_formatting() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(math.nan, 1.0))
    assert fmt_ratio(1.0512) == "1.05x"
    assert fmt_ratio(math.nan) == "-"
    assert fmt(None) == "-"
    assert fmt(math.nan) == "-"
    assert fmt(12345.6) == "12,346"
    assert fmt(0.012345) == "0.0123"
    assert fmt(-73.5, 4) == "-73.5"
    assert goal_cell(True) == "met"
    assert "NOT" in goal_cell(False)
    assert goal_cell(None) == "not assessed"


def test_interleaved_rotates_the_order() -> None:
    calls: list[str] = []

    def variant(name: str) -> float:
        calls.append(name)
        return float(len(calls))

    samples = interleaved({"a": lambda: variant("a"), "b": lambda: variant("b"), "c": lambda: variant("c")}, 3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}


def test_table_markdown() -> None:
    table = Table("T", ["x", "y"], [["1", "2"]])
    assert table.markdown().splitlines() == ["**T**", "", "| x | y |", "|---|---|", "| 1 | 2 |"]


def test_write_results_merges_sections_and_renders(tmp_path: Path) -> None:
    one = Section("overhead", "1. Overhead", intro="intro text", tables=[Table("t", ["a"], [["1"]])],
                  notes=["a note"], data={"summary": [{"goal": "<= 1.05x", "measured": "1.02x", "met": True}]})
    write_results(tmp_path, [one], FACTS, quick=False, command="python -m benchmarks run --only overhead")
    two = Section("act", "3. Act", data={"summary": [{"goal": "<= 1.5x", "measured": "1.9x", "met": False}]})
    md_path, json_path = write_results(tmp_path, [two], FACTS, quick=True, command="python -m benchmarks run")
    stored = json.loads(json_path.read_text())["sections"]
    assert set(stored) == {"overhead", "act"}  # a later partial run keeps the earlier section
    assert stored["act"]["quick"] is True
    text = md_path.read_text()
    assert text.index("## 1. Overhead") < text.index("## 3. Act")
    assert "| 1. Overhead | <= 1.05x | 1.02x | met |" in text
    assert "| 3. Act | <= 1.5x | 1.9x | **NOT met** |" in text
    assert "Test CPU, 2 cores" in text and "- a note" in text and "quick mode" in text
    assert render_markdown(stored) == text


def test_learning_jobs_order_whole_seeds_first() -> None:
    jobs = _jobs([0, 1], quick=False)
    assert len(jobs) == 2 * len(CONFIGS)
    assert {seed for _, seed, _ in jobs[:len(CONFIGS)]} == {0}
    assert all(timesteps == config.timesteps for config, _, timesteps in jobs)
    assert all(timesteps < 1000 for _, _, timesteps in _jobs([0], quick=True))


def test_process_helpers_on_this_process() -> None:
    import os
    import subprocess
    import sys

    assert rss_kib(os.getpid()) > 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert child.pid in descendants(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_process_boundary_vec_env_steps_like_the_envs_it_wraps() -> None:
    from stable_baselines3.common.env_util import make_vec_env

    from benchmarks.external_env import ProcessBoundaryVecEnv

    plain = make_vec_env("CartPole-v1", n_envs=2, seed=3)
    crossing = ProcessBoundaryVecEnv(make_vec_env("CartPole-v1", n_envs=2, seed=3))
    peer = crossing._peer.process
    try:
        assert (plain.reset() == crossing.reset()).all()
        for _ in range(30):
            expected, got = plain.step([1, 0]), crossing.step([1, 0])
            assert (expected[0] == got[0]).all() and (expected[1] == got[1]).all()
        assert peer.poll() is None  # the echo peer answered every step and is still there
    finally:
        crossing.close()
        plain.close()
    assert peer.returncode == 0  # closing the socket ended it


def test_transport_floor_measures_real_round_trips(tmp_path: Path) -> None:
    from benchmarks.transport_floor import grpc_echo_us, pingpong_us

    assert 0 < pingpong_us(50) < 1e6
    echo = grpc_echo_us(f"unix:{tmp_path}/echo.sock", 50)
    assert set(echo) == {"stream", "unary"} and all(0 < us < 1e6 for us in echo.values())
    assert not (tmp_path / "echo.sock").exists()  # the echo server stopped and took its socket with it


def test_learning_records_each_finished_run_once() -> None:
    from benchmarks.learning import _record_finished
    from rl_service_proto.v1 import training_pb2 as pb

    runs = [{"run_id": "a"}, {"run_id": "b"}]
    done = pb.TrainingStatus(run_id="a", state=pb.SUCCEEDED, model_path="m.zip", started_at=10.0, finished_at=25.0,
                             timesteps_done=500)
    assert _record_finished(runs, {"a": done}) == [runs[0]]
    assert runs[0] == {"run_id": "a", "state": "SUCCEEDED", "model_path": "m.zip", "error": "",
                       "wall_seconds": 15.0, "timesteps_done": 500}
    assert "state" not in runs[1]
    assert _record_finished(runs, {"a": done}) == []  # already recorded


@pytest.mark.parametrize("algorithm", ["PPO", "A2C", "DQN"])
def test_the_bare_script_spec_is_plain_json_without_service_keys(algorithm: str) -> None:
    from benchmarks.overhead import bare_spec
    from rl_service.core.algorithms.schemas import SERVICE_KEYS

    spec = bare_spec(algorithm, "CartPole-v1", {}, 256, 0, "/tmp/x.zip")
    assert json.loads(json.dumps(spec)) == spec  # what the subprocess receives
    assert not SERVICE_KEYS & spec["kwargs"].keys()


@pytest.mark.parametrize("algorithm", ["PPO", "DQN"])
def test_the_bare_script_trains_with_the_spec(algorithm: str, tmp_path: Path) -> None:
    # Policy keywords (log_std_init) once reached the bare constructor as keyword arguments and broke CI's quick
    # benchmarks; run the script itself on a tiny budget.
    from benchmarks.overhead import bare_spec, run_bare
    from rl_service.core.algorithms.schemas import POLICY_KEYS

    spec = bare_spec(algorithm, "CartPole-v1", {"n_steps": "32", "batch_size": "32"} if algorithm == "PPO" else {},
                     64, 0, str(tmp_path / "bare.zip"))
    assert not POLICY_KEYS & spec["kwargs"].keys()
    timings = run_bare(spec)
    assert timings["learn"] > 0 and (tmp_path / "bare.zip").is_file()
