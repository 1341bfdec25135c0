"""Section 4, experience batches: transitions per second through SendTrainingBatch, with the policy's state saved
before each reply (POLICY_SYNC=always) or behind it (background), against the same REINFORCE update in-process.

One batch (CartPole-shaped: 4 floats per state, 2 actions, complete episodes) is built once. Variants, interleaved
per repeat:

- grpc background: PolicyService.SendTrainingBatch to a server on 127.0.0.1 started with POLICY_SYNC=background
  (serialisation, transport, validation, episode split, the update, a snapshot of the state handed to the writer
  thread, which saves the newest state at most POLICY_SYNC_INTERVAL_SECONDS = 1 s later);
- grpc always: the same to a second server started with POLICY_SYNC=always (the state encoded and written with
  fsync before each reply);
- manager background, manager always: the service's PolicyManager.send_batch called in-process in each mode
  (everything above but gRPC);
- bare: rl_service.core.algorithms.reinforce_update.reinforce_update on the same episodes with the same network
  and Adam (the library call alone);
- round trip: an empty unary RPC (GetPolicy) to the background server, the floor any gRPC call pays here.

Goal: grpc background >= 0.9 x bare. grpc always has no goal; it is the price of an fsync before every reply.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from benchmarks.common import (
    Section,
    ServerProcess,
    Table,
    fmt,
    fmt_ratio,
    goal_cell,
    interleaved,
    median,
    ratio,
    start_server_process,
)

GOAL = 0.9
BENCHMARKS_DIR = Path(__file__).resolve().parent
HYPER = {"learning_rate": "0.002", "beta": "0.02"}
Mode = Literal["background", "always"]
MODES: tuple[Mode, ...] = ("background", "always")
SYNC_INTERVAL = "1.0"


def make_batch(transitions: int, episode_length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Complete episodes of random CartPole-like transitions, `transitions` in all."""
    rng = np.random.default_rng(seed)
    states = rng.normal(0, 0.1, size=(transitions, 4)).astype(np.float32)
    actions = rng.integers(0, 2, size=transitions).astype(np.float64)
    rewards = np.ones(transitions)
    dones = np.zeros(transitions, dtype=bool)
    dones[episode_length - 1::episode_length] = True
    dones[-1] = True
    return {"states": states, "actions": actions, "rewards": rewards, "dones": dones}


def run(server: ServerProcess, quick: bool, repeats: int, output: Path = BENCHMARKS_DIR) -> Section:
    """The variants, `repeats` rounds of `calls` updates each.

    The shared `server` is not used: its POLICY_SYNC is whatever the environment says, so each mode gets a server
    of its own, started here with the mode set explicitly.
    """
    with tempfile.TemporaryDirectory(prefix="bench-experience-") as tmp:
        servers = {mode: start_server_process(Path(tmp) / f"server-{mode}", env={
            "POLICY_SYNC": mode, "POLICY_SYNC_INTERVAL_SECONDS": SYNC_INTERVAL}) for mode in MODES}
        try:
            return _measure(servers, Path(tmp), quick, repeats, output)
        finally:
            for process in servers.values():
                process.stop()


