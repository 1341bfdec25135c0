"""Section 9, ray: the same PPO run under EXECUTOR=local and EXECUTOR=ray (a local Ray instance the server
starts), side by side, servers started alternately.

- Throughput: the run's steps/s as its worker measures them (final status), and wall-clock timesteps per second
  from StartTraining to the final status. Goal: ray >= 0.95x local.
- Time to first progress: StartTraining to the first status with timesteps_done > 0 (polled every 10 ms): a worker
  process (local, forkserver) against an actor to place and start (ray).
- Ray's own cost: process start to health SERVING of each server, the seconds the server spent starting its
  Ray instance (its "ray executor ready" log line), and the resident memory of the server's process tree when
  idle (for ray: the GCS, raylet, agents and idle workers the local instance runs).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Section, Table, fmt, fmt_ratio, median, ratio, start_server_process, training_stub
from benchmarks.footprint import descendants, rss_kib

HYPER = {"n_envs": "8", "n_steps": "32", "batch_size": "256", "n_epochs": "20", "learning_rate": "lin_0.001",
         "clip_range": "lin_0.2", "gae_lambda": "0.8", "gamma": "0.98"}
EXECUTORS = ("local", "ray")
GOAL = 0.95


def _tree_rss_mib(pid: int) -> float:
    return (rss_kib(pid) + sum(rss_kib(p) for p in descendants(pid))) / 1024


def _ray_start_seconds(log_path: Path) -> float | None:
    for line in log_path.read_text(errors="replace").splitlines():
        if '"ray executor ready"' in line:
            return float(json.loads(line)["start_seconds"])
    return None


def _one(executor: str, root: Path, timesteps: int) -> dict[str, Any]:
    """Start a server with `executor`, measure it idle, train one run, stop it."""
    from rl_service_proto.v1 import training_pb2 as pb

    server = start_server_process(root, env={"EXECUTOR": executor, "RAY_CPUS_PER_RUN": "1"}, timeout=180)
    try:
        stub = training_stub(server.address)
        serving = time.perf_counter() - server.started_at
        time.sleep(1.0)
        idle_mib = _tree_rss_mib(server.process.pid)
        started = time.perf_counter()
        run_id = stub.StartTraining(pb.StartTrainingRequest(
            experiment_id="benchmark-ray", algorithm="PPO", env_id="CartPole-v1", total_timesteps=timesteps,
            seed=3, hyperparameters=HYPER, checkpoint_interval=timesteps), timeout=60).run_id
        while (status := stub.GetTrainingStatus(pb.RunRequest(run_id=run_id), timeout=30)).timesteps_done == 0:
            time.sleep(0.01)
        first_progress = time.perf_counter() - started
        while not status.is_done:
            time.sleep(0.05)
            status = stub.GetTrainingStatus(pb.RunRequest(run_id=run_id), timeout=30)
        wall = time.perf_counter() - started
    finally:
        server.stop()
    if status.state != pb.SUCCEEDED:
        raise RuntimeError(f"{executor} run ended {pb.RunState.Name(status.state)}: {status.error}")
    return {"worker_steps_per_s": status.metrics.steps_per_second, "wall_steps_per_s": status.timesteps_done / wall,
            "first_progress_s": first_progress, "serving_s": serving, "idle_tree_mib": idle_mib,
            "ray_start_s": _ray_start_seconds(server.log_path)}


def run(quick: bool, repeats: int) -> Section:
    """local against ray, `repeats` times each, alternating which goes first."""
    section = Section("ray", "9. Ray executor against local processes")
    section.intro = (__doc__ or "").split("\n\n", 1)[1].strip()
    timesteps = 2048 if quick else 50_000
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in EXECUTORS}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        for repeat in range(repeats):
            for executor in (EXECUTORS if repeat % 2 == 0 else EXECUTORS[::-1]):
                results[executor].append(_one(executor, Path(tmp) / f"{executor}-{repeat}", timesteps))
                print(f"  ray section repeat {repeat + 1}/{repeats}: {executor} "
                      f"{results[executor][-1]['worker_steps_per_s']:.0f} steps/s", flush=True)

    def med(executor: str, key: str) -> float:
        return median([r[key] for r in results[executor]])

    speed = ratio(med("ray", "worker_steps_per_s"), med("local", "worker_steps_per_s"))
    wall = ratio(med("ray", "wall_steps_per_s"), med("local", "wall_steps_per_s"))
    table = Table(f"PPO CartPole-v1, {timesteps:,} timesteps, 8 envs, {repeats} repeat(s) each, medians",
                  ["measure", "local", "ray", "ray / local"])
    for label, key in (("worker steps/s (final status)", "worker_steps_per_s"),
                       ("wall steps/s (StartTraining -> final status)", "wall_steps_per_s"),
                       ("StartTraining -> first progress (s)", "first_progress_s"),
                       ("process start -> SERVING (s)", "serving_s"),
                       ("server process tree RSS, idle (MiB)", "idle_tree_mib")):
        local, ray = med("local", key), med("ray", key)
        table.rows.append([label, fmt(local), fmt(ray), fmt_ratio(ratio(ray, local))])
    ray_start = [r["ray_start_s"] for r in results["ray"] if r["ray_start_s"] is not None]
    table.rows.append(["starting the local Ray instance (s, in start-up)", "-",
                       fmt(median(ray_start)) if ray_start else "-", "-"])
    section.tables.append(table)
    section.notes.append("The Ray server's idle tree holds the local Ray instance (GCS, raylet, dashboard agent, "
                         "runtime-env agent, prestarted idle workers); joining an existing cluster "
                         "(RAY_ADDRESS) costs the server only its driver connection.")
    met = None if quick else speed >= GOAL
    section.data = {"summary": [
        {"goal": f"ray steps/s >= {GOAL}x local", "measured": fmt_ratio(speed), "met": met},
        {"goal": "ray wall steps/s vs local (no goal set)", "measured": fmt_ratio(wall), "met": None},
        {"goal": "StartTraining -> first progress, ray vs local (no goal set)",
         "measured": f"{fmt(med('ray', 'first_progress_s'))} s vs {fmt(med('local', 'first_progress_s'))} s",
         "met": None}],
        "timesteps": timesteps, "results": results}
    return section
