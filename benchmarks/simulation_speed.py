"""Section 13, simulation_speed: PPO on CartPole-v1 through a simulation with a simulator cost per env step,
against the same training in-process, side by side in one run.

Settings: rl-baselines3-zoo's tuned PPO for CartPole-v1 (hyperparams/ppo.yml: n_envs 8, n_steps 32, batch_size 256,
gae_lambda 0.8, gamma 0.98, n_epochs 20, ent_coef 0.0, learning_rate lin_0.001, clip_range lin_0.2), one torch thread,
a fixed budget of timesteps per run. Simulator cost C = 0, 25, 100, 400 us of busy work per env step (StepCost, the
same wrapper in-process and in the env-server). Variants:

- dummy:       in-process DummyVecEnv of 8 StepCost-wrapped envs (the baseline: what a Gymnasium id trains on)
- subproc:     in-process SubprocVecEnv of the same envs (what a user would pick to use both cores)
- lockstep_tcp / lockstep_unix: the reference env-server in a subprocess (`rl-service env-server --num-envs 8
               --step-cost-us C`), one Session-stream message per vector step, over loopback TCP / a unix socket
- groups_tcp / groups_unix: the same server with two groups of 4 envs in flight (env_groups = 2)
- lockstep_tcp_2p, groups_tcp_2p / groups_unix_2p: the same, against an env-server that spreads its envs over two
               worker processes (`--processes 2`: envs 0-3 and 4-7, one group each), so the simulation uses both
               cores as SubprocVecEnv does, and the two groups' steps run at the same time

The harness builds each run as the service's worker does (rl_service.core.envs.make_vec_env, the algorithm's schema
and constructor keywords, normalizing.wrap); one run through the service itself (StartTraining against the
env-server, the final status's steps/s) shows the harness is representative. Collection time (SB3's
on_rollout_start to on_rollout_end) is reported apart from the rest (train()). The goal lines at C >= 100 take the
best two-groups variant at that cost, and name it.

The lockstep ceiling: an empty Step exchange on the Session stream with a bare gRPC echo server in its own process
(benchmarks/transport_floor.py, driven as the adapter drives it) is timed in the same run. A lockstep vector step
costs at least what it costs in-process plus one such round trip (the envs' work moves to the simulation but the
trainer still waits for it), so lockstep can reach at most t / (t + echo) of DummyVecEnv, t being DummyVecEnv's
seconds per vector step, train() included.

Budget: 20,000 timesteps per run, down from 50,000 when the `--processes 2` variants came: nine variants, four costs
and three repeats make 108 runs, estimated at about 25 minutes on two cores (6,000-step runs took about 3 s each
at C = 100, SubprocVecEnv's start adding about 6 s). `--quick`: 256 timesteps, C = 0 only.
"""

from __future__ import annotations

import importlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback

from benchmarks.common import (
    Section,
    Table,
    fmt,
    fmt_ratio,
    median,
    ratio,
    start_server_process,
    training_stub,
    wait_for_runs,
)

ENV_ID = "CartPole-v1"
N_ENVS = 8
# rl-baselines3-zoo, hyperparams/ppo.yml, CartPole-v1 (normalize: false there too), as the service's strings.
ZOO_PPO = {"n_envs": "8", "n_steps": "32", "batch_size": "256", "gae_lambda": "0.8", "gamma": "0.98",
           "n_epochs": "20", "ent_coef": "0.0", "learning_rate": "lin_0.001", "clip_range": "lin_0.2"}
COSTS_US = (0, 25, 100, 400)
QUICK_COSTS_US = (0,)
VARIANTS = ("dummy", "subproc", "lockstep_tcp", "lockstep_unix", "groups_tcp", "groups_unix", "lockstep_tcp_2p",
            "groups_tcp_2p", "groups_unix_2p")
