"""The server the fuzz suite attacks: real, on loopback, with budgets that keep accepted requests cheap
(MAX_TOTAL_TIMESTEPS small, one run at a time, few policies, small networks), a run and policies to aim at, and
sentinel files around its data directories to prove nothing is written outside them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from rl_service.cli.security import BearerToken
from rl_service.infra.auth_tokens import Role, new_token, token_line
from rl_service_proto.v1 import training_pb2_grpc
from tests.conftest import FAST_PPO, ServerHandle, start_server
from tests.support.proto_fuzz import SERVER_LIMITS, Hints, create_targets, target_hints

# One entry per way of reaching the server: settings overrides (given the root) and the metadata every call
# carries. Authentication adds "authenticated": an AUTH_TOKENS_FILE written under the root and its bearer token.
ServerKind = Callable[[Path], tuple[dict[str, Any], tuple[tuple[str, str], ...]]]


def _authenticated(root: Path) -> tuple[dict[str, Any], tuple[tuple[str, str], ...]]:
    """A server with AUTH_TOKENS_FILE; calls carry an admin's token, so every handler is reached."""
    token = new_token()
    tokens = root / "tokens"
    tokens.write_text(token_line("fuzzer", Role.ADMIN, token) + "\n")
    return {"auth_tokens_file": tokens}, (("authorization", f"Bearer {token}"),)


SERVER_KINDS: dict[str, ServerKind] = {"plain": lambda root: ({}, ()), "authenticated": _authenticated}


@dataclass
class FuzzTarget:
    """A running server, how to call it, what to aim at, and the sentinel files around it."""

    handle: ServerHandle
    root: Path
    metadata: tuple[tuple[str, str], ...]
    hints: Hints
    sentinel: dict[Path, str]
    baseline: set[Path] = field(default_factory=set)

    @property
    def data_dirs(self) -> tuple[Path, ...]:
        settings = self.handle.settings
        return tuple(p.resolve() for p in (settings.data_dir, settings.models_root, settings.checkpoint_root,
                                           settings.policies_root))

    def ensure_targets(self) -> None:
        """Recreate the policies a DeletePolicy case removed."""
        create_targets(self.handle.channel, self.metadata)

    def outside_data_dirs(self) -> set[Path]:
        """Every path below the root that is not inside a configured directory (sentinels, parents, cwd)."""
        # .coverage.* files are the test run's own: pytest-cov's subprocess coverage writes them into the working
        # directory of every worker process (the server's cwd here), not anything the server's code wrote.
        return {path for path in self.root.rglob("*") if not path.name.startswith(".coverage.")
                and not any(path.resolve() == d or path.resolve().is_relative_to(d) for d in self.data_dirs)}

    def new_paths_outside(self) -> list[str]:
        """What appeared outside the configured directories since the server started."""
        return sorted(str(p.relative_to(self.root)) for p in self.outside_data_dirs() - self.baseline)

    def sentinel_changes(self) -> list[str]:
        """Sentinel files whose content changed or that are gone."""
        return sorted(str(p) for p, digest in self.sentinel.items() if not p.is_file() or _digest(p) != digest)

    def serving(self) -> bool:
        """The server still answers its health check."""
        return self.handle.health_status() == health_pb2.HealthCheckResponse.SERVING


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plant_sentinels(root: Path) -> dict[Path, str]:
    # Where a path escape would land: beside the data directories, and the names fuzzed paths use.
    planted = {}
    for relative in ("sentinel/etc/passwd", "sentinel/model.zip", "sentinel/escape.zip", "sentinel/x.zip"):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(relative.encode())
        planted[path] = _digest(path)
    return planted


@pytest.fixture(scope="module", params=sorted(SERVER_KINDS))
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    """A fuzzable server with a finished run and two policies (one with a checkpoint) to aim at."""
    root = tmp_path_factory.mktemp("fuzz")
    sentinel = _plant_sentinels(root)
    overrides, metadata = SERVER_KINDS[request.param](root)
    cwd = root / "cwd"  # a relative path the server wrongly used would land here, outside the data directories
    cwd.mkdir()
    previous = os.getcwd()
    os.chdir(cwd)
    handle = start_server(root / "server", **{**SERVER_LIMITS, **overrides})
    if metadata:  # the fixture's own calls (start, status) carry the token too; fuzzed calls pass `metadata`
        token = dict(metadata)["authorization"].removeprefix("Bearer ")
        handle.stub = training_pb2_grpc.TrainingServiceStub(grpc.intercept_channel(handle.channel,
                                                                                   BearerToken(token)))
    try:
        run_id = handle.start(total_timesteps=256, hyperparameters=FAST_PPO)
        handle.wait_until(run_id, lambda s: s.is_done, timeout=120)
        fuzz = FuzzTarget(handle, root, metadata, target_hints([run_id]), sentinel)
        fuzz.ensure_targets()
        fuzz.baseline = fuzz.outside_data_dirs()
        yield fuzz
    finally:
        handle.stop()
        os.chdir(previous)