def _measure(servers: dict[Mode, ServerProcess], tmp: Path, quick: bool, repeats: int, output: Path) -> Section:
    import grpc
    import structlog
    import torch

    from rl_service.core.algorithms.reinforce_update import Episode, reinforce_update
    from rl_service.core.policies.manager import PolicyManager
    from rl_service.core.policies.records import PolicyConfig
    from rl_service.core.policies.spec import PolicySpecRequest, new_net
    from rl_service.infra.policy_store import FilePolicyStore
    from rl_service_proto.v1 import policy_pb2 as pb
    from rl_service_proto.v1 import policy_pb2_grpc

    torch.set_num_threads(1)
    section = Section("experience", "4. Experience batches: SendTrainingBatch against an in-process update")
    section.intro = (__doc__ or "").split("\n\n", 1)[1].strip()
    sizes = [(500, 50)] if quick else [(2000, 50), (20000, 200)]
    calls = 2 if quick else 10
    channels = {mode: grpc.insecure_channel(s.address, options=[("grpc.max_send_message_length", 256 << 20)])
                for mode, s in servers.items()}
    stubs = {mode: policy_pb2_grpc.PolicyServiceStub(channel) for mode, channel in channels.items()}
    managers = {mode: PolicyManager(FilePolicyStore(tmp / f"manager-{mode}"),
                                    PolicyConfig(sync=mode, sync_interval_seconds=float(SYNC_INTERVAL)),
                                    structlog.get_logger()) for mode in MODES}
    rows, ms_rows, ratio_rows, summary, profiles = [], [], [], [], []
    data: dict[str, Any] = {"sync_interval_seconds": float(SYNC_INTERVAL)}
    for transitions, length in sizes:
        batch = make_batch(transitions, length)
        name = f"bench-{transitions}-{int(time.time() * 1000) % 100000}"
        for stub in stubs.values():
            stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=name, spec=pb.PolicySpec(
                observation_shape=[4], discrete_n=2, hyperparameters=HYPER, seed=0)), timeout=30)
        for manager in managers.values():
            manager.create(name, PolicySpecRequest(observation_shape=(4,), discrete_actions=2,
                                                   hyperparameters=HYPER, seed=0))
        message = pb.TrainingBatch(policy_id=name, states=batch["states"].ravel().tolist(),
                                   actions=batch["actions"].tolist(), rewards=batch["rewards"].tolist(),
                                   dones=batch["dones"].tolist())
        # The bare variant: the same network (class, sizes, seed) and optimiser the manager builds.
        net = new_net(managers["always"].get(name).spec)
        optimizer = torch.optim.Adam(net.parameters(), lr=0.002)
        ends = np.flatnonzero(batch["dones"]) + 1
        starts = np.concatenate([[0], ends[:-1]])
        episodes = [Episode(batch["states"][s:e], batch["actions"][s:e].astype(np.int64), batch["rewards"][s:e])
                    for s, e in zip(starts, ends, strict=True)]
        replies: dict[str, Any] = {}

        def timed(fn: Any, transitions: int = transitions) -> Any:
            def go() -> float:
                started = time.perf_counter()
                for _ in range(calls):
                    fn()
                return transitions * calls / (time.perf_counter() - started)
            return go

        def round_trip(policy_id: str = name) -> float:
            request = pb.PolicyRequest(policy_id=policy_id)
            started = time.perf_counter()
            for _ in range(calls):
                stubs["background"].GetPolicy(request, timeout=30)
            return (time.perf_counter() - started) / calls * 1000

        def grpc_call(mode: Mode, msg: Any = message, seen: dict[str, Any] = replies) -> None:
            seen[mode] = stubs[mode].SendTrainingBatch(msg, timeout=120)

        def manager_call(mode: Mode, n: str = name, b: dict[str, np.ndarray] = batch) -> Any:
            return managers[mode].send_batch(n, b["states"], b["actions"], b["rewards"], b["dones"])

        variants = {
            "grpc background": timed(lambda: grpc_call("background")),
            "grpc always": timed(lambda: grpc_call("always")),
            "manager background": timed(lambda: manager_call("background")),
            "manager always": timed(lambda: manager_call("always")),
            "bare": timed(lambda n=net, o=optimizer, e=episodes: reinforce_update(n, o, e, 0.99, 0.02)),
        }
        for fn in variants.values():  # warm-up
            fn()
        samples = interleaved({**variants, "round trip ms": round_trip}, repeats)
        med = {k: median(v) for k, v in samples.items()}
        r = {k: ratio(med[k], med["bare"]) for k in variants}
        met = None if quick else r["grpc background"] >= GOAL
        label = f"{transitions:,} ({transitions // length} episodes of {length})"
        rows.append([label, *(fmt(med[k]) for k in variants)])
        ms_rows.append([label, *(fmt(transitions / med[k] * 1000) for k in variants), fmt(med["round trip ms"])])
        ratio_rows.append([label, *(fmt_ratio(r[k]) for k in variants if k != "bare"), goal_cell(met)])
        summary.append({"goal": f"SendTrainingBatch, POLICY_SYNC=background, >= {GOAL}x in-process update "
                                f"({transitions:,} transitions)", "measured": fmt_ratio(r["grpc background"]),
                        "met": met})
        last = replies["background"]
        data[str(transitions)] = {"samples": samples, "medians": med, "ratios": r,
                                  "background_last_reply": {"version": last.version,
                                                            "durable_version": last.durable_version}}
        if not quick and met is False:
            profile = _profile(lambda: manager_call("background"), calls)
            data[str(transitions)]["manager_profile"] = profile
            profiles.append(f"--- PolicyManager.send_batch (background), {transitions} transitions, {calls} calls "
                            "---\n" + profile)
    for manager in managers.values():
        manager.close()
    for channel in channels.values():
        channel.close()
    section.tables.append(Table(f"Transitions per second (median of {repeats} repeats x {calls} updates, "
                                "interleaved)", ["batch", *variants], rows))
    section.tables.append(Table("Milliseconds per call (from the medians above), and an empty unary RPC",
                                ["batch", *variants, "round trip (GetPolicy)"], ms_rows))
    section.tables.append(Table("Against the bare update (ratios of the medians)",
                                ["batch", *(f"{k} / bare" for k in variants if k != "bare"),
                                 f"goal: grpc background >= {GOAL}x"], ratio_rows))
    section.data = {"summary": summary, **data}
    if profiles:
        (output / "results").mkdir(parents=True, exist_ok=True)
        (output / "results" / "experience_profile.txt").write_text("\n".join(profiles))
        section.notes.append("A goal was missed: cProfile of the in-process PolicyManager.send_batch (background, "
                             "cumulative) is in results/experience_profile.txt.")
    return section


def _profile(call: Any, calls: int) -> str:
    """cProfile (cumulative, top 25) of `calls` calls."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
    return text.getvalue()
