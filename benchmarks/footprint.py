"""Section 6, footprint: time from process start to health SERVING, resident memory of an idle server and of
each run's worker, and total training throughput with 1 and 2 concurrent runs.

- Start-up: `python server.py --port 0` in a subprocess; the clock starts at Popen, the port is read from the
  "server started" JSON log line, then grpc.health.v1 Check is polled until SERVING.
- Memory: VmRSS from /proc/<pid>/status. Workers are found by walking /proc (the parent pid in /proc/<pid>/stat):
  the server's child whose command line is multiprocessing's forkserver, and that forkserver's children, one
  process per run (they inherit the forkserver's command line, so they are told apart by their parent). The
  forkserver itself is reported apart (it is idle, shared by all runs, and exists from start-up).
- Scaling: the same PPO CartPole run alone, then two at once (MAX_CONCURRENT_RUNS=2); total throughput is the
  sum of timesteps over the wall time from the first StartTraining to the last final status.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Section, Table, fmt, fmt_ratio, median, ratio, start_server_process, training_stub

SCALING_HYPER = {"n_envs": "8", "n_steps": "32", "batch_size": "256", "n_epochs": "20", "learning_rate": "lin_0.001",
                 "clip_range": "lin_0.2", "gae_lambda": "0.8", "gamma": "0.98"}


def rss_kib(pid: int) -> int:
    """Resident set size in KiB (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process whose parent chain leads to `root`."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents[int(entry)] = (ppid, cmd)
    found: dict[int, tuple[int, str]] = {}
    for pid in parents:
        chain, cur = [], pid
        while cur in parents and cur not in (0, 1, root) and len(chain) < 64:
            chain.append(cur)
            cur = parents[cur][0]
        if cur == root and pid != root:
            found[pid] = parents[pid]
    return found


def _workers(server_pid: int) -> list[int]:
    """The run processes: children of the server's forkserver (they inherit its command line, so they are told
    apart by their parent, not their name)."""
    tree = descendants(server_pid)
    forkservers = {pid for pid, (ppid, cmd) in tree.items() if ppid == server_pid and "forkserver" in cmd}
    return [pid for pid, (ppid, _) in tree.items() if ppid in forkservers]


def _health_serving(address: str, deadline: float) -> float:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter()
            except grpc.RpcError:
                pass
            time.sleep(0.01)
    finally:
        channel.close()
    raise RuntimeError("server never reported SERVING")


def _runs(stub: Any, count: int, timesteps: int) -> tuple[float, list[Any]]:
    from rl_service_proto.v1 import training_pb2 as pb

    started = time.perf_counter()
    ids = [stub.StartTraining(pb.StartTrainingRequest(
        experiment_id="benchmark-footprint", algorithm="PPO", env_id="CartPole-v1", total_timesteps=timesteps,
        seed=i, hyperparameters=SCALING_HYPER, checkpoint_interval=timesteps), timeout=60).run_id
        for i in range(count)]
    finals = [list(stub.WatchTraining(pb.RunRequest(run_id=i), timeout=1800))[-1] for i in ids]
    return time.perf_counter() - started, finals


def run(quick: bool, repeats: int) -> Section:
    """Start-up times, memory, 1-vs-2 scaling."""
    from rl_service_proto.v1 import training_pb2 as pb

    section = Section("footprint", "6. Footprint: start-up, memory, concurrent runs")
    section.intro = (__doc__ or "").split("\n\n", 1)[1].strip()
    startup: list[float] = []
    memory: dict[str, list[int]] = {"server_idle": [], "forkserver": [], "server_during_run": [], "worker": []}
    scaling: dict[int, list[float]] = {1: [], 2: []}
    timesteps = 256 if quick else 10_000
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
        for repeat in range(repeats):
            server = start_server_process(Path(tmp) / f"s{repeat}", "--max-concurrent-runs", "2")
            try:
                serving = _health_serving(server.address, time.monotonic() + 60)
                startup.append(serving - server.started_at)
                time.sleep(0.5)
                memory["server_idle"].append(rss_kib(server.process.pid))
                for pid, (ppid, cmd) in descendants(server.process.pid).items():
                    if ppid == server.process.pid and "forkserver" in cmd:
                        memory["forkserver"].append(rss_kib(pid))
                stub = training_stub(server.address)
                for count in ((1, 2) if repeat % 2 == 0 else (2, 1)):
                    if count == 1:
                        # Sample the worker's memory part-way through a lone run.
                        run_id = stub.StartTraining(pb.StartTrainingRequest(
                            experiment_id="benchmark-footprint", algorithm="PPO", env_id="CartPole-v1",
                            total_timesteps=timesteps, seed=99, hyperparameters=SCALING_HYPER,
                            checkpoint_interval=timesteps), timeout=60).run_id
                        peak, server_rss = 0, 0
                        while not stub.GetTrainingStatus(pb.RunRequest(run_id=run_id), timeout=30).is_done:
                            workers = _workers(server.process.pid)
                            peak = max([peak] + [rss_kib(p) for p in workers])
                            server_rss = max(server_rss, rss_kib(server.process.pid))
                            time.sleep(0.1)
                        if peak:
                            memory["worker"].append(peak)
                        memory["server_during_run"].append(server_rss)
                    wall, finals = _runs(stub, count, timesteps)
                    scaling[count].append(sum(f.timesteps_done for f in finals) / wall)
                    print(f"  footprint repeat {repeat + 1}/{repeats}: {count} run(s) {scaling[count][-1]:.0f} "
                          "steps/s", flush=True)
            finally:
                server.stop()
    mib = {k: median(v) / 1024 for k, v in memory.items()}
    t = Table(f"Start-up and memory ({repeats} server starts, medians)", ["measure", "value"])
    t.rows += [["process start -> health SERVING", f"{fmt(median(startup))} s (all: "
                f"{', '.join(fmt(s) for s in startup)})"],
               ["server RSS, idle", f"{fmt(mib['server_idle'])} MiB"],
               ["forkserver RSS (shared by all runs; exists from start-up)", f"{fmt(mib['forkserver'])} MiB"],
               ["server RSS during a run (peak sampled)", f"{fmt(mib['server_during_run'])} MiB"],
               ["per active run: worker process RSS (peak sampled, PPO CartPole 8 envs)",
                f"{fmt(mib['worker'])} MiB"]]
    section.tables.append(t)
    one, two = median(scaling[1]), median(scaling[2])
    t2 = Table(f"Total throughput, PPO CartPole-v1 (zoo settings), {timesteps:,} timesteps per run, "
               f"{repeats} repeats, order alternated", ["concurrent runs", "total steps/s", "vs 1 run"])
    t2.rows += [["1", fmt(one), "1.00x"], ["2", fmt(two), fmt_ratio(ratio(two, one))]]
    section.tables.append(t2)
    section.notes.append("Worker RSS counts pages shared with the forkserver (copy-on-write torch and "
                         "stable-baselines3 imports) in full, so summing it over runs over-counts.")
    load = os.getloadavg()
    section.notes.append(f"Load average when this section ended: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min) "
                         "on 2 cores: 2-run scaling can only be near 2x on otherwise idle cores.")
    section.data = {"summary": [
        {"goal": "start-up to SERVING (no goal set)", "measured": f"{fmt(median(startup))} s", "met": None},
        {"goal": "1 -> 2 concurrent runs on 2 cores (no goal set)", "measured": fmt_ratio(ratio(two, one)),
         "met": None}],
        "startup_s": startup, "memory_kib": memory, "scaling_steps_per_s": scaling, "timesteps": timesteps}
    return section
