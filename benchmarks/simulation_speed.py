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
- *_pinned:    the trainer pinned to the first CPU this process may use and the env-server (`--cpus`) to the second,
               the layout the service's WORKER_CPUS gives a run; dummy_pinned is in-process DummyVecEnv so pinned
- *_node_pinned: the same layout against examples/node-simulation (CartPole in Node.js, `--step-cost-us C`), a
               simulation that is not Python: what the trainer's side costs when the simulation's side is cheap.
               Its CartPole step is cheaper than Gymnasium's (no wrappers), an edge of a few us per env step.
               Reported beside the goals, not counted in them (they are the reference server's)

The harness builds each run as the service's worker does (rl_service.core.envs.make_vec_env, the algorithm's schema
and constructor keywords, normalizing.wrap); one run through the service itself (StartTraining against the
env-server, the final status's steps/s) shows the harness is representative. Collection time (SB3's
on_rollout_start to on_rollout_end) is reported apart from the rest (train()). The goal lines take the best lockstep
(C = 0) or two-groups (C >= 100) variant at that cost, name it, and divide by the faster of dummy and dummy_pinned.
With pinning on, the service run uses WORKER_CPUS and a pinned env-server, and is set beside lockstep_tcp_pinned.

The lockstep ceiling: an empty Step exchange on the Session stream with a bare gRPC echo server in its own process
(benchmarks/transport_floor.py, driven as the adapter drives it) is timed in the same run. A lockstep vector step
costs at least what it costs in-process plus one such round trip (the envs' work moves to the simulation but the
trainer still waits for it), so lockstep can reach at most t / (t + echo) of DummyVecEnv, t being DummyVecEnv's
seconds per vector step, train() included. It is computed for each layout, unpinned and pinned, with an echo
timed in that layout.

Budget: 20,000 timesteps per run, down from 50,000 when the `--processes 2` variants came: thirteen variants, four
costs and three repeats make 156 runs (the nine before the pinned ones took 18 minutes on two cores).
`--quick`: 256 timesteps, C = 0 only.
"""

from __future__ import annotations

import importlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from stable_baselines3.common.callbacks import BaseCallback

from benchmarks.common import (
    REPO,
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
from rl_service.infra.cpu_placement import format_cpu_list, pin_this_process, usable_cpus

ENV_ID = "CartPole-v1"
N_ENVS = 8
# rl-baselines3-zoo, hyperparams/ppo.yml, CartPole-v1 (normalize: false there too), as the service's strings.
ZOO_PPO = {"n_envs": "8", "n_steps": "32", "batch_size": "256", "gae_lambda": "0.8", "gamma": "0.98",
           "n_epochs": "20", "ent_coef": "0.0", "learning_rate": "lin_0.001", "clip_range": "lin_0.2"}
COSTS_US = (0, 25, 100, 400)
QUICK_COSTS_US = (0,)
VARIANTS = ("dummy", "subproc", "lockstep_tcp", "lockstep_unix", "groups_tcp", "groups_unix", "lockstep_tcp_2p",
            "groups_tcp_2p", "groups_unix_2p", "dummy_pinned", "lockstep_tcp_pinned", "groups_tcp_pinned",
            "groups_unix_pinned", "lockstep_tcp_node_pinned", "groups_unix_node_pinned")
IN_PROCESS = ("dummy", "dummy_pinned")  # the baselines the goals divide by (the faster of the two)
LOCKSTEP_VARIANTS = ("lockstep_tcp", "lockstep_tcp_pinned")  # those the C = 0 goal takes the best of (TCP)
# The goals are the reference server's (the issue's); the Node.js simulation's variants are reported beside them.
GROUPS_VARIANTS = tuple(v for v in VARIANTS if v.startswith("groups") and "_node" not in v)
TIMESTEPS = 20_000
QUICK_TIMESTEPS = 256
GROUPS_MODULE = "rl_service.core.algorithms.env_groups"  # provided by the env-groups work; absent until it lands
NOT_AVAILABLE = "n/a (env_groups not available)"
NO_PINNING = "n/a (fewer than two CPUs to pin to)"
NO_NODE = "n/a (node or examples/node-simulation/node_modules missing)"
NODE_SIMULATION = REPO / "examples" / "node-simulation"
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


def stream_echo_us(repeats: int, exchanges: int, layout: PinLayout | None = None) -> list[float]:
    """Median microseconds of an empty Step exchange on the Session stream to a bare echo server, per repeat; with
    `layout`, the client on the trainer's CPU and the echo server on the simulation's."""
    from benchmarks.transport_floor import free_port, grpc_echo_us

    target = f"127.0.0.1:{free_port()}"
    with pinned_to(layout.trainer if layout else None):
        return [grpc_echo_us(target, exchanges, layout.simulation if layout else None)["stream"]
                for _ in range(repeats)]


class PinLayout(NamedTuple):
    """Where the pinned variants run: the trainer on one CPU, the simulation on another."""

    trainer: frozenset[int]
    simulation: frozenset[int]


def pin_layout() -> PinLayout | None:
    """The first two CPUs this process may use, trainer first; None where there are fewer or none can be pinned."""
    usable = usable_cpus()
    if usable is None or len(usable) < 2:
        return None
    first, second = sorted(usable)[:2]
    return PinLayout(frozenset({first}), frozenset({second}))


@contextmanager
def pinned_to(cpus: frozenset[int] | None) -> Iterator[None]:
    """Every thread of this process on `cpus` (as a pinned worker process is) until the block ends; None: as is."""
    if cpus is None:
        yield
        return
    before = frozenset(os.sched_getaffinity(0))
    pin_this_process(cpus)
    try:
        yield
    finally:
        pin_this_process(before)


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


class Variant(NamedTuple):
    """What a variant's name says: mode (dummy, subproc, lockstep, groups), transport (tcp, unix; '' in-process),
    env-server processes, whether the trainer and the simulation are pinned, and the simulation (python: the
    reference env-server, node: examples/node-simulation)."""

    mode: str
    transport: str
    processes: int
    pinned: bool
    server: str = "python"


def variant_parts(variant: str) -> Variant:
    """The parts of a variant's name."""
    words = variant.split("_")
    pinned = words[-1] == "pinned"
    if pinned:
        words.pop()
    server = "node" if words[-1] == "node" else "python"
    if server == "node":
        words.pop()
    mode, transport, *spread = [*words, ""] if len(words) == 1 else words
    return Variant(mode, transport, 2 if spread == ["2p"] else 1, pinned, server)


