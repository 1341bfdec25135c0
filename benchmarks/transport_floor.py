"""Microbenchmark: what one round trip to another process costs on this machine, with and without gRPC, and what
blocking for it does to the training loop around it. The evidence behind the external-env analysis
(results/external_env.md).

- pingpong:   one byte over a socket pair to an echo process and back (the floor of any cross-process exchange)
- grpc echo:  an empty Step exchange with a sync gRPC server in its own process: the Session stream and unary
              calls, over loopback TCP and a unix domain socket
- blocking:   in-process PPO (CartPole-v1, 8 envs, zoo settings) with 0.5 ms added to every vector step, once by
              sleeping (the thread blocks, as it does waiting for a simulation) and once by spinning; times of
              train() and of the rest of the loop (policy forward, buffer) are reported apart from the wait

Each measure is repeated, interleaved, and reported as medians. Writes benchmarks/results/transport_floor.{json,md}.

    python -m benchmarks.transport_floor [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

# benchmarks.external_env (torch, stable-baselines3) is imported where needed: the echo server child stays light.
from benchmarks.common import write_keeping_analysis
from rl_service.infra.cpu_placement import format_cpu_list, parse_cpu_list, pin_this_process
from rl_service.infra.external_env.grpc_adapter import SessionStream
from rl_service_proto.v1 import environment_pb2 as pb
from rl_service_proto.v1 import environment_pb2_grpc as pb_grpc

N_ENVS = 8
_RESPONSE = pb.StepResponse(rewards=[1.0] * N_ENVS, terminated=[False] * N_ENVS, truncated=[False] * N_ENVS)
WARMUP = 200
RESULTS = Path(__file__).resolve().parent / "results"


class EchoServicer(pb_grpc.EnvironmentServiceServicer):  # type: ignore[misc]
    """Answers every Step, unary or on the Session stream, with the same small response."""

    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepResponse:
        return _RESPONSE

    def Session(self, requests: Iterator[pb.SessionRequest], context: grpc.ServicerContext
                ) -> Iterator[pb.SessionResponse]:
        for _ in requests:
            yield pb.SessionResponse(step=_RESPONSE)


def serve_echo(target: str) -> None:
    """Serve EchoServicer on `target` until stdin closes (run as a child process)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_EnvironmentServiceServicer_to_server(EchoServicer(), server)
    server.add_insecure_port(target)
    server.start()
    print("ready", flush=True)
    sys.stdin.read()
    server.stop(0)


class EchoPeer:
    """Another process that sends back each byte it gets over a socket pair: `exchange` is one round trip."""

    _PROGRAM = ("import socket, sys\n"
                "peer = socket.socket(fileno=int(sys.argv[1]))\n"
                "while data := peer.recv(1):\n"
                "    peer.send(data)\n")

    def __init__(self) -> None:
        self._socket, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, "-c", self._PROGRAM, str(theirs.fileno())],
                                        pass_fds=(theirs.fileno(),))
        theirs.close()

    def exchange(self) -> None:
        """Send a byte and wait for it to come back."""
        self._socket.send(b"x")
        if self._socket.recv(1) != b"x":
            raise RuntimeError("the echo peer went away")

    def close(self) -> None:
        """Close the socket, which ends the peer, and wait for it."""
        self._socket.close()
        self.process.wait(timeout=10)


def pingpong_us(exchanges: int) -> float:
    """Median microseconds of a 1-byte round trip over a socket pair to an echo process."""
    peer = EchoPeer()
    try:
        return _median_us(peer.exchange, exchanges)
    finally:
        peer.close()


def grpc_echo_us(target: str, exchanges: int, server_cpus: frozenset[int] | None = None) -> dict[str, float]:
    """Median microseconds of an empty Step exchange on the Session stream (driven as the adapter drives it) and
    as a unary call; the echo server pinned to `server_cpus` when given."""
    pin = [] if server_cpus is None else ["--serve-cpus", format_cpu_list(server_cpus)]
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.transport_floor", "--serve", target, *pin],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"echo server on {target} did not start")
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.EnvironmentServiceStub(channel)
            session = SessionStream(stub, timeout=10.0)
            message = pb.SessionRequest(step=pb.StepRequest())
            try:
                stream = _median_us(lambda: session.exchange(message), exchanges)
            finally:
                session.close()
            request = pb.StepRequest()
            return {"stream": stream, "unary": _median_us(lambda: stub.Step(request, timeout=10), exchanges)}
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=10)


def _median_us(exchange: Callable[[], object], exchanges: int) -> float:
    """Median microseconds of `exchange`, after a warm-up (connection set-up, first-call costs) left out."""
    warmup = min(WARMUP, exchanges)
    times = []
    for _ in range(warmup + exchanges):
        started = time.perf_counter()
        exchange()
        times.append(time.perf_counter() - started)
    return statistics.median(times[warmup:]) * 1e6


