"""Section 7, chaos: kill -9 the whole server process group at random moments while runs train and a named
policy takes batches, restart the server with the same command, and check that nothing learnt is lost.

One server (its own process group) trains a PPO run (rl-baselines3-zoo CartPole-v1 settings, 100k timesteps) and
a DQN run (zoo CartPole-v1 settings, 50k), while a client thread sends REINFORCE batches to a named policy and
records the `durable_version` of every reply. At random moments the runner SIGKILLs the server's whole process
group (server, fork server, workers) and starts the same command again on the same DATA_DIR. It reports: whether
the runs finished, the timesteps trained twice per kill (what the last status before the kill said against where
the next attempt started) beside the checkpoint interval, the final 10-episode deterministic return of the killed
PPO run beside one trained without kills afterwards, and the named policy's version after each restart against
the last durable_version it replied.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Section, ServerProcess, Table, fmt, start_server_process, training_stub
from benchmarks.learning import CONFIGS, evaluate

KILLS, QUICK_KILLS = 20, 2
PPO_INTERVAL, DQN_INTERVAL = 10_000, 5_000
POLICY_ID = "chaos-policy"


def _config(key: str) -> Any:
    return next(c for c in CONFIGS if c.key == key)


def _start(data: Path) -> ServerProcess:
    # Its own process group, so that one killpg takes the server with everything it started.
    return start_server_process(data, "--max-concurrent-runs", "3", new_session=True)


class PolicyClient:
    """Sends one-episode REINFORCE batches to the named policy; remembers the newest durable_version replied."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.durable = 0
        self.batches = 0
        self.refused = 0  # batches lost to a dead server (no reply: never acknowledged)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def last_durable(self) -> int:
        with self._lock:
            return self.durable

    def _loop(self) -> None:
        import grpc
        import numpy as np

        from rl_service_proto.v1 import policy_pb2 as pb
        from rl_service_proto.v1 import policy_pb2_grpc

        rng = np.random.default_rng(0)
        while not self._stop.is_set():
            address = self.address
            with grpc.insecure_channel(address) as channel:
                stub = policy_pb2_grpc.PolicyServiceStub(channel)
                while not self._stop.is_set() and address == self.address:
                    length = int(rng.integers(10, 60))
                    batch = pb.TrainingBatch(policy_id=POLICY_ID, states=rng.uniform(-1, 1, 4 * length).tolist(),
                                             actions=rng.integers(0, 2, length).astype(float).tolist(),
                                             rewards=[1.0] * length, dones=[False] * (length - 1) + [True])
                    try:
                        reply = stub.SendTrainingBatch(batch, timeout=10)
                    except grpc.RpcError:
                        self.refused += 1
                        time.sleep(0.2)
                        continue
                    with self._lock:
                        self.durable = max(self.durable, reply.durable_version)
                        self.batches += 1


def _policy_version(address: str) -> int:
    import grpc

    from rl_service_proto.v1 import policy_pb2 as pb
    from rl_service_proto.v1 import policy_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return int(policy_pb2_grpc.PolicyServiceStub(channel).GetPolicy(
            pb.PolicyRequest(policy_id=POLICY_ID), timeout=30).version)


def _create_policy(address: str) -> None:
    import grpc

    from rl_service_proto.v1 import policy_pb2 as pb
    from rl_service_proto.v1 import policy_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        policy_pb2_grpc.PolicyServiceStub(channel).CreatePolicy(pb.CreatePolicyRequest(
            policy_id=POLICY_ID, spec=pb.PolicySpec(observation_shape=[4], discrete_n=2, seed=0,
                                                    hyperparameters={"learning_rate": "0.002"})), timeout=30)


def _start_run(stub: Any, key: str, timesteps: int, interval: int) -> str:
    from rl_service_proto.v1 import training_pb2 as pb

    config = _config(key)
    return str(stub.StartTraining(pb.StartTrainingRequest(
        experiment_id="chaos", algorithm=config.algorithm, env_id=config.env_id, total_timesteps=timesteps,
        seed=0, hyperparameters=config.hyperparameters, checkpoint_interval=interval), timeout=60).run_id)


def _status(stub: Any, run_id: str) -> Any:
    from rl_service_proto.v1 import training_pb2 as pb

    return stub.GetTrainingStatus(pb.RunRequest(run_id=run_id), timeout=30)