def unavailable(variant: str) -> str:
    """Why a variant has no figures."""
    parts = variant_parts(variant)
    if parts.server == "node":
        return NO_NODE
    return NO_PINNING if parts.pinned else NOT_AVAILABLE


def node_available() -> bool:
    """Whether examples/node-simulation can run here (node on PATH, its dependencies installed)."""
    return shutil.which("node") is not None and (NODE_SIMULATION / "node_modules").is_dir()


@contextmanager
def env_server(cost_us: float, unix_dir: Path | None, processes: int = 1,
               cpus: frozenset[int] | None = None) -> Iterator[str]:
    """The reference env-server in a subprocess (8 envs over `processes`, cost_us per env step, pinned to `cpus`
    when given); its address."""
    name = f"sim-{int(cost_us)}-{processes}p{'-pinned' if cpus else ''}.sock"
    where = ["--unix", str(unix_dir / name)] if unix_dir is not None else ["--port", "0"]
    pin = ["--cpus", format_cpu_list(cpus)] if cpus else []
    with _serving(subprocess.Popen(
            [sys.executable, "-m", "rl_service.envserver", "--env", ENV_ID, "--num-envs", str(N_ENVS),
             "--step-cost-us", str(cost_us), "--processes", str(processes), *where, *pin], stdout=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}), "env-server") as address:
        yield address


# exec a command with this process's CPUs set first (what `taskset` does, without needing it installed)
_PIN_AND_EXEC = "import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); " \
                "os.execvp(sys.argv[2], sys.argv[2:])"


@contextmanager
def node_env_server(cost_us: float, unix_dir: Path | None, cpus: frozenset[int] | None = None) -> Iterator[str]:
    """examples/node-simulation in a subprocess (8 envs, cost_us per env step, on `cpus` when given); its
    address."""
    node = shutil.which("node")
    assert node is not None
    where = ["--unix", str(unix_dir / f"node-{int(cost_us)}.sock")] if unix_dir is not None else ["--port", "0"]
    pin = [sys.executable, "-c", _PIN_AND_EXEC, ",".join(map(str, sorted(cpus)))] if cpus else []
    with _serving(subprocess.Popen(
            [*pin, node, "server.js", "--num-envs", str(N_ENVS), "--step-cost-us", str(cost_us), *where],
            cwd=NODE_SIMULATION, stdout=subprocess.PIPE, text=True), "the Node.js simulation") as address:
        yield address


