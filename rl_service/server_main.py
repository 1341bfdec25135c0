"""Entry point of the server: flags override environment variables, which override embedded defaults."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from rl_service.infra.config_errors import ConfigurationError
from rl_service.infra.settings import Settings, describe_validation_error

# flag -> Settings field; every flag is optional and only overrides when given.
_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--host", "grpc_host", str, "address to listen on (GRPC_HOST)"),
    ("--port", "grpc_port", int, "port to listen on, 0 for any (GRPC_PORT)"),
    ("--data-dir", "data_dir", str, "run registry directory (DATA_DIR)"),
    ("--models-dir", "models_dir", str, "models directory (MODELS_DIR)"),
    ("--checkpoint-dir", "checkpoint_dir", str, "checkpoints directory (CHECKPOINT_DIR)"),
    ("--log-level", "log_level", str, "DEBUG, INFO, WARNING or ERROR (LOG_LEVEL)"),
    ("--log-format", "log_format", str, "json or console (LOG_FORMAT)"),
    ("--max-concurrent-runs", "max_concurrent_runs", int, "runs training at once (MAX_CONCURRENT_RUNS)"),
    ("--max-queued-runs", "max_queued_runs", int, "pending runs before refusing (MAX_QUEUED_RUNS)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "checkpoints kept per run (KEEP_CHECKPOINTS)"),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(prog="server.py", description="Run the RL training service (gRPC).")
    for flag, dest, kind, text in _FLAGS:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    parser.add_argument("--env-file", default=".env", help="optional dotenv file read before the environment")
    return parser.parse_args(argv)


def load_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from flags, environment and .env; exits 2 with one line naming the bad variable."""
    args = parse_args(argv)
    overrides: dict[str, Any] = {dest: getattr(args, dest) for _, dest, _, _ in _FLAGS
                                 if getattr(args, dest) is not None}
    try:
        return Settings(_env_file=args.env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        sys.stderr.write(describe_validation_error(exc) + "\n")
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Start the server and block until SIGTERM/SIGINT has stopped it gracefully."""
    settings = load_settings(argv)
    from rl_service.infra.logging_setup import configure_logging, get_logger

    configure_logging(settings.log_level, settings.log_format)
    from rl_service.transport.server_factory import build_server, install_signal_handlers, log_started

    try:
        # On the main thread, which lives as long as the process: the fork server dies when the thread that
        # started it ends. OSError includes DataDirInUse (another server holds DATA_DIR); a ConfigurationError
        # names the setting at fault (a TLS file, AUTH_TOKENS_FILE and its line, a public address without both).
        running = build_server(settings)
    except ConfigurationError as exc:
        # A file a setting names is unusable, or the address needs TLS and tokens: one line, as for a bad value.
        sys.stderr.write(f"cannot start: {exc}\n")
        return 2
    except OSError as exc:
        get_logger("server").error("cannot start", error=str(exc))
        return 1
    done = install_signal_handlers(running)
    log_started(running)  # only now: a SIGTERM sent on seeing this line finds its handler installed
    # Everything built so far (torch, grpc, the modules) lives as long as the process: keep it out of the cyclic
    # collector's scans, which otherwise cost every RPC that allocates enough to trigger one.
    gc.freeze()
    while not done.wait(0.5):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
