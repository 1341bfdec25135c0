"""Section fuzz: every RPC of the public API fuzzed at size against a server in a subprocess.

For each RPC found by walking the service descriptors (tests/support/proto_fuzz.py), CASES proto-aware generated
messages and CASES raw or mutated byte payloads (hypothesis, derandomised), each sent through a generic channel
with identity serializers. The server runs with budgets that keep accepted requests cheap (MAX_TOTAL_TIMESTEPS
512, one run at a time, 50 policies of at most 200,000 parameters). It reports, per RPC: the cases sent, the
status codes seen, the slowest answer, and any problem (INTERNAL or UNKNOWN, a unary call unanswered by its
deadline, a status that did not fit the trailers or echoed the request); and the server's resident memory
(VmRSS) before, during (sampled after each RPC) and after, with the files written outside its directories.

`python -m benchmarks run --only fuzz` (10,000 cases per RPC and kind; `--fuzz-cases N` for fewer); `--quick`: 3.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Section, Table, fmt, start_server_process, training_stub, wait_for_runs
from benchmarks.footprint import rss_kib

CASES, QUICK_CASES = 10_000, 3
CALL_TIMEOUT = 20.0
# Server memory may grow by this much over the whole run: budgets cap what requests keep (policies, runs, queues).
MAX_RSS_GROWTH_MIB = 256


def _environment() -> dict[str, str]:
    from tests.support.proto_fuzz import SERVER_LIMITS

    return {key.upper(): str(value) for key, value in SERVER_LIMITS.items()}


def _fuzz_rpc(channel: Any, rpc: Any, hints: Any, cases: int, raw: bool) -> list[Any]:
    """Send `cases` generated cases to one RPC; every outcome, none judged here."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from tests.support.proto_fuzz import STREAM_CHUNKS, call, message_strategy, mutated_bytes, payloads_for

    outcomes: list[Any] = []
    count = STREAM_CHUNKS if rpc.client_streaming else 1
    strategy: Any
    if raw:
        strategy = st.lists(mutated_bytes(rpc.request_class.DESCRIPTOR, hints), min_size=1, max_size=count)
    else:
        strategy = st.lists(message_strategy(rpc.request_class.DESCRIPTOR, hints), min_size=1, max_size=count)

    # Only generation: nothing fails here, so there is nothing to shrink.
    @settings(derandomize=True, deadline=None, database=None, max_examples=cases, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(items=strategy)
    def run(items: list[Any]) -> None:
        payloads = items if raw else payloads_for(rpc, items)
        outcomes.append(call(channel, rpc, payloads, CALL_TIMEOUT))

    run()
    return outcomes


def run(quick: bool, scratch: Path, cases_per_kind: int | None = None) -> Section:
    """Start a fuzz server, aim at a finished run and two policies, fuzz each RPC, report."""
    import grpc

    from rl_service_proto.v1 import training_pb2 as pb
    from tests.support.proto_fuzz import create_targets, judge, served_rpcs, target_hints

    cases = cases_per_kind or (QUICK_CASES if quick else CASES)
    base = scratch / "fuzz"  # the server's data directory and nothing else: anything new beside it escaped
    data = base / "server"
    server = start_server_process(data, env=_environment())
    started = time.perf_counter()
    try:
        stub = training_stub(server.address)
        run_id = stub.StartTraining(pb.StartTrainingRequest(
            algorithm="PPO", env_id="CartPole-v1", total_timesteps=256,
            hyperparameters={"n_steps": "128", "batch_size": "64", "n_epochs": "2"}), timeout=30).run_id
        wait_for_runs(stub, [run_id], poll=0.5, timeout=300)
        channel = grpc.insecure_channel(server.address)
        create_targets(channel)
        hints = target_hints([run_id])
        before = set(_files(base, data))
        rss_start = rss_kib(server.process.pid)
        rows: list[list[str]] = []
        per_rpc: dict[str, dict[str, Any]] = {}
        samples: list[dict[str, Any]] = []
        problems: list[str] = []
        for rpc in served_rpcs():
            t0 = time.perf_counter()
            create_targets(channel)  # a DeletePolicy case may have removed them
            outcomes = _fuzz_rpc(channel, rpc, hints, cases, raw=False) + _fuzz_rpc(channel, rpc, hints, cases,
                                                                                    raw=True)
            codes = collections.Counter(o.code.name for o in outcomes)
            found = [p for p in (judge(o, rpc) for o in outcomes) if p is not None]
            problems.extend(found[:5])
            slowest = max((o.seconds for o in outcomes), default=0.0)
            rss = rss_kib(server.process.pid)
            samples.append({"rpc": rpc.name, "rss_mib": round(rss / 1024, 1)})
            per_rpc[rpc.name] = {"cases": len(outcomes), "codes": dict(codes), "max_latency_s": round(slowest, 3),
                                 "problems": len(found), "seconds": round(time.perf_counter() - t0, 1)}
            rows.append([rpc.name, str(len(outcomes)), ", ".join(f"{k} {v}" for k, v in codes.most_common()),
                         fmt(slowest * 1000), str(len(found)), fmt(rss / 1024)])
        rss_end = rss_kib(server.process.pid)
        outside = sorted(str(p) for p in set(_files(base, data)) - before)
        alive = server.process.poll() is None
    finally:
        server.stop()
    growth = (rss_end - rss_start) / 1024
    total = sum(r["cases"] for r in per_rpc.values())
    seconds = time.perf_counter() - started
    summary = [
        {"goal": "no INTERNAL/UNKNOWN, hang or oversized status for a client's input",
         "measured": f"{len(problems)} problems in {total:,} cases", "met": None if quick else not problems},
        {"goal": f"server RSS growth under {MAX_RSS_GROWTH_MIB} MiB",
         "measured": f"{rss_start / 1024:.0f} -> {rss_end / 1024:.0f} MiB ({growth:+.0f})",
         "met": None if quick else growth < MAX_RSS_GROWTH_MIB},
        {"goal": "nothing written outside the data directories; the server survives",
         "measured": f"{len(outside)} paths outside; {'alive' if alive else 'DEAD'}",
         "met": None if quick else (not outside and alive)},
    ]
    return Section(
        name="fuzz", title="Fuzzing the public API",
        intro=(f"{cases:,} generated messages and {cases:,} raw or mutated payloads per RPC, derandomised, through a "
               "generic channel against a server in a subprocess (MAX_TOTAL_TIMESTEPS=512, MAX_CONCURRENT_RUNS=1, "
               f"MAX_POLICIES=50, MAX_NETWORK_PARAMETERS=200,000); {total:,} cases in {seconds:,.0f} s."),
        tables=[Table("Per RPC", ["RPC", "cases", "codes", "slowest (ms)", "problems", "server RSS after (MiB)"],
                      rows)],
        notes=[*(f"Problem: {p}" for p in problems[:20]), *(f"Written outside: {p}" for p in outside[:20])],
        data={"cases_per_rpc_and_kind": cases, "rpcs": per_rpc, "rss_mib": {
            "before": round(rss_start / 1024, 1), "after": round(rss_end / 1024, 1), "samples": samples},
            "outside": outside, "problems": problems, "summary": summary, "seconds": round(seconds, 1)},
    )


def _files(base: Path, data: Path) -> list[Path]:
    return [p for p in base.rglob("*") if not p.is_relative_to(data)]