@contextmanager
def _serving(process: subprocess.Popen[str], what: str) -> Iterator[str]:
    """The address a simulation announces on its first line ("serving ... on ADDRESS"); terminated at the end."""
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("serving "):
            raise RuntimeError(f"{what} did not start (exit {process.poll()}): {line!r}")
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        process.terminate()
        process.wait(30)


class Runner:
    """One run of each variant at one cost; the env-servers live as long as the runner."""

    def __init__(self, cost_us: float, timesteps: int, addresses: dict[tuple[str, int, bool, str], str],
                 external: Any, layout: PinLayout | None = None) -> None:
        self.cost_us = cost_us
        self.timesteps = timesteps
        self.addresses = addresses  # (transport, env-server processes, pinned, server) -> address
        self.external = external
        self.groups = use_env_groups()
        self.layout = layout  # None: the pinned variants cannot run here

    def run(self, variant: str) -> dict[str, float] | None:
        """The figures of one run; None for a two-groups variant while env_groups is not available, or a pinned
        one where nothing can be pinned."""
        parts = variant_parts(variant)
        remote = parts.mode not in ("dummy", "subproc")
        key = (parts.transport, parts.processes, parts.pinned, parts.server)
        if ((parts.mode == "groups" and self.groups is None) or (parts.pinned and self.layout is None)
                or (remote and key not in self.addresses)):  # no env_groups, nothing to pin, no node here
            return None
        # The whole run on the trainer's CPU: the model, the channel and its threads are made inside the block.
        with pinned_to(self.layout.trainer if parts.pinned and self.layout else None):
            if parts.mode in ("dummy", "subproc"):
                model = build_model(ENV_ID, None, partial(in_process_env, self.cost_us, parts.mode == "subproc"))
                return train_once(model, self.timesteps)
            model = build_model(self.addresses[key], self.external)
            if parts.mode == "groups":
                assert self.groups is not None
                self.groups(model, 2)
            return train_once(model, self.timesteps)


def through_service(address: str, timesteps: int, root: Path, worker_cpus: frozenset[int] | None = None) -> float:
    """A PPO run through the service (a server in a subprocess) against the env-server, its worker pinned to
    `worker_cpus` (WORKER_CPUS) when given; the final steps/s."""
    from rl_service_proto.v1 import training_pb2 as pb

    # WORKER_TORCH_THREADS is 1 by default, as the harness sets it.
    pin = {"WORKER_CPUS": format_cpu_list(worker_cpus)} if worker_cpus else {}
    server = start_server_process(root, env={"EXTERNAL_ENV_ALLOWED_HOSTS": "127.0.0.1", **pin})
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


# (transport, env-server processes, pinned, simulation) of each simulation a cost needs
SERVERS = (("tcp", 1, False, "python"), ("unix", 1, False, "python"), ("tcp", 2, False, "python"),
           ("unix", 2, False, "python"), ("tcp", 1, True, "python"), ("unix", 1, True, "python"),
           ("tcp", 1, True, "node"), ("unix", 1, True, "node"))