def blocking_penalty(timesteps: int, wait_seconds: float, how: str) -> dict[str, float]:
    """In-process PPO with `wait_seconds` added to each vector step by sleeping or spinning; seconds spent where."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    from benchmarks.external_env import ENV_ID, train_once

    spent = {"train": 0.0, "step": 0.0}
    original_train = PPO.train

    def timed_train(self: Any) -> None:
        started = time.perf_counter()
        original_train(self)
        spent["train"] += time.perf_counter() - started

    env = make_vec_env(ENV_ID, n_envs=N_ENVS, seed=0)
    original_step = env.step

    def waiting_step(actions: Any) -> Any:
        started = time.perf_counter()
        if how == "sleep":
            time.sleep(wait_seconds)
        elif how == "spin":
            while time.perf_counter() - started < wait_seconds:
                pass
        result = original_step(actions)
        spent["step"] += time.perf_counter() - started
        return result

    env.step = waiting_step  # type: ignore[method-assign]
    PPO.train = timed_train  # type: ignore[method-assign]
    try:
        outcome = train_once(env, timesteps, seed=0)
    finally:
        PPO.train = original_train  # type: ignore[method-assign]
        env.close()
    return {"steps_per_second": outcome["steps_per_second"], "train_seconds": spent["train"],
            "rest_seconds": outcome["seconds"] - spent["train"] - spent["step"]}


def run(repeats: int, exchanges: int, timesteps: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every measure `repeats` times, interleaved."""
    import torch

    from benchmarks.external_env import machine_facts, median

    torch.set_num_threads(1)
    machine = machine_facts()  # the date and load average at the start
    raw: dict[str, list[float]] = {}
    blocking: dict[str, list[dict[str, float]]] = {"none": [], "sleep": [], "spin": []}
    with tempfile.TemporaryDirectory(prefix="rlsvc-floor-") as folder:
        for repeat in range(repeats):
            raw.setdefault("pingpong", []).append(pingpong_us(exchanges))
            targets = {"tcp": f"127.0.0.1:{free_port()}", "unix": f"unix:{folder}/echo-{repeat}.sock"}
            for name, target in targets.items():
                for mode, value in grpc_echo_us(target, exchanges).items():
                    raw.setdefault(f"grpc_{mode}_{name}", []).append(value)
            for how in blocking:
                blocking[how].append(blocking_penalty(timesteps, 0.0005, how))
            progress(f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.0f} us" for k, v in raw.items()))
    return {"machine": machine, "repeats": repeats, "exchanges": exchanges, "timesteps": timesteps,
            "round_trip_us": {k: round(median(v), 1) for k, v in raw.items()}, "raw": raw,
            "blocking": {how: {key: round(median([r[key] for r in runs]), 3) for key in runs[0]}
                         for how, runs in blocking.items()}, "blocking_runs": blocking}


def free_port() -> int:
    """A loopback TCP port that is free now (the echo server binds it next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables."""
    from benchmarks.external_env import ENV_ID

    machine = results["machine"]
    trips = results["round_trip_us"]
    lines = [
        "# Transport floor: one round trip to another process",
        "",
        f"{machine['date']} on {machine['cpu']} ({machine['logical_cores']} logical cores, load average "
        f"{machine['load_average_at_start']} at start), grpcio {machine['grpcio']}"
        + (f", GRPC_EXPERIMENTS={machine['grpc_experiments']}" if machine.get("grpc_experiments") else "")
        + f". {results['repeats']} repeats interleaved, each the median of {results['exchanges']} exchanges; the "
        "table gives the median of the repeats.",
        "",
        "| exchange | us per round trip |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {value} |" for name, value in trips.items()]
    blocking = results["blocking"]
    lines += [
        "",
        f"In-process PPO ({ENV_ID}, {N_ENVS} envs, zoo settings, {results['timesteps']} timesteps) with 0.5 ms added "
        "to every vector step. 'rest' is the loop outside train() and the step (policy forward, buffer, callbacks).",
        "",
        "| wait | training steps/s | train() s | rest s |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {how} | {row['steps_per_second']:.0f} | {row['train_seconds']:.2f} | {row['rest_seconds']:.2f} |"
              for how, row in blocking.items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the microbenchmark (or, with --serve, be its echo server) and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--exchanges", type=int, default=2000)
    parser.add_argument("--timesteps", type=int, default=20_000)
    parser.add_argument("--output", type=Path, default=RESULTS / "transport_floor")
    parser.add_argument("--serve", metavar="TARGET", help=argparse.SUPPRESS)
    parser.add_argument("--serve-cpus", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        if args.serve_cpus:
            pin_this_process(frozenset(parse_cpu_list(args.serve_cpus)))
        serve_echo(args.serve)
        return 0
    results = run(args.repeats, args.exchanges, args.timesteps, lambda line: print(line, flush=True))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_keeping_analysis(args.output.with_suffix(".md"), markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
