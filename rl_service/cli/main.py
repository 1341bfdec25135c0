"""`rl-service`: one console command for the service. `serve` starts a server; the others are gRPC clients.

Exit codes: 0 success; 1 the server answered with an error (printed as `ERROR <CODE>: <message>`, and on a
second line `field: <path>` when the error names a request field) or the run did not succeed; 2 the server cannot
be reached (one line naming the address) or the command line is wrong (usage printed); 130 Ctrl+C detached from a
run that keeps training. `health` is a probe: 0 SERVING, 1 not serving or unreachable (its line says why), 2 only
for a wrong command line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

import rl_service
from rl_service.cli import commands, tokens
from rl_service.cli.client import ADDRESS_VARIABLE, EXIT_INTERRUPTED, EXIT_USAGE, CliError, default_address
from rl_service.cli.formatting import Output
from rl_service.cli.security import TOKEN_VARIABLE
from rl_service.infra.auth_tokens import ROLE_LABELS
from rl_service_proto.v1 import training_pb2 as pb

EXPORT_FORMATS = ("torchscript", "onnx", "sb3")
RUN_STATES = tuple(v.name for v in pb.RunState.DESCRIPTOR.values if v.number != pb.RUN_STATE_UNSPECIFIED)
PROG = "rl-service"


def _serve(argv: Sequence[str]) -> int:
    from rl_service.server_main import main as server_main

    return server_main(list(argv))


def _env_server(argv: Sequence[str]) -> int:
    try:
        module = importlib.import_module("rl_service.envserver")
    except ModuleNotFoundError as exc:
        if exc.name not in ("rl_service.envserver", "rl_service"):
            raise
        module = None
    entry = getattr(module, "main", None)
    if entry is None:
        sys.stderr.write(f"{PROG} env-server: the reference environment server (rl_service.envserver) is not "
                         "part of this installation yet\n")
        return EXIT_USAGE
    return int(entry(list(argv)))


# Subcommands that own their whole command line: everything after the name goes to them unparsed.
PASSTHROUGH: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "serve": (_serve, "start the server (the same as server.py; `serve --help` lists its flags)"),
    "env-server": (_env_server, "serve a Gymnasium environment over the external-environment protocol"),
}


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value.strip()


def _observation(text: str) -> list[float]:
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise argparse.ArgumentTypeError("expected numbers separated by commas, e.g. 0.1,0.2,0.3,0.4")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _state(text: str) -> str:
    name = text.strip().upper()
    if name not in RUN_STATES:
        raise argparse.ArgumentTypeError(f"unknown state {text!r}; choose from {', '.join(RUN_STATES)}")
    return name


def add_connection_flags(parser: argparse.ArgumentParser, after_command: bool) -> None:
    """--address, --timeout and the security flags. They may come before the command (the defaults live there) or
    after it (`after_command`: a flag given there overrides; one not given leaves the earlier value alone)."""
    def default(value: object) -> object:
        return argparse.SUPPRESS if after_command else value

    group = parser.add_argument_group("connection")
    group.add_argument("--address", default=default(default_address()),
                       help=f"server host:port (default ${ADDRESS_VARIABLE} or 127.0.0.1:50051)")
    group.add_argument("--timeout", type=_positive_float, default=default(None), metavar="SECONDS",
                       help="deadline of each call and of connecting (default: 5 s to connect, 30 s per call, "
                            "longer for stop and export; streams have none)")
    group.add_argument("--tls", action="store_true", default=default(False),
                       help="connect over TLS (implied by --ca-file, --cert-file and --key-file)")
    group.add_argument("--ca-file", default=default(None), metavar="PEM",
                       help="CA certificates the server's certificate must chain to (default: the system's)")
    group.add_argument("--cert-file", default=default(None), metavar="PEM",
                       help="client certificate, for a server that asks for one (mutual TLS; with --key-file)")
    group.add_argument("--key-file", default=default(None), metavar="PEM", help="the client certificate's key")
    group.add_argument("--token", default=default(None),
                       help=f"bearer token sent with every call (default ${TOKEN_VARIABLE})")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree: one subparser per command."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train reinforcement-learning policies on an rl-service server from the terminal.",
        epilog=f"Client commands talk to --address (default ${ADDRESS_VARIABLE} or 127.0.0.1:50051) over the "
               "public gRPC API. Exit codes: 0 ok, 1 server error or run not SUCCEEDED, 2 server unreachable or "
               "bad usage, 130 detached with Ctrl+C (health: 0 SERVING, 1 not serving or unreachable, 2 bad usage). "
               "Connection flags go before or after the command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {rl_service.__version__}")
    add_connection_flags(parser, after_command=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    connection = argparse.ArgumentParser(add_help=False)
    add_connection_flags(connection, after_command=True)
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for scripts instead of text")
    client = [connection, as_json]

    for name, (_, text) in PASSTHROUGH.items():
        sub.add_parser(name, help=text, add_help=False)

    train = sub.add_parser("train", parents=client, help="start a run and follow it with a live progress bar",
                           description="Start a training run and follow it until it ends (exit 0 if SUCCEEDED). "
                                       "Ctrl+C asks whether to stop the run or detach from it.")
    train.add_argument("--algo", "--algorithm", dest="algo", required=True, help="PPO, A2C, DQN, ...")
    train.add_argument("--env", required=True, help="a registered Gymnasium id (CartPole-v1), or a simulation's "
                                                    "address (grpc://HOST:PORT, unix:NAME)")
    train.add_argument("--timesteps", type=_positive_int, required=True, help="total timesteps to train for")
    train.add_argument("--hp", type=_key_value, action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="a hyperparameter, e.g. --hp n_steps=256 learning_rate=lin_0.001 (repeatable)")
    train.add_argument("--seed", type=int, default=None, help="random seed (default: the server picks one)")
    train.add_argument("--experiment", default="", help="experiment label (default: 'default')")
    train.add_argument("--checkpoint-interval", type=_positive_int, default=0, metavar="TIMESTEPS",
                       help="timesteps between checkpoints (default: the server's)")
    train.add_argument("--model-output", default="", metavar="PATH",
                       help="final model path relative to the server's MODELS_DIR (default <run_id>/model.zip)")
    train.add_argument("--detach", action="store_true", help="print the run id and return at once")
    train.set_defaults(handler=commands.cmd_train)

    status = sub.add_parser("status", parents=client, help="show one run's status")
    status.add_argument("run_id", metavar="RUN")
    status.set_defaults(handler=commands.cmd_status)

    listing = sub.add_parser("list", parents=client, help="list runs as a table, newest first")
    listing.add_argument("--experiment", default=None, help="only this experiment")
    listing.add_argument("--state", type=_state, default=None, help=f"only this state ({', '.join(RUN_STATES)})")
    listing.set_defaults(handler=commands.cmd_list)

    watch = sub.add_parser("watch", parents=client, help="follow a run with a live progress bar until it ends")
    watch.add_argument("run_id", metavar="RUN")
    watch.set_defaults(handler=commands.cmd_watch)

    stop = sub.add_parser("stop", parents=client, help="stop a run (it saves a final checkpoint and model)")
    stop.add_argument("run_id", metavar="RUN")
    stop.set_defaults(handler=commands.cmd_stop)

    resume = sub.add_parser("resume", parents=client, help="continue a finished run from its newest checkpoint "
                                                           "and follow it with a live progress bar")
    resume.add_argument("run_id", metavar="RUN")
    resume.add_argument("--timesteps", type=_positive_int, default=None, metavar="N",
                        help="train to this total (extends the run; needed to train a SUCCEEDED run further)")
    resume.add_argument("--detach", action="store_true", help="print the run id and return at once")
    resume.set_defaults(handler=commands.cmd_resume)

    delete = sub.add_parser("delete", parents=client, help="delete a finished run with its checkpoints and models")
    delete.add_argument("run_id", metavar="RUN")
    delete.set_defaults(handler=commands.cmd_delete)

    act = sub.add_parser("act", parents=client, help="ask a run's policy for an action",
                         description="Actions from the run's final model, or its newest checkpoint while it "
                                     "trains. Give --obs once for Act, several times for ActBatch.")
    act.add_argument("run_id", metavar="RUN")
    act.add_argument("--obs", type=_observation, action="append", required=True, metavar="X,Y,...",
                     help="an observation, flattened (write --obs=-0.1,0.2 when it starts with a minus sign)")
    act.add_argument("--stochastic", action="store_true", help="sample the action instead of the most likely one")
    act.set_defaults(handler=commands.cmd_act)

    plot = sub.add_parser("plot", parents=client, help="draw the run's learning curve into a PNG",
                          description="Episode reward, its moving average and episode length over timesteps, "
                                      "from the run's history (as of its latest checkpoint), as a 1000x600 PNG.")
    plot.add_argument("run_id", metavar="RUN")
    plot.add_argument("-o", "--output", default=None, metavar="FILE", help="PNG to write (default <RUN>.png)")
    plot.add_argument("--window", type=_positive_int, default=None, metavar="EPISODES",
                      help="episodes in the moving average (default: a tenth of the episodes, 10 to 100)")
    plot.set_defaults(handler=commands.cmd_plot)

    export = sub.add_parser("export", parents=client, help="export the trained policy to a file",
                            description="torchscript: a TorchScript module, float32 observations [batch, ...] -> "
                                        "deterministic actions (torch.jit.load). onnx: the same program as ONNX "
                                        "(input 'obs', output 'action'). sb3: "
                                        "stable-baselines3's zip (PPO.load and friends).")
    export.add_argument("run_id", metavar="RUN")
    export.add_argument("--format", required=True, type=str.lower, choices=EXPORT_FORMATS)
    export.add_argument("-o", "--output", default=None, metavar="FILE",
                        help="file to write (default: the server's suggestion, <RUN>.pt, .onnx or .zip)")
    export.set_defaults(handler=commands.cmd_export)

    health = sub.add_parser("health", parents=client, help="check the server's health (as healthcheck.py)",
                            description="Ask the health service once and print one line: the status, or why no "
                                        "server answered. Exit 0 when SERVING, 1 when not serving or unreachable, "
                                        "2 for a wrong command line.")
    health.add_argument("--service", default="", help="service name; empty for the whole server")
    health.set_defaults(handler=commands.cmd_health)

    token = sub.add_parser("token", help="make bearer tokens for a server's AUTH_TOKENS_FILE (offline)")
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION", title="actions")
    create = token_sub.add_parser("create", parents=[as_json], help="print a new random token and its line",
                                  description="Print a new random token (256 bits) and the AUTH_TOKENS_FILE line "
                                              "`NAME ROLE sha256:HEX` that grants it ROLE; needs no server.")
    create.add_argument("name", metavar="NAME", type=tokens.principal_name,
                        help="who holds the token (1-64 of A-Z a-z 0-9 _ . -); runs and policies it creates "
                             "record it as their owner")
    create.add_argument("--role", required=True, choices=ROLE_LABELS,
                        help="reader < actor < trainer < admin; each includes the ones before")
    create.set_defaults(handler=tokens.cmd_token_create)
    token.set_defaults(handler=lambda args, output: _usage(token))
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    """A command that needs an action and got none: its help on stderr, exit 2."""
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def run(argv: Sequence[str] | None = None, output: Output | None = None) -> int:
    """Parse and run one command; returns the exit code. Tests pass `output` to capture rendered text."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in PASSTHROUGH:
        return PASSTHROUGH[args_list[0]][0](args_list[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # usage errors (2) and --help / --version (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    output = output or Output.standard()
    try:
        return int(args.handler(args, output))
    except CliError as exc:
        output.note(exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        output.note("interrupted")
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`rl-service`)."""
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