def run(quick: bool, repeats: int) -> Section:
    """Every variant at every cost, `repeats` times, interleaved per repeat; then the report."""
    import torch

    from rl_service.infra.external_env.address import SocketDirectory
    from rl_service.infra.external_env.connector import GrpcExternalEnvironments

    torch.set_num_threads(1)
    costs = QUICK_COSTS_US if quick else COSTS_US
    timesteps = QUICK_TIMESTEPS if quick else TIMESTEPS
    results: dict[str, dict[str, list[dict[str, float] | None]]] = {}
    service: dict[str, Any] = {}
    layout = pin_layout()
    exchanges = 200 if quick else 2000
    echo_us = {"unpinned": median(stream_echo_us(repeats, exchanges))}
    if layout is not None:
        echo_us["pinned"] = median(stream_echo_us(repeats, exchanges, layout))
    print("  simulation_speed: Session-stream echo " + ", ".join(f"{k} {v:.0f} us" for k, v in echo_us.items()),
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        sockets = Path(tmp) / "sockets"
        sockets.mkdir()
        external = GrpcExternalEnvironments(socket_dir=SocketDirectory(sockets))
        for cost in costs:
            with ExitStack() as servers:
                addresses = {}
                for transport, processes, pinned, server in SERVERS:
                    if (pinned and layout is None) or (server == "node" and not node_available()):
                        continue
                    folder = sockets if transport == "unix" else None
                    cpus = layout.simulation if pinned and layout else None
                    addresses[(transport, processes, pinned, server)] = servers.enter_context(
                        node_env_server(cost, folder, cpus) if server == "node" else
                        env_server(cost, folder, processes, cpus))
                runner = Runner(cost, timesteps, addresses, external, layout)
                samples: dict[str, list[dict[str, float] | None]] = {v: [] for v in VARIANTS}
                for repeat in range(repeats):
                    shift = repeat % len(VARIANTS)
                    for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                        samples[variant].append(runner.run(variant))
                        done = samples[variant][-1]
                        print(f"  simulation_speed C={cost} us repeat {repeat + 1}/{repeats} {variant}: "
                              f"{fmt(done['steps_per_s']) if done else 'n/a'} steps/s", flush=True)
                results[str(cost)] = samples
                if cost == costs[0]:
                    pinned = layout is not None
                    harness = "lockstep_tcp_pinned" if pinned else "lockstep_tcp"
                    steps = through_service(addresses[("tcp", 1, pinned, "python")], timesteps, Path(tmp) / "srv",
                                            layout.trainer if layout else None)
                    service = {"cost_us": cost, "steps_per_s": steps, "harness": harness,
                               "harness_steps_per_s": median([s["steps_per_s"] for s in samples[harness]
                                                              if s is not None])}
    return report(results, service, timesteps, repeats, quick, echo_us)


def _median_of(samples: list[dict[str, float] | None], key: str) -> float | None:
    values = [s[key] for s in samples if s is not None]
    return median(values) if values else None


def report(results: dict[str, dict[str, list[dict[str, float] | None]]], service: dict[str, Any],
           timesteps: int, repeats: int, quick: bool, echo_us: dict[str, float] | None = None) -> Section:
    """Tables, goal lines and the break-even from the per-run figures (and the lockstep ceilings, given the echo
    of each layout: "unpinned", "pinned")."""
    section = Section("simulation_speed", "13. Simulation speed: PPO through a costly simulation against in-process")
    section.intro = (__doc__ or "").split("\n\n", 1)[1].strip()
    costs = list(results)
    medians = {c: {v: {k: _median_of(results[c].get(v, []), k)
                       for k in ("steps_per_s", "collection_steps_per_s", "collection_s", "train_s")}
                   for v in VARIANTS} for c in costs}

    def cell(cost: str, variant: str, key: str) -> str:
        value, base = medians[cost][variant][key], medians[cost]["dummy"][key]
        if value is None:
            return unavailable(variant)
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
        harness = service.get("harness", "lockstep_tcp")
        how = (" (WORKER_CPUS and env-server --cpus, the layout of lockstep_tcp_pinned)"
               if harness.endswith("_pinned") else "")
        section.tables.append(Table(
            f"Through the service at C = {service['cost_us']} us: StartTraining against the env-server over TCP{how}",
            ["measure", "steps/s"],
            [["service run, final status", fmt(service["steps_per_s"])],
             [f"harness, {harness} (median)", fmt(service["harness_steps_per_s"])],
             ["service / harness", fmt_ratio(ratio(service["steps_per_s"], service["harness_steps_per_s"]))]]))
    ceilings = _ceilings(medians, costs, echo_us or {})
    if ceilings:
        rows = []
        for layout, by_cost in ceilings.items():
            lockstep = "lockstep_tcp_pinned" if layout == "pinned" else "lockstep_tcp"
            base = "dummy_pinned" if layout == "pinned" else "dummy"
            rows.append([f"ceiling, {layout} (echo {(echo_us or {})[layout]:.0f} us; ratio to {base})"]
                        + [fmt_ratio(by_cost[c]) if c in by_cost else "-" for c in costs])
            rows.append([f"{lockstep} (ratio to {base})"]
                        + [fmt_ratio(r) if (r := _ratio(medians, c, lockstep, base)) is not None else "-"
                           for c in costs])
        section.tables.append(Table(
            f"Lockstep against its ceiling: in-process time per vector step plus one bare Session-stream echo "
            f"(median of {repeats}), per layout", ["measure", *header[1:]], rows))
    summary = _goals(medians, costs, quick, ceilings)
    section.notes.extend(_break_even(medians, costs))
    section.data = {"summary": summary, "timesteps": timesteps, "repeats": repeats, "results": results,
                    "medians": medians, "service": service, "stream_echo_us": echo_us, "lockstep_ceiling": ceilings}
    return section


def _ceilings(medians: dict[str, Any], costs: list[str], echo_us: dict[str, float]) -> dict[str, dict[str, float]]:
    """layout -> cost -> the most lockstep can reach of that layout's DummyVecEnv (see the module docstring)."""
    ceilings: dict[str, dict[str, float]] = {}
    for layout, echo in echo_us.items():
        base = "dummy_pinned" if layout == "pinned" else "dummy"
        by_cost = {c: lockstep_ceiling(steps, echo) for c in costs
                   if (steps := medians[c][base]["steps_per_s"]) is not None}
        if by_cost:
            ceilings[layout] = by_cost
    return ceilings


def _ratio(medians: dict[str, Any], cost: str, variant: str, to: str = "dummy") -> float | None:
    value, base = medians[cost][variant]["steps_per_s"], medians[cost][to]["steps_per_s"]
    return None if value is None or base is None else ratio(value, base)


def _fastest(medians: dict[str, Any], cost: str, variants: tuple[str, ...]) -> str | None:
    """The variant with the most steps/s at `cost` among those measured (None: none was)."""
    measured = [v for v in variants if medians[cost][v]["steps_per_s"] is not None]
    return max(measured, key=lambda v: medians[cost][v]["steps_per_s"]) if measured else None


def _goals(medians: dict[str, Any], costs: list[str], quick: bool,
           ceilings: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    summary: list[dict[str, Any]] = []
    if "0" in costs:
        goal = (f"C = 0: remote lockstep over TCP (best variant) >= {LOCKSTEP_GOAL}x in-process DummyVecEnv "
                "(the faster of dummy and dummy_pinned)")
        best, base = _fastest(medians, "0", LOCKSTEP_VARIANTS), _fastest(medians, "0", IN_PROCESS)
        if best is None or base is None:
            summary.append({"goal": goal, "measured": "-", "met": None})
        else:
            r = _ratio(medians, "0", best, base)
            assert r is not None
            ceiling = (ceilings or {}).get("pinned" if variant_parts(best).pinned else "unpinned", {}).get("0")
            summary.append({"goal": goal, "variant": best,
                            "measured": f"{best}: {fmt_ratio(r)} of {base}" + (
                                "" if ceiling is None else f" (ceiling over a bare stream echo {fmt_ratio(ceiling)})"),
                            "met": None if quick else r >= LOCKSTEP_GOAL})
    for cost in costs:
        if int(cost) < 100:
            continue
        goal = (f"C = {cost} us: two groups (best variant) >= {GROUPS_GOAL}x DummyVecEnv (the faster of dummy and "
                "dummy_pinned) and >= SubprocVecEnv")
        best, base = _fastest(medians, cost, GROUPS_VARIANTS), _fastest(medians, cost, IN_PROCESS)
        vs_subproc = None if best is None else _ratio(medians, cost, best, "subproc")
        if best is None or base is None or vs_subproc is None:
            summary.append({"goal": goal, "measured": NOT_AVAILABLE, "met": None})
            continue
        r = _ratio(medians, cost, best, base)
        assert r is not None
        summary.append({"goal": goal, "variant": best,
                        "measured": f"{best}: {fmt_ratio(r)} of {base}, {fmt_ratio(vs_subproc)} of subproc",
                        "met": None if quick else (r >= GROUPS_GOAL and vs_subproc >= 1.0)})
    return summary


def _break_even(medians: dict[str, Any], costs: list[str]) -> list[str]:
    """Where each remote variant first reaches the in-process DummyVecEnv, by linear interpolation between costs."""
    notes = []
    for variant in (v for v in VARIANTS if v not in IN_PROCESS):
        points = [(int(c), r) for c in costs if (r := _ratio(medians, c, variant)) is not None]
        if not points:
            notes.append(f"Break-even, {variant}: {unavailable(variant)}.")
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
