"""WORKER_CPUS through a real server: each run's worker process, every thread of it, trains on the least-used CPU
of the list, and a stopped run's CPU goes to the next run."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import FAST_PPO, ServerHandle
from tests.integration.test_env_server_processes import thread_cpus
from tests.unit.test_lifeline import descendants, linux_only

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def forked_workers(before: set[int]) -> set[int]:
    """Processes started since `before` by the fork server (the run workers), from /proc."""
    found = set()
    for pid in descendants(os.getpid()) - before:
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"forkserver" in Path(f"/proc/{parent}/cmdline").read_bytes():
                found.add(pid)
        except (OSError, ValueError):
            continue  # ended meanwhile
    return found


@linux_only
@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs to pin to")
def test_each_run_trains_on_its_own_cpu_of_worker_cpus(server_factory: Callable[..., ServerHandle]) -> None:
    server = server_factory(worker_cpus=f"{CPUS[1]},{CPUS[0]}", max_concurrent_runs=2)
    before = descendants(os.getpid())
    first = server.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO)
    server.wait_until(first, lambda s: s.timesteps_done > 0)
    (worker,) = forked_workers(before)
    assert thread_cpus(worker) == {str(CPUS[1])}, "the first CPU listed, for every thread of the worker"
    second = server.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO)
    server.wait_until(second, lambda s: s.timesteps_done > 0)
    (other,) = forked_workers(before) - {worker}
    assert thread_cpus(other) == {str(CPUS[0])}, "the least-used CPU"
    # Stop the run on the second CPU: once its process is reaped that CPU has no worker and the first has one, so
    # the next run goes there (were it still counted, the tie would go to the CPU listed first).
    assert server.stub.StopTraining(pb.RunRequest(run_id=second), timeout=60).state == pb.CANCELLED
    deadline = time.monotonic() + 30
    while Path(f"/proc/{other}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{other}").exists(), "the stopped run's worker was not reaped"
    third = server.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO)
    server.wait_until(third, lambda s: s.timesteps_done > 0)
    (newest,) = forked_workers(before) - {worker}
    assert thread_cpus(newest) == {str(CPUS[0])}, "the CPU the stopped run gave back"
    for run_id in (first, third):
        server.stub.StopTraining(pb.RunRequest(run_id=run_id), timeout=60)
