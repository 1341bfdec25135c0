"""Section 12, http: the HTTP API's act endpoint beside gRPC Act, the same payload to the same run of the same
server (a CartPole PPO policy, the observation of section 3), one client each on a kept-alive connection.

The two are measured in turns (each repeat: a block of gRPC calls, then a block of HTTP calls) so that the machine's
load falls on both alike. The HTTP call does what the gRPC one does (the same servicer method, admission and
audit), plus JSON, HTTP/1.1 framing and a hop from uvicorn's event loop to a worker thread.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.act_latency import OBS, train_model
from benchmarks.common import Section, ServerProcess, Table, fmt, fmt_ratio, percentile, ratio, training_stub


def _timed_us(call: Any, count: int) -> list[float]:
    """Microseconds of each of `count` calls."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def run(server: ServerProcess, quick: bool, repeats: int) -> Section:
    """p50 and p95 of Act over gRPC and over HTTP."""
    import httpx

    from rl_service_proto.v1 import training_pb2 as pb

    section = Section("http", "12. HTTP API: act beside gRPC Act")
    section.intro = (__doc__ or "").split("\n\n", 1)[1].strip()
    if not server.http_url:
        section.notes.append("The server runs without its HTTP API (HTTP_ENABLED=false): nothing measured.")
        return section
    stub = training_stub(server.address)
    run_id, _ = train_model(stub, quick)
    request = pb.ActRequest(run_id=run_id, observation=OBS, deterministic=True)
    body = {"observation": OBS, "deterministic": True}
    calls, rounds = (50, 2) if quick else (1000, max(repeats, 3))
    samples: dict[str, list[float]] = {"grpc": [], "http": []}
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        grpc_act = lambda: stub.Act(request, timeout=30)  # noqa: E731
        http_act = lambda: client.post(f"/v1/runs/{run_id}/act", json=body).raise_for_status()  # noqa: E731
        http_reply = client.post(f"/v1/runs/{run_id}/act", json=body).json()
        assert http_reply["action"] == list(stub.Act(request, timeout=30).action), "the two transports disagree"
        for call in (grpc_act, http_act):  # warm both paths (the policy cache, connections)
            _timed_us(call, 20)
        for _ in range(rounds):
            samples["grpc"] += _timed_us(grpc_act, calls)
            samples["http"] += _timed_us(http_act, calls)
    p50 = {name: percentile(values, 50) for name, values in samples.items()}
    table = Table("Act latency, one client (µs)", ["transport", "calls", "p50", "p95", "p50 vs gRPC"])
    for name, label in (("grpc", "gRPC Act"), ("http", "HTTP POST /v1/runs/{id}/act")):
        table.rows.append([label, str(len(samples[name])), fmt(p50[name], 3), fmt(percentile(samples[name], 95), 3),
                           fmt_ratio(ratio(p50[name], p50["grpc"]))])
    section.tables.append(table)
    section.data = {"calls": {k: len(v) for k, v in samples.items()}, "p50_us": p50,
                    "p95_us": {k: percentile(v, 95) for k, v in samples.items()}}
    if quick:
        section.notes.append("Quick mode: a handful of calls on a model trained for 128 steps; indicative only.")
    return section