def _wait_attempt_started(stub: Any, run_id: str, attempt: int, timeout: float = 120) -> Any:
    """The run's status once its given attempt has been launched (it starts at the checkpoint it resumes from),
    or once the run has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(stub, run_id)
        if status.is_done or len(status.attempts) >= attempt:
            return status
        time.sleep(0.2)
    raise RuntimeError(f"{run_id} did not start attempt {attempt} within {timeout:g}s")


def _wait_done(stub: Any, run_ids: list[str], timeout: float = 3600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = {run_id: _status(stub, run_id) for run_id in run_ids}
        if all(s.is_done for s in statuses.values()):
            return statuses
        time.sleep(1.0)
    raise RuntimeError("runs did not finish in time")


def run(quick: bool, output: Path) -> Section:
    """Kill and restart the server `KILLS` times (2 in quick mode) while two runs train and a policy learns."""
    section = Section("chaos", "7. Chaos: kill -9 of the server's process group, then a plain restart")
    section.intro = (__doc__ or "").split("\n\n", 1)[1].strip()
    kills = QUICK_KILLS if quick else KILLS
    budgets = {"PPO/CartPole-v1": 4_000 if quick else 100_000, "DQN/CartPole-v1": 3_000 if quick else 50_000}
    intervals = {"PPO/CartPole-v1": 1_000 if quick else PPO_INTERVAL, "DQN/CartPole-v1": 1_000 if quick else
                 DQN_INTERVAL}
    rng = random.Random(20261130)
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
        data = Path(tmp) / "server"
        server = _start(data)
        stub = training_stub(server.address)
        runs = {key: _start_run(stub, key, budgets[key], intervals[key]) for key in budgets}
        _create_policy(server.address)
        client = PolicyClient(server.address)
        client.start()
        twice: dict[str, list[int]] = {key: [] for key in runs}
        versions: list[tuple[int, int]] = []  # (last durable_version replied before the kill, version after)
        restart_seconds: list[float] = []
        try:
            for _ in range(kills):
                statuses = {key: _status(stub, run_id) for key, run_id in runs.items()}
                if all(s.is_done for s in statuses.values()):
                    break
                time.sleep(rng.uniform(1.0, 3.0) if quick else rng.uniform(3.0, 12.0))
                before = {key: _status(stub, run_id) for key, run_id in runs.items()}
                durable = client.last_durable()
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait(30)
                started = time.perf_counter()
                server = _start(data)
                restart_seconds.append(time.perf_counter() - started)
                client.address = server.address
                stub = training_stub(server.address)
                versions.append((durable, _policy_version(server.address)))
                for key, run_id in runs.items():
                    if before[key].is_done:
                        continue
                    after = _wait_attempt_started(stub, run_id, len(before[key].attempts) + 1)
                    if not after.is_done:
                        twice[key].append(max(0, before[key].timesteps_done - after.attempts[-1].start_timesteps))
            client.stop()
            final = _wait_done(stub, list(runs.values()))
            ppo_key = "PPO/CartPole-v1"
            control = _start_run(stub, ppo_key, budgets[ppo_key], intervals[ppo_key])
            control_final = _wait_done(stub, [control])[control]
            killed_returns = evaluate(final[runs[ppo_key]].model_path, "PPO", "CartPole-v1")
            control_returns = evaluate(control_final.model_path, "PPO", "CartPole-v1")
        finally:
            client.stop()
            server.stop()
    done = sum(1 for s in final.values() if s.state == 3)
    table = Table(f"{len(restart_seconds)} kills of the whole process group, each followed by the same command",
                  ["run", "final state", "attempts", "timesteps", "trained twice per kill: median", "max",
                   "checkpoint interval"])
    for key, run_id in runs.items():
        status = final[run_id]
        lost = twice[key]
        table.rows.append([key, _state_name(status.state), str(status.attempt), f"{status.timesteps_done:,}",
                           f"{statistics.median(lost):,.0f}" if lost else "-", f"{max(lost):,}" if lost else "-",
                           f"{intervals[key]:,}"])
    section.tables.append(table)
    quality = Table("PPO CartPole-v1: final model, 10 deterministic episodes (env seeds 10000..10009)",
                    ["run", "mean return", "min"])
    quality.rows.append(["killed and resumed", fmt(statistics.mean(killed_returns), 4), fmt(min(killed_returns), 4)])
    quality.rows.append(["never killed", fmt(statistics.mean(control_returns), 4), fmt(min(control_returns), 4)])
    section.tables.append(quality)
    older = sum(1 for durable, after in versions if after < durable)
    section.notes.append(
        f"Named policy: {client.batches} batches acknowledged, {client.refused} sent to a dead server; after each "
        f"restart its version against the last durable_version replied: {older} of {len(versions)} older "
        f"(pairs: {', '.join(f'{d}->{a}' for d, a in versions)}).")
    section.notes.append(f"{done} of {len(runs)} runs SUCCEEDED. Restart to serving: median "
                         f"{statistics.median(restart_seconds):.1f} s." if restart_seconds else "No kill happened.")
    section.data = {
        "kills": len(restart_seconds), "runs": {key: {"state": _state_name(final[r].state),
                                                       "attempts": final[r].attempt,
                                                       "timesteps": final[r].timesteps_done,
                                                       "trained_twice": twice[key]} for key, r in runs.items()},
        "killed_returns": killed_returns, "control_returns": control_returns, "policy_versions": versions,
        "restart_seconds": restart_seconds, "policy_batches": client.batches,
    }
    return section


def _state_name(state: int) -> str:
    from rl_service_proto.v1 import training_pb2 as pb

    return str(pb.RunState.Name(state))