GROUPS_VARIANTS = tuple(v for v in VARIANTS if v.startswith("groups"))
TIMESTEPS = 20_000
QUICK_TIMESTEPS = 256
GROUPS_MODULE = "rl_service.core.algorithms.env_groups"  # provided by the env-groups work; absent until it lands
NOT_AVAILABLE = "n/a (env_groups not available)"
LOCKSTEP_GOAL = 0.8  # at C = 0
GROUPS_GOAL = 1.0  # at C >= 100, and >= subproc
SEED = 7


# ---------------------------------------------------------------------------------------------------- runs


def use_env_groups() -> Callable[[Any, int], None] | None:
    """The env-groups switch (`use_env_groups(model, groups)`), or None while the module does not exist."""
    try:
        module = importlib.import_module(GROUPS_MODULE)
    except ImportError:
        return None
    function: Callable[[Any, int], None] = module.use_env_groups
    return function


class RolloutTimer(BaseCallback):
    """Adds up the time between SB3's on_rollout_start and on_rollout_end: collection, apart from train()."""

    def __init__(self) -> None:
        super().__init__()
        self.collection = 0.0
        self._started = 0.0

    def _on_rollout_start(self) -> None:
        self._started = time.perf_counter()

    def _on_rollout_end(self) -> None:
        self.collection += time.perf_counter() - self._started

    def _on_step(self) -> bool:
        return True


def build_model(env_id: str, external: Any, make_env: Callable[[], Any] | None = None) -> Any:
    """PPO with the zoo settings, built as the service's worker builds a run (same functions, same order)."""
    from rl_service.core.algorithms.normalize import OFF
    from rl_service.core.algorithms.registry import ALGORITHMS
    from rl_service.core.envs import make_vec_env
    from rl_service.core.runs import normalizing

    spec = ALGORITHMS["ppo"]
    values = spec.schema.parse(ZOO_PPO)
    env = make_env() if make_env is not None else make_vec_env(env_id, N_ENVS, SEED, external)
    env = normalizing.wrap(env, OFF, float(values["gamma"]))  # type: ignore[arg-type]
    # The worker's constructor call (rl_service/core/runs/worker.py, _Trainer.run), word for word.
    return spec.cls("MlpPolicy", env, seed=SEED, device="cpu", verbose=0,
                    **spec.constructor_kwargs(values, env.action_space))


def in_process_env(cost_us: float, subproc: bool) -> Any:
    """8 StepCost-wrapped, Monitor-wrapped envs in a DummyVecEnv or SubprocVecEnv (seeded as the worker seeds)."""
    from stable_baselines3.common.env_util import make_vec_env as sb3_make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    from rl_service.envserver.step_cost import make_costly

    return sb3_make_vec_env(partial(make_costly, ENV_ID, cost_us), n_envs=N_ENVS, seed=SEED,
                            vec_env_cls=SubprocVecEnv if subproc else DummyVecEnv)


def lockstep_ceiling(dummy_steps_per_s: float, echo_us: float, n_envs: int = N_ENVS) -> float:
    """The most lockstep can reach of DummyVecEnv's steps/s when each vector step adds one bare echo round trip."""
    per_vector_step = n_envs / dummy_steps_per_s
    return per_vector_step / (per_vector_step + echo_us * 1e-6)


def stream_echo_us(repeats: int, exchanges: int) -> list[float]:
    """Median microseconds of an empty Step exchange on the Session stream to a bare echo server, per repeat."""
    from benchmarks.transport_floor import free_port, grpc_echo_us

    target = f"127.0.0.1:{free_port()}"
    return [grpc_echo_us(target, exchanges)["stream"] for _ in range(repeats)]


def train_once(model: Any, timesteps: int) -> dict[str, float]:
    """learn() for `timesteps`; total and collection seconds, steps/s; closes the env."""
    timer = RolloutTimer()
    started = time.perf_counter()
    try:
        model.learn(total_timesteps=timesteps, callback=timer, progress_bar=False)
        total = time.perf_counter() - started
    finally:
        model.get_env().close()
    steps = int(model.num_timesteps)
    return {"steps": steps, "total_s": total, "collection_s": timer.collection,
            "train_s": total - timer.collection, "steps_per_s": steps / total,
            "collection_steps_per_s": steps / timer.collection if timer.collection > 0 else float("nan")}


