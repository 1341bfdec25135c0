"""Command line of the reference environment server (`python -m rl_service.envserver`, `rl-service env-server`).

The first line on stdout is "serving <env> (<n> envs) on <address>", the address being grpc://<host>:<port> (so a
parent process that asked for port 0 can read the port), grpcs://<host>:<port> with --tls-cert-file and
--tls-key-file (TLS only), or, with --unix, unix:///<absolute path>. SIGTERM or SIGINT stops it (and removes the
socket file). --processes P spreads the envs over P worker processes (env i in process i * P // num_envs), which
end with the server, however it ends. --cpus pins the server and its workers to a list of CPUs. --gym-packages
(default: the GYM_PACKAGES variable, as the training service reads it) names modules imported first, so the
Gymnasium environments they register can be served.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from functools import partial

from rl_service.envserver.process_batch import ProcessBatch
from rl_service.envserver.reference_server import (
    DEFAULT_MAX_MESSAGE_BYTES,
    AnyBatch,
    ReferenceEnvironmentServicer,
    server_version,
    start_env_server,
)
from rl_service.envserver.step_cost import MAX_STEP_COST_US, make_costly
from rl_service.infra.cpu_placement import format_cpu_list, parse_cpu_list, pin_this_process, usable_cpus
from rl_service.infra.external_env.codec import MAX_NUM_ENVS
from rl_service.infra.external_env.env_batch import EnvBatch, action_masks_method
from rl_service.infra.settings import split_modules
from rl_service.infra.tls import TlsFileError, load_server_tls

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50061
# Names in error messages (the third is never used: the training service presents no client certificate).
_TLS_FLAGS = ("--tls-cert-file", "--tls-key-file", "--tls-client-ca-file")


def build_parser() -> argparse.ArgumentParser:
    """The env-server flags."""
    parser = argparse.ArgumentParser(
        prog="rl-service env-server",
        description="Serve a Gymnasium environment over the rl_service.v1.EnvironmentService protocol.")
    parser.add_argument("--env", required=True, help="a registered Gymnasium id, e.g. CartPole-v1")
    parser.add_argument("--num-envs", type=int, default=1, help=f"envs stepped together (1..{MAX_NUM_ENVS})")
    parser.add_argument("--host", help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, help=f"port to listen on (default {DEFAULT_PORT}); 0 picks a free one")
    parser.add_argument("--unix", metavar="PATH",
                        help="listen on this unix domain socket instead of a TCP port (a stale socket left there by "
                             "a previous run is replaced; any other file is not)")
    parser.add_argument("--tls-cert-file", metavar="PEM",
                        help="serve TLS only (grpcs://) with this certificate chain; needs --tls-key-file")
    parser.add_argument("--tls-key-file", metavar="PEM", help="the private key of --tls-cert-file")
    parser.add_argument("--raw-observations", action="store_true",
                        help="send observations as little-endian bytes (fastest for large observations)")
    parser.add_argument("--step-cost-us", type=float, default=0.0, metavar="US",
                        help="busy work per env step, in microseconds, standing in for an expensive simulator "
                             f"(benchmarks; 0 to {MAX_STEP_COST_US:g})")
    parser.add_argument("--processes", type=int, default=1, metavar="P",
                        help="spread the envs over P worker processes (1..--num-envs; default 1: all in this "
                             "process): env i lives in process i * P // num_envs, contiguous blocks whose sizes "
                             "differ by at most one when P does not divide --num-envs; requests on different "
                             "processes run at the same time")
    parser.add_argument("--cpus", default="", metavar="LIST",
                        help="pin the server, and its worker processes, to these CPUs (a Linux CPU list such as "
                             "1 or 2-3): keep them off the CPUs the trainer has (the service's WORKER_CPUS)")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="largest gRPC message sent or accepted")
    parser.add_argument("--gym-packages", default=os.environ.get("GYM_PACKAGES", ""), metavar="MODULES",
                        help="comma-separated modules to import first, for the environments they register "
                             "(default: $GYM_PACKAGES)")
    return parser


def _cpus(parser: argparse.ArgumentParser, text: str) -> frozenset[int]:
    """--cpus as a set of CPUs this process may use (empty: not pinned); a usage error otherwise."""
    try:
        cpus = parse_cpu_list(text)
    except ValueError as exc:
        parser.error(f"--cpus: {exc}")
    if not cpus:
        return frozenset()
    usable = usable_cpus()
    if usable is None:
        parser.error("--cpus: this platform cannot pin processes to CPUs (no sched_setaffinity)")
    missing = [cpu for cpu in cpus if cpu not in usable]
    if missing:
        parser.error(f"--cpus: CPU {missing[0]} is not one this process may run on (it may use "
                     f"{format_cpu_list(usable)})")
    return frozenset(cpus)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the exit code (2 for bad arguments or an env that cannot be created)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.num_envs <= MAX_NUM_ENVS:
        parser.error(f"--num-envs must be in 1..{MAX_NUM_ENVS}")
    if not 1 <= args.processes <= args.num_envs:
        parser.error(f"--processes must be in 1..{args.num_envs} (at most one process per env, --num-envs)")
    if args.unix is not None and (args.host is not None or args.port is not None):
        parser.error("--unix cannot be combined with --host or --port")
    if not 0.0 <= args.step_cost_us <= MAX_STEP_COST_US:
        parser.error(f"--step-cost-us must be in 0..{MAX_STEP_COST_US:g}")
    if args.port is not None and not 0 <= args.port <= 65535:
        parser.error("--port must be in 0..65535")
    if args.unix is not None and args.tls_cert_file is not None:
        parser.error("--unix cannot be combined with --tls-cert-file (TLS is served on --host/--port)")
    cpus = _cpus(parser, args.cpus)
    if cpus:
        pin_this_process(cpus)  # before any thread or worker process starts, so they all stay on these CPUs
    try:
        tls = load_server_tls(args.tls_cert_file, args.tls_key_file, names=_TLS_FLAGS)
    except TlsFileError as exc:
        parser.error(str(exc))
    modules = split_modules(args.gym_packages)
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # not installed, or failing on import
            print(f"env-server: --gym-packages: cannot import {module!r}: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return 2
    batch: AnyBatch
    try:
        if args.processes == 1:
            batch = EnvBatch.from_gym_id(args.env, args.num_envs, version=server_version(),
                                         make=partial(make_costly, cost_us=args.step_cost_us))
        else:
            batch = ProcessBatch(args.env, args.num_envs, args.processes, args.step_cost_us, modules,
                                 version=server_version())
    except Exception as exc:  # unknown id, missing optional dependency, a worker that cannot start...
        print(f"env-server: cannot create {args.env!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    has_masks_method = (batch.has_masks_method if isinstance(batch, ProcessBatch) else
                        action_masks_method(batch.envs[0]) is not None)
    if not batch.serves_action_masks and has_masks_method:
        print(f"env-server: {args.env} has action_masks() but its action space is {batch.action_space}; masks "
              "travel for Discrete action spaces only, so none are sent", file=sys.stderr)
    try:
        handle = start_env_server(ReferenceEnvironmentServicer(batch, args.raw_observations),
                                  args.host or DEFAULT_HOST, DEFAULT_PORT if args.port is None else args.port,
                                  max_message_bytes=args.max_message_bytes, unix_socket=args.unix, tls=tls)
    except (OSError, ValueError) as exc:
        print(f"env-server: {exc}", file=sys.stderr)
        batch.close()
        return 2
    print(f"serving {args.env} ({args.num_envs} envs) on {handle.address}", flush=True)
    stopped = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stopped.wait()
    handle.stop(grace=1)
    batch.close()
    return 0
