"""Section 3, Act: latency of Act (one observation) and ActBatch (64) beside a bare gRPC echo of the same payload,
the compiled actor's own forward time in-process, and throughput with 1, 4 and 16 concurrent clients.

The echo is a bare gRPC server in its own process, built with the service's server options (thread pool size,
message size limits, no port reuse): a generic handler that takes the same request bytes and answers with the
bytes of the service's real reply (captured once from the service), parsing neither; the client parses both
replies. It is what gRPC and the transport cost on this machine with no work behind them. The forward-only server
is the same echo whose handler also parses the request and runs the run's compiled actor on its observations
(ServedPolicy.act, what Act runs), with no validation, lookup or interceptor: the floor of any Act handler that
serves the compiled actor from Python. The forward time is the
run's CompiledActor (the module Act runs, rebuilt from the model file without unpickling) on the same
observations, in-process, with one intra-op thread as the server uses.
Goal: p50(Act) <= 1.15 x p50(echo), for 1 and 64 observations, measured side by side in one run.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Section,
    ServerProcess,
    Table,
    fmt,
    fmt_ratio,
    median,
    percentile,
    ratio,
    training_stub,
)

GOAL = 1.15
CLIENTS = (1, 4, 16)
BENCHMARKS_DIR = Path(__file__).resolve().parent
BATCH = 64
OBS = [0.01, -0.02, 0.03, 0.04]
ECHO_SERVICE = "bench.Echo"
FORWARD_ONLY = "forward-only"
HYPERPARAMETERS = {"n_steps": "128", "batch_size": "64", "n_epochs": "2"}


def _replies(stub: Any, run_id: str) -> dict[str, bytes]:
    """The service's real Act and ActBatch replies, serialised: the echo answers with exactly these bytes."""
    one, many = _requests(run_id)
    return {"Act": stub.Act(one, timeout=30).SerializeToString(),
            "ActBatch": stub.ActBatch(many, timeout=30).SerializeToString()}


def _requests(run_id: str) -> tuple[Any, Any]:
    from rl_service_proto.v1 import training_pb2 as pb

    return (pb.ActRequest(run_id=run_id, observation=OBS, deterministic=True),
            pb.ActBatchRequest(run_id=run_id, observations=OBS * BATCH, deterministic=True))


def echo_main(act_reply: bytes, batch_reply: bytes, model_path: str = "") -> None:
    """The echo server process: the service's server options, bytes in and bytes out; print the port, serve until
    stdin closes. With a model path, the forward-only server: each call also runs the compiled actor."""
    import grpc

    from rl_service.infra.settings import Settings

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    replies = {"Act": act_reply, "ActBatch": batch_reply}
    forward = _forward_handler(model_path) if model_path else None

    def handler(name: str) -> Any:
        reply = replies[name]
        if forward is None:
            return grpc.unary_unary_rpc_method_handler(lambda request, context: reply,
                                                       request_deserializer=None, response_serializer=None)
        parse = _request_parser(name)

        def answer(request: bytes, context: Any) -> bytes:
            forward(parse(request))
            return reply

        return grpc.unary_unary_rpc_method_handler(answer, request_deserializer=None, response_serializer=None)

    options = [("grpc.max_receive_message_length", settings.max_message_bytes),
               ("grpc.max_send_message_length", settings.max_message_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.grpc_max_workers, thread_name_prefix="rpc"),
                         options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        ECHO_SERVICE, {"Act": handler("Act"), "ActBatch": handler("ActBatch")}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0).wait(5)


def _request_parser(name: str) -> Callable[[bytes], Any]:
    """Request bytes -> the flat observations of an Act or ActBatch request."""
    from rl_service_proto.v1 import training_pb2 as pb

    if name == "Act":
        return lambda data: pb.ActRequest.FromString(data).observation
    return lambda data: pb.ActBatchRequest.FromString(data).observations


def _forward_handler(model_path: str) -> Callable[[Any], None]:
    """Flat observations -> the compiled actor's deterministic actions (discarded), as Act runs it."""
    import numpy as np
    import torch

    served = load_served(model_path)
    torch.set_num_threads(1)  # as the server
    width = len(OBS)
    return lambda flat: served.act(np.asarray(flat, dtype=np.float32).reshape(-1, width), None, True)


def _callers(address: str, echo: bool, run_id: str) -> dict[str, Any]:
    """name -> a zero-argument function making one call (both parse the same reply messages)."""
    import grpc

    from rl_service_proto.v1 import training_pb2 as pb
    from rl_service_proto.v1 import training_pb2_grpc

    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=30)
    one, many = _requests(run_id)
    if echo:
        act = channel.unary_unary(f"/{ECHO_SERVICE}/Act", request_serializer=pb.ActRequest.SerializeToString,
                                  response_deserializer=pb.ActResponse.FromString)
        batch = channel.unary_unary(f"/{ECHO_SERVICE}/ActBatch",
                                    request_serializer=pb.ActBatchRequest.SerializeToString,
                                    response_deserializer=pb.ActBatchResponse.FromString)
    else:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        act, batch = stub.Act, stub.ActBatch
    return {"1": lambda: act(one, timeout=30), str(BATCH): lambda: batch(many, timeout=30)}


