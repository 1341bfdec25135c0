"""The command line's security flags: `token create` offline, --token (and $RL_SERVICE_TOKEN) against a server with
AUTH_TOKENS_FILE, owners in `status` and `list`, and --tls/--ca-file/--cert-file/--key-file against TLS servers
built from a test PKI."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from rl_service.infra.auth_tokens import Role, new_token, parse_line, token_line
from rl_service_proto.v1 import training_pb2 as pb
from rl_service_proto.v1 import training_pb2_grpc as pb_grpc
from tests.conftest import FAST_PPO, ServerHandle, start_server
from tests.integration.test_cli import cli
from tests.support import certs


def test_token_create_prints_a_token_and_the_line_that_grants_it(tmp_path: Path) -> None:
    made = cli("token", "create", "ci.bot-1", "--role", "actor")
    assert made.code == 0, made.err
    token_row, line_row = made.out.splitlines()
    token, line = token_row.removeprefix("token: "), line_row.removeprefix("line:  ")
    entry = parse_line(line)
    assert entry is not None and (entry.name, entry.role) == ("ci.bot-1", Role.ACTOR)
    assert entry.digest == hashlib.sha256(token.encode()).digest() and len(token) >= 43
    assert token not in line and "AUTH_TOKENS_FILE" in made.err
    data = json.loads(cli("token", "create", "ops", "--role", "admin", "--json").out)
    assert data["line"] == token_line("ops", Role.ADMIN, data["token"]) and data["role"] == "admin"
    assert data["token"] != token


@pytest.mark.parametrize("argv", [
    ["token", "create", "two words", "--role", "reader"],
    ["token", "create", "x" * 65, "--role", "reader"],
    ["token", "create", "bob", "--role", "root"],
    ["token", "create", "bob"],
    ["token", "create"],
    ["token"],
])
def test_token_create_refuses_bad_names_and_roles(argv: list[str]) -> None:
    result = cli(*argv)
    assert result.code == 2 and not result.out, argv


# ----------------------------------------------------------------------------------------------- --token


@dataclass
class Secured:
    handle: ServerHandle
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("cli-auth")
    made = json.loads(cli("token", "create", "alice", "--role", "trainer", "--json").out)  # the CLI's own line
    reader = new_token()
    (root / "tokens").write_text(f"{made['line']}\n{token_line('rita', Role.READER, reader)}\n")
    handle = start_server(root, auth_tokens_file=root / "tokens")
    yield Secured(handle, {"alice": made["token"], "rita": reader})
    handle.stop()


def test_every_command_sends_the_token_and_shows_owners(secured: Secured, monkeypatch: pytest.MonkeyPatch) -> None:
    address, alice, rita = secured.handle.address, secured.tokens["alice"], secured.tokens["rita"]
    monkeypatch.delenv("RL_SERVICE_TOKEN", raising=False)
    hp = [f"{k}={v}" for k, v in FAST_PPO.items()]
    started = cli("train", "--address", address, "--token", alice, "--algo", "PPO", "--env", "CartPole-v1",
                  "--timesteps", "100000", "--detach", "--hp", *hp)
    assert started.code == 0, started.err
    run_id = started.out.strip()
    try:
        # Flags before the command (global) or after it; the token from the environment.
        assert cli("--address", address, "--token", rita, "status", run_id).code == 0
        monkeypatch.setenv("RL_SERVICE_TOKEN", rita)
        status = cli("status", run_id, "--address", address)
        assert status.code == 0 and "owner" in status.out and "alice" in status.out, status
        assert json.loads(cli("status", run_id, "--address", address, "--json").out)["owner"] == "alice"
        listing = cli("list", "--address", address)
        header, *rows = listing.out.splitlines()
        assert header.split()[:3] == ["RUN", "EXPERIMENT", "OWNER"]
        assert any(row.startswith(run_id) and row.split()[2] == "alice" for row in rows), listing.out
        denied = cli("stop", run_id, "--address", address)  # the reader's token, from the environment
        assert denied.code == 1 and denied.err.startswith("ERROR PERMISSION_DENIED: ")
        monkeypatch.delenv("RL_SERVICE_TOKEN")
        anonymous = cli("status", run_id, "--address", address)
        assert anonymous.code == 1 and anonymous.err.startswith("ERROR UNAUTHENTICATED: this server needs a bearer")
        # The streaming watch carries the token too: it follows the run to its end once alice stops it.
        assert cli("stop", run_id, "--address", address, "--token", alice).code == 0
        watched = cli("watch", run_id, "--address", address, "--token", rita, "--json")
        assert json.loads(watched.out.splitlines()[-1])["state"] == "CANCELLED"
        # Health is open: no token needed.
        assert cli("health", "--address", address).code == 0
    finally:
        secured.handle.stub.StopTraining(pb.RunRequest(run_id=run_id), timeout=120,
                                         metadata=[("authorization", f"Bearer {alice}")])


def test_a_token_gRPC_metadata_cannot_carry_is_a_usage_error(secured: Secured,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("two words", "caf\u00e9", "x" * 5000):
        result = cli("list", "--address", secured.handle.address, "--token", bad)
        assert result.code == 2 and result.err.startswith("--token: a token is printable ASCII"), result
        assert bad not in result.err
    monkeypatch.setenv("RL_SERVICE_TOKEN", "new\nline")
    result = cli("list", "--address", secured.handle.address)
    assert result.code == 2 and result.err.startswith("$RL_SERVICE_TOKEN: ")


# ----------------------------------------------------------------------------------------------- --tls


class EchoTraining(pb_grpc.TrainingServiceServicer):  # type: ignore[misc]
    """Answers GetTrainingStatus and remembers the authorization metadata each call carried."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def GetTrainingStatus(self, request: pb.RunRequest, context: grpc.ServicerContext) -> pb.TrainingStatus:
        self.seen.append(dict(context.invocation_metadata()).get("authorization", ""))
        return pb.TrainingStatus(run_id=request.run_id, owner="tls-owner", state=pb.RUNNING)


