"""Section 4, experience batches: transitions per second through SendTrainingBatch against the same REINFORCE update
called in-process on the same batch.

One batch (CartPole-shaped: 4 floats per state, 2 actions, complete episodes) is built once. Variants, interleaved
per repeat:

- grpc: PolicyService.SendTrainingBatch to the server on 127.0.0.1 (serialisation, transport, validation, episode
  split, the update, and the policy's state persisted to disk before the reply);
- manager: the service's PolicyManager.send_batch called in-process (everything above but gRPC);
- bare: rl_service.core.algorithms.reinforce_update.reinforce_update on the same episodes with the same network
  and Adam (the library call alone).

Goal: grpc >= 0.8 x bare.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Section, ServerProcess, Table, fmt, fmt_ratio, interleaved, median, ratio

GOAL = 0.8
BENCHMARKS_DIR = Path(__file__).resolve().parent
HYPER = {"learning_rate": "0.002", "beta": "0.02"}


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
    """The three variants, `repeats` rounds of `calls` updates each."""
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
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 256 << 20)])
    stub = policy_pb2_grpc.PolicyServiceStub(channel)
    rows = []
    summary = []
    profiles: list[str] = []
    data: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-experience-") as tmp:
        manager = PolicyManager(FilePolicyStore(Path(tmp)), PolicyConfig(), structlog.get_logger())
        for transitions, length in sizes:
            batch = make_batch(transitions, length)
            name = f"bench-{transitions}-{int(time.time() * 1000) % 100000}"
            stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=name, spec=pb.PolicySpec(
                observation_shape=[4], discrete_n=2, hyperparameters=HYPER, seed=0)), timeout=30)
            manager.create(name, PolicySpecRequest(observation_shape=(4,), discrete_actions=2,
                                                   hyperparameters=HYPER, seed=0))
            message = pb.TrainingBatch(policy_id=name, states=batch["states"].ravel().tolist(),
                                       actions=batch["actions"].tolist(), rewards=batch["rewards"].tolist(),
                                       dones=batch["dones"].tolist())
            # The bare variant: the same network (class, sizes, seed) and optimiser the manager builds.
            net = new_net(manager.get(name).spec)
            optimizer = torch.optim.Adam(net.parameters(), lr=0.002)
            ends = np.flatnonzero(batch["dones"]) + 1
            starts = np.concatenate([[0], ends[:-1]])
            episodes = [Episode(batch["states"][s:e], batch["actions"][s:e].astype(np.int64), batch["rewards"][s:e])
                        for s, e in zip(starts, ends, strict=True)]

            def timed(fn: Any, transitions: int = transitions) -> Any:
                def go() -> float:
                    started = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    return transitions * calls / (time.perf_counter() - started)
                return go

            variants = {
                "grpc": timed(lambda msg=message: stub.SendTrainingBatch(msg, timeout=120)),
                "manager": timed(lambda n=name, b=batch: manager.send_batch(n, b["states"], b["actions"],
                                                                            b["rewards"], b["dones"])),
                "bare": timed(lambda n=net, o=optimizer, e=episodes: reinforce_update(n, o, e, 0.99, 0.02)),
            }
            for fn in variants.values():  # warm-up
                fn()
            samples = interleaved(variants, repeats)
            med = {k: median(v) for k, v in samples.items()}
            r = ratio(med["grpc"], med["bare"])
            met = None if quick else r >= GOAL
            rows.append([f"{transitions:,} ({transitions // length} episodes of {length})", fmt(med["grpc"]),
                         fmt(med["manager"]), fmt(med["bare"]), fmt_ratio(ratio(med["manager"], med["bare"])),
                         fmt_ratio(r), {None: "not assessed", True: "met", False: "**NOT met**"}[met]])
            summary.append({"goal": f"SendTrainingBatch >= {GOAL}x in-process update ({transitions:,} transitions)",
                            "measured": fmt_ratio(r), "met": met})
            data[str(transitions)] = {"samples": samples, "medians": med}
            if not quick and r < GOAL:
                profile = _profile(lambda n=name, b=batch: manager.send_batch(n, b["states"], b["actions"],
                                                                              b["rewards"], b["dones"]), calls)
                data[str(transitions)]["manager_profile"] = profile
                profiles.append(f"--- PolicyManager.send_batch, {transitions} transitions, {calls} calls ---\n"
                                + profile)
        manager.close()
    channel.close()
    section.tables.append(Table(f"Transitions per second (median of {repeats} repeats x {calls} updates, "
                                "interleaved)",
                                ["batch", "grpc", "manager in-process", "bare update", "manager / bare",
                                 "grpc / bare", f"goal >= {GOAL}x"], rows))
    section.data = {"summary": summary, **data}
    if profiles:
        (output / "results").mkdir(parents=True, exist_ok=True)
        (output / "results" / "experience_profile.txt").write_text("\n".join(profiles))
        section.notes.append("A goal was missed: cProfile of the in-process PolicyManager.send_batch (cumulative) is "
                             "in results/experience_profile.txt.")
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