def variant_parts(variant: str) -> tuple[str, str, int]:
    """mode (lockstep, groups), transport (tcp, unix) and env-server processes of a remote variant."""
    mode, transport, *spread = variant.split("_")
    return mode, transport, 2 if spread == ["2p"] else 1


@contextmanager
def env_server(cost_us: float, unix_dir: Path | None, processes: int = 1) -> Iterator[str]:
    """The reference env-server in a subprocess (8 envs over `processes`, cost_us per env step); its address."""
    where = (["--unix", str(unix_dir / f"sim-{int(cost_us)}-{processes}p.sock")] if unix_dir is not None else
             ["--port", "0"])
    process = subprocess.Popen(
        [sys.executable, "-m", "rl_service.envserver", "--env", ENV_ID, "--num-envs", str(N_ENVS),
         "--step-cost-us", str(cost_us), "--processes", str(processes), *where], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("serving "):
            raise RuntimeError(f"env-server did not start (exit {process.poll()}): {line!r}")
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        process.terminate()
        process.wait(30)


class Runner:
    """One run of each variant at one cost; the env-servers live as long as the runner."""

    def __init__(self, cost_us: float, timesteps: int, addresses: dict[tuple[str, int], str], external: Any) -> None:
        self.cost_us = cost_us
        self.timesteps = timesteps
        self.addresses = addresses  # (transport, env-server processes) -> address
        self.external = external
        self.groups = use_env_groups()

    def run(self, variant: str) -> dict[str, float] | None:
        """The figures of one run; None for a two-groups variant while env_groups is not available."""
        if variant in ("dummy", "subproc"):
            model = build_model(ENV_ID, None, partial(in_process_env, self.cost_us, variant == "subproc"))
            return train_once(model, self.timesteps)
        mode, transport, processes = variant_parts(variant)
        if mode == "groups" and self.groups is None:
            return None
        model = build_model(self.addresses[(transport, processes)], self.external)
        if mode == "groups":
            assert self.groups is not None
            self.groups(model, 2)
        return train_once(model, self.timesteps)


def through_service(address: str, timesteps: int, root: Path) -> float:
    """A PPO run through the service (a server in a subprocess) against the env-server; its final steps/s."""
    from rl_service_proto.v1 import training_pb2 as pb

    # WORKER_TORCH_THREADS is 1 by default, as the harness sets it.
    server = start_server_process(root, env={"EXTERNAL_ENV_ALLOWED_HOSTS": "127.0.0.1"})
    try:
        stub = training_stub(server.address)
        run_id = stub.StartTraining(pb.StartTrainingRequest(
            experiment_id="benchmark-simulation-speed", algorithm="PPO", env_id=address, total_timesteps=timesteps,
            seed=SEED, hyperparameters=ZOO_PPO, checkpoint_interval=timesteps), timeout=60).run_id
        status = wait_for_runs(stub, [run_id], poll=0.5, timeout=3600)[run_id]
    finally:
        server.stop()
    if status.state != pb.SUCCEEDED:
        raise RuntimeError(f"the service's run ended {pb.RunState.Name(status.state)}: {status.error}")
    return float(status.metrics.steps_per_second)


# ---------------------------------------------------------------------------------------------------- section


def run(quick: bool, repeats: int) -> Section:
    """Every variant at every cost, `repeats` times, interleaved per repeat; then the report."""
    import torch

    from rl_service.infra.external_env.address import SocketDirectory
    from rl_service.infra.external_env.connector import GrpcExternalEnvironments

    torch.set_num_threads(1)
    costs = QUICK_COSTS_US if quick else COSTS_US
    timesteps = QUICK_TIMESTEPS if quick else TIMESTEPS
    results: dict[str, dict[str, list[dict[str, float] | None]]] = {}
    service: dict[str, float] = {}
    echo_us = median(stream_echo_us(repeats, 200 if quick else 2000))
    print(f"  simulation_speed: Session-stream echo {echo_us:.0f} us", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        sockets = Path(tmp) / "sockets"
        sockets.mkdir()
        external = GrpcExternalEnvironments(socket_dir=SocketDirectory(sockets))
        for cost in costs:
            with (env_server(cost, None) as tcp, env_server(cost, sockets) as unix,
                  env_server(cost, None, 2) as tcp2, env_server(cost, sockets, 2) as unix2):
                addresses = {("tcp", 1): tcp, ("unix", 1): unix, ("tcp", 2): tcp2, ("unix", 2): unix2}
                runner = Runner(cost, timesteps, addresses, external)
                samples: dict[str, list[dict[str, float] | None]] = {v: [] for v in VARIANTS}
                for repeat in range(repeats):
                    shift = repeat % len(VARIANTS)
                    for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                        samples[variant].append(runner.run(variant))
                        done = samples[variant][-1]
                        print(f"  simulation_speed C={cost} us repeat {repeat + 1}/{repeats} {variant}: "
                              f"{fmt(done['steps_per_s']) if done else NOT_AVAILABLE} steps/s", flush=True)
                results[str(cost)] = samples
                if cost == costs[0]:
                    service = {"cost_us": cost, "steps_per_s": through_service(tcp, timesteps, Path(tmp) / "srv"),
                               "harness_steps_per_s": median([s["steps_per_s"] for s in samples["lockstep_tcp"]
                                                              if s is not None])}
    return report(results, service, timesteps, repeats, quick, echo_us)


def _median_of(samples: list[dict[str, float] | None], key: str) -> float | None:
    values = [s[key] for s in samples if s is not None]
    return median(values) if values else None


def report(results: dict[str, dict[str, list[dict[str, float] | None]]], service: dict[str, float],
           timesteps: int, repeats: int, quick: bool, echo_us: float | None = None) -> Section:
    """Tables, goal lines and the break-even from the per-run figures (and the lockstep ceiling, given the echo)."""
    section = Section("simulation_speed", "13. Simulation speed: PPO through a costly simulation against in-process")
    section.intro = (__doc__ or "").split("\n\n", 1)[1].strip()
    costs = list(results)
    medians = {c: {v: {k: _median_of(results[c][v], k) for k in ("steps_per_s", "collection_steps_per_s",
                                                                  "collection_s", "train_s")}
                   for v in VARIANTS} for c in costs}

    def cell(cost: str, variant: str, key: str) -> str:
        value, base = medians[cost][variant][key], medians[cost]["dummy"][key]
        if value is None:
            return NOT_AVAILABLE
        return f"{fmt(value)} ({fmt_ratio(ratio(value, base or float('nan')))})"

    header = ["variant"] + [f"C = {c} us" for c in costs]
    section.tables.append(Table(
        f"Steps/s over the whole run (ratio to dummy), {timesteps:,} timesteps, {repeats} repeat(s), medians",
        header, [[v] + [cell(c, v, "steps_per_s") for c in costs] for v in VARIANTS]))
    section.tables.append(Table(
        "Collection alone: steps/s between on_rollout_start and on_rollout_end (ratio to dummy)",
        header, [[v] + [cell(c, v, "collection_steps_per_s") for c in costs] for v in VARIANTS]))
    section.tables.append(Table(
        "Seconds per run: collection / the rest (train() and logging)", header,
        [[v] + [("-" if medians[c][v]["collection_s"] is None else
                 f"{fmt(medians[c][v]['collection_s'])} / {fmt(medians[c][v]['train_s'])}") for c in costs]
         for v in VARIANTS]))
    if service:
        section.tables.append(Table(
            f"Through the service at C = {service['cost_us']} us (StartTraining against the env-server over TCP)",
            ["measure", "steps/s"],
            [["service run, final status", fmt(service["steps_per_s"])],
             ["harness, lockstep_tcp (median)", fmt(service["harness_steps_per_s"])],
             ["service / harness", fmt_ratio(ratio(service["steps_per_s"], service["harness_steps_per_s"]))]]))
    ceilings = {c: lockstep_ceiling(base, echo_us) for c in costs
                if echo_us is not None and (base := medians[c]["dummy"]["steps_per_s"]) is not None}
    if ceilings:
        section.tables.append(Table(
            f"Lockstep against its ceiling: DummyVecEnv's time per vector step plus one bare Session-stream echo "
            f"({echo_us:.0f} us, median of {repeats})", ["measure", *header[1:]],
            [["ceiling (ratio to dummy)"] + [fmt_ratio(ceilings[c]) for c in costs],
             ["lockstep_tcp (ratio to dummy)"] + [fmt_ratio(r) if (r := _ratio(medians, c, "lockstep_tcp"))
                                                   is not None else "-" for c in costs]]))
    summary = _goals(medians, costs, quick, ceilings)
    section.notes.extend(_break_even(medians, costs))
    section.data = {"summary": summary, "timesteps": timesteps, "repeats": repeats, "results": results,
                    "medians": medians, "service": service, "stream_echo_us": echo_us, "lockstep_ceiling": ceilings}
    return section


def _ratio(medians: dict[str, Any], cost: str, variant: str, to: str = "dummy") -> float | None:
    value, base = medians[cost][variant]["steps_per_s"], medians[cost][to]["steps_per_s"]
    return None if value is None or base is None else ratio(value, base)


def _goals(medians: dict[str, Any], costs: list[str], quick: bool,
           ceilings: dict[str, float] | None = None) -> list[dict[str, Any]]:
    summary: list[dict[str, Any]] = []
    if "0" in costs:
        r = _ratio(medians, "0", "lockstep_tcp")
        ceiling = (ceilings or {}).get("0")
        summary.append({"goal": f"C = 0: remote lockstep (TCP) >= {LOCKSTEP_GOAL}x in-process DummyVecEnv",
                        "measured": fmt_ratio(r if r is not None else float("nan")) + (
                            "" if ceiling is None else f" (ceiling over a bare stream echo {fmt_ratio(ceiling)})"),
                        "met": None if quick or r is None else r >= LOCKSTEP_GOAL})
    for cost in costs:
        if int(cost) < 100:
            continue
        goal = f"C = {cost} us: two groups (best variant) >= {GROUPS_GOAL}x DummyVecEnv and >= SubprocVecEnv"
        measured = {v: r for v in GROUPS_VARIANTS if (r := _ratio(medians, cost, v)) is not None}
        vs_subproc = None
        if measured:
            best = max(measured, key=lambda v: measured[v])
            vs_subproc = _ratio(medians, cost, best, "subproc")
        if not measured or vs_subproc is None:
            summary.append({"goal": goal, "measured": NOT_AVAILABLE, "met": None})
            continue
        r = measured[best]
        summary.append({"goal": goal, "variant": best,
                        "measured": f"{best}: {fmt_ratio(r)} of dummy, {fmt_ratio(vs_subproc)} of subproc",
                        "met": None if quick else (r >= GROUPS_GOAL and vs_subproc >= 1.0)})
    return summary


def _break_even(medians: dict[str, Any], costs: list[str]) -> list[str]:
    """Where each remote variant first reaches the in-process DummyVecEnv, by linear interpolation between costs."""
    notes = []
    for variant in VARIANTS[1:]:
        points = [(int(c), r) for c in costs if (r := _ratio(medians, c, variant)) is not None]
        if not points:
            notes.append(f"Break-even, {variant}: {NOT_AVAILABLE}.")
            continue
        where = None
        for (c0, r0), (c1, r1) in itertools.pairwise(points):
            if r0 < 1.0 <= r1:
                where = c0 + (1.0 - r0) * (c1 - c0) / (r1 - r0)
                break
        if points[0][1] >= 1.0:
            text = f"at or below C = {points[0][0]} us (already {fmt_ratio(points[0][1])})"
        elif where is not None:
            text = f"about C = {where:.0f} us per env step (linear between the measured costs)"
        else:
            text = f"not reached up to C = {points[-1][0]} us ({fmt_ratio(points[-1][1])} there)"
        notes.append(f"Break-even with in-process DummyVecEnv, {variant}: {text}.")
    return notes