def _client(address: str, echo: bool, run_id: str, duration: float, barrier: Any, results: Any) -> None:
    call = _callers(address, echo, run_id)["1"]
    call()
    barrier.wait()
    started = time.perf_counter()
    count = 0
    while time.perf_counter() - started < duration:
        call()
        count += 1
    results.put(count / (time.perf_counter() - started))


def throughput(address: str, echo: bool, run_id: str, clients: int, duration: float) -> float:
    """Total Act calls per second of `clients` client processes calling back to back for `duration` s."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(address, echo, run_id, duration, barrier, results))
             for _ in range(clients)]
    for proc in procs:
        proc.start()
    total = sum(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(30)
    return float(total)


def load_served(model_path: str) -> Any:
    """The run's ServedPolicy (its CompiledActor), rebuilt from the model file as the service does."""
    import gymnasium as gym

    from rl_service.core.algorithms.registry import get_algorithm
    from rl_service.core.models.policy_weights import PolicyBuild
    from rl_service.core.models.served_policy import load_served_policy

    spec = get_algorithm("PPO")
    env = gym.make("CartPole-v1")
    build = PolicyBuild(spec.cls, spec.constructor_kwargs(spec.schema.parse(HYPERPARAMETERS)), env.observation_space,
                        env.action_space)
    return load_served_policy(Path(model_path), build, require_stats=False)


def forward_times(model_path: str, calls: int) -> dict[str, list[float]]:
    """In-process seconds of the run's CompiledActor for one observation and for a batch (what Act runs)."""
    import numpy as np
    import torch

    served = load_served(model_path)
    torch.set_num_threads(1)  # as the server: Act runs small networks in RPC threads
    one = np.array([OBS], dtype=np.float32)
    many = np.tile(one, (BATCH, 1))
    out: dict[str, list[float]] = {"1": [], str(BATCH): []}
    for _ in range(calls):
        for key, obs in (("1", one), (str(BATCH), many)):
            started = time.perf_counter()
            served.act(obs, None, True)
            out[key].append(time.perf_counter() - started)
    return out


def profile_act(calls: int = 300) -> str:
    """cProfile (cumulative) of the service's Act path below gRPC: Orchestrator.act on an in-process server, for a
    model trained there (the same PPO CartPole), one observation per call."""
    import cProfile
    import io
    import pstats
    import tempfile

    import numpy as np

    from rl_service.infra.logging_setup import configure_logging
    from rl_service.infra.settings import Settings
    from rl_service.transport.server_factory import build_server

    with tempfile.TemporaryDirectory(prefix="bench-act-profile-") as tmp:
        settings = Settings(_env_file=None, grpc_host="127.0.0.1", grpc_port=0, http_enabled=False,  # type: ignore[call-arg]
                            data_dir=Path(tmp),
                            log_level="ERROR", log_format="console")
        configure_logging(settings.log_level, settings.log_format)
        running = build_server(settings)
        try:
            stub = training_stub(f"127.0.0.1:{running.port}")
            run_id, _ = train_model(stub, quick=False)
            orchestrator = running.orchestrator
            obs = np.array(OBS, dtype=np.float64)
            for _ in range(10):
                orchestrator.act(run_id, obs, True, single=True)
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(calls):
                orchestrator.act(run_id, obs, True, single=True)
            profiler.disable()
        finally:
            running.stop(grace=10)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
    return text.getvalue()


def train_model(stub: Any, quick: bool) -> tuple[str, str]:
    """A PPO CartPole run through the service, to serve: (run_id, model_path)."""
    from rl_service_proto.v1 import training_pb2 as pb

    run_id = stub.StartTraining(pb.StartTrainingRequest(
        experiment_id="benchmark-act", algorithm="PPO", env_id="CartPole-v1",
        total_timesteps=128 if quick else 2048, seed=0,
        hyperparameters=HYPERPARAMETERS), timeout=60).run_id
    final = list(stub.WatchTraining(pb.RunRequest(run_id=run_id), timeout=600))[-1]
    assert final.state == pb.SUCCEEDED, final
    return run_id, final.model_path