@dataclass
class TlsServers:
    pki: certs.TestPki
    tls: str  # server-authenticated TLS
    mutual: str  # TLS that asks for a client certificate signed by the test CA
    servicer: EchoTraining


@pytest.fixture(scope="module")
def tls_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServers]:
    pki = certs.make_test_pki(tmp_path_factory.mktemp("pki"))
    servicer = EchoTraining()
    addresses, servers = [], []
    for mutual in (False, True):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        pb_grpc.add_TrainingServiceServicer_to_server(servicer, server)
        credentials = grpc.ssl_server_credentials(
            [(pki.server.key_bytes(), pki.server.cert_bytes())],
            root_certificates=pki.ca.cert_bytes() if mutual else None, require_client_auth=mutual)
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        addresses.append(f"127.0.0.1:{port}")
        servers.append(server)
    yield TlsServers(pki, addresses[0], addresses[1], servicer)
    for server in servers:
        server.stop(None)


def test_tls_flags_reach_tls_servers_and_send_the_token_inside(tls_servers: TlsServers) -> None:
    pki, ca = tls_servers.pki, str(tls_servers.pki.ca.cert)
    token = new_token()
    tls_servers.servicer.seen.clear()
    result = cli("status", "run-x", "--address", tls_servers.tls, "--ca-file", ca, "--token", token, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["owner"] == "tls-owner" and tls_servers.servicer.seen == [f"Bearer {token}"]
    assert cli("--tls", "--ca-file", ca, "health", "--address", tls_servers.tls).out.endswith(": SERVING\n")
    client = ["--cert-file", str(pki.client.cert), "--key-file", str(pki.client.key)]
    assert cli("status", "run-x", "--address", tls_servers.mutual, "--ca-file", ca, *client).code == 0
    assert cli("health", "--address", tls_servers.mutual, "--ca-file", ca, *client).code == 0


@pytest.mark.parametrize("case", ["plaintext", "system roots", "other CA", "no client cert", "foreign client cert"])
def test_a_failed_handshake_is_unreachable(tls_servers: TlsServers, case: str) -> None:
    pki = tls_servers.pki
    address = tls_servers.mutual if "client cert" in case else tls_servers.tls
    flags = {"plaintext": [], "system roots": ["--tls"], "other CA": ["--ca-file", str(pki.other_ca.cert)],
             "no client cert": ["--ca-file", str(pki.ca.cert)],
             "foreign client cert": ["--ca-file", str(pki.ca.cert), "--cert-file", str(pki.other_client.cert),
                                     "--key-file", str(pki.other_client.key)]}[case]
    result = cli("status", "run-x", "--address", address, "--timeout", "5", *flags)
    assert result.code == 2 and result.err.startswith(f"cannot reach the server at {address}: "), result
    probe = cli("health", "--address", address, "--timeout", "5", *flags)
    assert probe.code == 1 and probe.out.startswith(f"cannot reach the server at {address}: "), probe


def test_unusable_tls_flags_are_usage_errors(tls_servers: TlsServers, tmp_path: Path) -> None:
    pki = tls_servers.pki
    for flags, message in (
            (["--cert-file", str(pki.client.cert)], "--cert-file and --key-file go together"),
            (["--key-file", str(pki.client.key)], "--cert-file and --key-file go together"),
            (["--ca-file", str(tmp_path / "missing.pem")], f"--ca-file {tmp_path / 'missing.pem'}: cannot read it"),
    ):
        for command in (["status", "run-x"], ["health"]):
            result = cli(*command, "--address", tls_servers.tls, *flags)
            assert result.code == 2 and result.err.startswith(message), (command, flags, result)