def run(server: ServerProcess, quick: bool, repeats: int, output: Path = BENCHMARKS_DIR) -> Section:
    """Latency (service and echo interleaved per repeat), forward time, throughput at 1, 4 and 16 clients."""
    section = Section("act", "3. Act latency and throughput")
    section.intro = (__doc__ or "").split("\n\n", 1)[1].strip()
    stub = training_stub(server.address)
    run_id, model_path = train_model(stub, quick)
    replies = _replies(stub, run_id)
    with ExitStack() as stack:
        echo_address = stack.enter_context(_echo_process(replies))
        forward_address = stack.enter_context(_echo_process(replies, model_path))
        callers = {"service": _callers(server.address, False, run_id), "echo": _callers(echo_address, True, run_id),
                   FORWARD_ONLY: _callers(forward_address, True, run_id)}
        calls = 20 if quick else 300
        lat: dict[str, dict[str, list[float]]] = {v: {"1": [], str(BATCH): []} for v in callers}
        for variant in callers:  # warm-up: the service compiles the run's policy on its first Act
            for key in ("1", str(BATCH)):
                for _ in range(5):
                    callers[variant][key]()
        for repeat in range(repeats):
            order = list(callers) if repeat % 2 == 0 else list(reversed(callers))
            for variant in order:
                for key in ("1", str(BATCH)):
                    call = callers[variant][key]
                    for _ in range(calls):
                        started = time.perf_counter()
                        call()
                        lat[variant][key].append(time.perf_counter() - started)
        fwd = forward_times(model_path, calls * repeats // 2 or 10)
        duration = 0.2 if quick else 3.0
        tput: dict[str, dict[int, float]] = {"service": {}, "echo": {}}
        for clients in CLIENTS:
            for variant, address in (("service", server.address), ("echo", echo_address)):
                tput[variant][clients] = throughput(address, variant == "echo", run_id, clients, duration)
    section.tables.append(_latency_table(lat, fwd, repeats, calls, quick, section))
    t2 = Table(f"Throughput, Act calls/s (one observation), {duration} s per measurement, client processes",
               ["clients", "service calls/s", "echo calls/s", "service / echo"])
    for clients in CLIENTS:
        t2.rows.append([str(clients), fmt(tput["service"][clients]), fmt(tput["echo"][clients]),
                        fmt_ratio(ratio(tput["service"][clients], tput["echo"][clients]))])
    section.tables.append(t2)
    section.notes.append("Client processes, service and echo share the machine's cores; with 4 or 16 client "
                         "processes the clients compete with the server for CPU, so throughput is a floor, not a "
                         "ceiling.")
    section.data.update({"latency_s": lat, "forward_s": fwd, "throughput": tput,
                         "reply_bytes": {name: len(reply) for name, reply in replies.items()}})
    if any(row["met"] is False for row in section.data["summary"]):
        (output / "results").mkdir(parents=True, exist_ok=True)
        (output / "results" / "act_profile.txt").write_text(profile_act())
        section.notes.append("A goal was missed: cProfile of Orchestrator.act (the Act path below gRPC, in-process, "
                             "300 calls of one observation) is in results/act_profile.txt.")
    return section


@contextmanager
def _echo_process(replies: dict[str, bytes], model_path: str = "") -> Iterator[str]:
    """The echo server (with a model path: the forward-only server) in its own process; its address."""
    extra = [model_path] if model_path else []
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.act_latency", "echo", replies["Act"].hex(),
                                replies["ActBatch"].hex(), *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, cwd=str(BENCHMARKS_DIR.parent))
    try:
        assert process.stdout is not None
        yield f"127.0.0.1:{int(process.stdout.readline())}"
    finally:
        if process.stdin:
            process.stdin.close()
        process.wait(10)


def _latency_table(lat: dict[str, dict[str, list[float]]], fwd: dict[str, list[float]], repeats: int, calls: int,
                   quick: bool, section: Section) -> Table:
    """p50/p99 of Act and the echo side by side, the forward time, the ratio against the goal."""
    table = Table(f"Latency, ms ({repeats} repeats x {calls} calls per variant, interleaved; forward: "
                  f"{len(fwd['1'])} in-process calls of the compiled actor)",
                  ["observations", "Act p50", "Act p99", "echo p50", "echo p99", "forward p50", "forward-only p50",
                   "forward-only / echo", "Act p50 / echo p50", f"goal <= {GOAL}x"])
    summary = []
    for key in ("1", str(BATCH)):
        a50, a99 = percentile(lat["service"][key], 50) * 1e3, percentile(lat["service"][key], 99) * 1e3
        e50, e99 = percentile(lat["echo"][key], 50) * 1e3, percentile(lat["echo"][key], 99) * 1e3
        f50 = median(fwd[key]) * 1e3
        floor50 = percentile(lat[FORWARD_ONLY][key], 50) * 1e3
        r = ratio(a50, e50)
        met = None if quick else r <= GOAL
        table.rows.append([key, fmt(a50), fmt(a99), fmt(e50), fmt(e99), fmt(f50), fmt(floor50),
                           fmt_ratio(ratio(floor50, e50)), fmt_ratio(r),
                           {None: "not assessed", True: "met", False: "**NOT met**"}[met]])
        summary.append({"goal": f"Act p50, {key} obs, <= {GOAL}x echo p50",
                        "measured": f"{fmt_ratio(r)} ({fmt(a50)} ms vs {fmt(e50)} ms; forward {fmt(f50)} ms; "
                                    f"forward-only server {fmt_ratio(ratio(floor50, e50))})",
                        "met": met})
    section.data["summary"] = summary
    return table


if __name__ == "__main__":
    if sys.argv[1:2] == ["echo"]:
        echo_main(bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3]), *sys.argv[4:5])
