"""Transport security end to end, over real sockets with certificates made at test time: a TLS port and a
mutual-TLS port against right, wrong and missing credentials; server.py refusing an exposed address without TLS
and tokens, and refusing unusable TLS files, each with one line naming the setting; the health probe over TLS;
a run training through a simulation served over TLS (grpcs://)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from rl_service.core.errors import EnvironmentUnavailable
from rl_service.envserver import main as env_server_main
from rl_service.envserver.reference_server import serve_gym
from rl_service.healthcheck_main import main as healthcheck_main
from rl_service.healthcheck_main import probe
from rl_service.infra.external_env.connector import GrpcExternalEnvironments
from rl_service.infra.external_env.grpc_adapter import ConnectionOptions
from rl_service.infra.logging_setup import configure_logging
from rl_service.infra.tls import channel_credentials, load_server_tls
from rl_service.transport.server_factory import RunningServer, build_server
from rl_service_proto.v1 import training_pb2 as pb
from rl_service_proto.v1 import training_pb2_grpc as pb_grpc
from tests.conftest import FAST_PPO, ServerHandle, make_settings, start_server
from tests.support.certs import Pem, TestPki, make_test_pki

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@contextlib.contextmanager
def tls_server(root: Path, cert: Pem, client_ca: Path | None = None) -> Iterator[RunningServer]:
    """The real service on 127.0.0.1 port 0, serving TLS with `cert` (mutual with `client_ca`)."""
    settings = make_settings(root, tls_cert_file=cert.cert, tls_key_file=cert.key, tls_client_ca_file=client_ca)
    configure_logging(settings.log_level, settings.log_format)
    running = build_server(settings)
    try:
        yield running
    finally:
        running.stop(grace=5)


@pytest.fixture(scope="module")
def tls_port(pki: TestPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with tls_server(tmp_path_factory.mktemp("tls"), pki.server) as running:
        yield running.port


@pytest.fixture(scope="module")
def mtls_port(pki: TestPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with tls_server(tmp_path_factory.mktemp("mtls"), pki.server, client_ca=pki.ca.cert) as running:
        yield running.port


def list_runs(target: str, credentials: grpc.ChannelCredentials | None) -> pb.ListRunsResponse:
    """One real RPC of the training API, over TLS when credentials are given."""
    channel = (grpc.insecure_channel(target) if credentials is None
               else grpc.secure_channel(target, credentials))
    with channel:
        reply: pb.ListRunsResponse = pb_grpc.TrainingServiceStub(channel).ListRuns(pb.ListRunsRequest(), timeout=10)
        return reply


def refused(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list_runs(target, credentials)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    return info.value


# ------------------------------------------------------------------------------------ a TLS port


def test_tls_with_the_right_ca_works_by_address_and_by_name(pki: TestPki, tls_port: int) -> None:
    credentials = channel_credentials(pki.ca.cert)
    assert list(list_runs(f"127.0.0.1:{tls_port}", credentials).runs) == []
    assert list(list_runs(f"localhost:{tls_port}", credentials).runs) == []


def test_a_plaintext_client_on_the_tls_port_fails(tls_port: int) -> None:
    refused(f"127.0.0.1:{tls_port}", None)


def test_a_server_certificate_from_another_ca_fails(pki: TestPki, tls_port: int) -> None:
    error = refused(f"127.0.0.1:{tls_port}", channel_credentials(pki.other_ca.cert))
    assert "CERTIFICATE_VERIFY_FAILED" in (error.details() or "")


def test_an_expired_server_certificate_fails(pki: TestPki, tmp_path: Path) -> None:
    with tls_server(tmp_path, pki.expired_server) as running:
        error = refused(f"127.0.0.1:{running.port}", channel_credentials(pki.ca.cert))
    assert "certificate has expired" in (error.details() or "")


# ------------------------------------------------------------------------------------ a mutual-TLS port


def test_mutual_tls_without_a_client_certificate_fails(pki: TestPki, mtls_port: int) -> None:
    refused(f"127.0.0.1:{mtls_port}", channel_credentials(pki.ca.cert))


def test_mutual_tls_with_a_client_of_another_ca_fails(pki: TestPki, mtls_port: int) -> None:
    refused(f"127.0.0.1:{mtls_port}", channel_credentials(pki.ca.cert, pki.other_client.cert, pki.other_client.key))


def test_mutual_tls_with_the_right_client_works(pki: TestPki, mtls_port: int) -> None:
    credentials = channel_credentials(pki.ca.cert, pki.client.cert, pki.client.key)
    assert list(list_runs(f"127.0.0.1:{mtls_port}", credentials).runs) == []


def test_mutual_tls_refuses_plaintext(mtls_port: int) -> None:
    refused(f"127.0.0.1:{mtls_port}", None)


# ------------------------------------------------------------------------------------ the health probe


def _healthcheck(port: int, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "healthcheck.py"), "--address", f"127.0.0.1:{port}",
                           "--timeout", "5", *flags], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_healthcheck_probes_a_tls_port(pki: TestPki, tls_port: int) -> None:
    ok = _healthcheck(tls_port, "--tls", "--ca-file", str(pki.ca.cert))
    assert ok.returncode == 0 and ok.stdout == f"127.0.0.1:{tls_port}: SERVING\n", ok
    plaintext = _healthcheck(tls_port)
    assert plaintext.returncode == 1 and "cannot reach the server" in plaintext.stdout
    wrong_ca = _healthcheck(tls_port, "--ca-file", str(pki.other_ca.cert))  # --ca-file implies --tls
    assert wrong_ca.returncode == 1
    assert "TLS handshake failed: CERTIFICATE_VERIFY_FAILED" in wrong_ca.stdout, wrong_ca.stdout
    assert len(wrong_ca.stdout.splitlines()) == 1


def test_healthcheck_names_the_certificate_host_when_dialling_another(pki: TestPki, tls_port: int,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ca = str(pki.ca.cert)
    assert healthcheck_main(["--address", f"127.0.0.1:{tls_port}", "--ca-file", ca,
                             "--server-name", "localhost"]) == 0
    assert healthcheck_main(["--address", f"127.0.0.1:{tls_port}", "--ca-file", ca,
                             "--server-name", "sim.example"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("SERVING")
    assert "the server's certificate does not name the host dialled" in lines[1]


def test_healthcheck_probes_a_mutual_tls_port(pki: TestPki, mtls_port: int,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{mtls_port}"
    assert healthcheck_main(["--address", address, "--tls", "--ca-file", str(pki.ca.cert), "--cert-file",
                             str(pki.client.cert), "--key-file", str(pki.client.key)]) == 0
    assert healthcheck_main(["--address", address, "--tls", "--ca-file", str(pki.ca.cert)]) == 1
    assert capsys.readouterr().out.splitlines()[0] == f"{address}: SERVING"


@pytest.mark.parametrize(("flags", "named"), [
    (["--ca-file", "/no/such/ca.pem"], "--ca-file: cannot read /no/such/ca.pem"),
    (["--tls", "--cert-file", "CLIENT_CERT"], "--key-file is required with --cert-file"),
    (["--tls", "--cert-file", "CLIENT_CERT", "--key-file", "OTHER_KEY"], "--key-file:"),
])
def test_healthcheck_exits_two_on_an_unusable_file(pki: TestPki, tls_port: int, flags: list[str], named: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    values = {"CLIENT_CERT": str(pki.client.cert), "OTHER_KEY": str(pki.other_client.key)}
    with pytest.raises(SystemExit) as info:
        healthcheck_main(["--address", f"127.0.0.1:{tls_port}", *[values.get(f, f) for f in flags]])
    assert info.value.code == 2
    assert named in capsys.readouterr().err


# ------------------------------------------------------------------------------------ server.py start-up


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    drop = ("GRPC_", "LOG_", "TLS_", "AUTH_", "ALLOW_", "EXTERNAL_ENV_", "DATA_DIR", "GYM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update({"DATA_DIR": str(tmp_path / "data"), "GRPC_HOST": "127.0.0.1", "GRPC_PORT": "0", "HTTP_PORT": "0"})
    env.update(extra)
    return env


def _refusal(tmp_path: Path, **env: str) -> str:
    """server.py's one stderr line when it refuses to start; nothing is created before."""
    result = subprocess.run([sys.executable, str(ROOT / "server.py")], cwd=tmp_path, env=_env(tmp_path, **env),
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert not (tmp_path / "data").exists(), "refused before the data directory is created"
    return lines[0]


def test_an_exposed_address_without_tls_and_tokens_refuses_to_start(tmp_path: Path) -> None:
    line = _refusal(tmp_path, GRPC_HOST="0.0.0.0")
    assert line.startswith("cannot start: refusing to listen on GRPC_HOST='0.0.0.0'")
    for setting in ("TLS_CERT_FILE", "TLS_KEY_FILE", "AUTH_TOKENS_FILE", "ALLOW_INSECURE"):
        assert setting in line


def test_tls_without_tokens_is_not_enough_on_an_exposed_address(pki: TestPki, tmp_path: Path) -> None:
    line = _refusal(tmp_path, GRPC_HOST="0.0.0.0", TLS_CERT_FILE=str(pki.server.cert),
                    TLS_KEY_FILE=str(pki.server.key))
    advice = line.split(": set ", 1)[1]
    assert "AUTH_TOKENS_FILE" in advice and "TLS_CERT_FILE" not in advice


@pytest.mark.parametrize(("files", "named", "words"), [
    ({"TLS_CERT_FILE": "MISSING", "TLS_KEY_FILE": "SERVER_KEY"}, "TLS_CERT_FILE", "cannot read"),
    ({"TLS_CERT_FILE": "SERVER_CERT", "TLS_KEY_FILE": "CLIENT_KEY"}, "TLS_KEY_FILE", "does not match"),
    ({"TLS_CERT_FILE": "SERVER_CERT", "TLS_KEY_FILE": "SERVER_KEY", "TLS_CLIENT_CA_FILE": "MISSING"},
     "TLS_CLIENT_CA_FILE", "cannot read"),
    ({"EXTERNAL_ENV_CA_FILE": "SERVER_KEY"}, "EXTERNAL_ENV_CA_FILE", "holds no"),
    ({"TLS_CERT_FILE": "SERVER_CERT"}, "TLS_KEY_FILE", "is required when TLS_CERT_FILE is set"),
    ({"TLS_CLIENT_CA_FILE": "CA"}, "TLS_CLIENT_CA_FILE", "TLS_CERT_FILE is not"),
])
def test_unusable_tls_files_refuse_to_start_naming_the_setting(pki: TestPki, tmp_path: Path, files: dict[str, str],
                                                               named: str, words: str) -> None:
    paths = {"MISSING": str(tmp_path / "missing.pem"), "SERVER_CERT": str(pki.server.cert),
             "SERVER_KEY": str(pki.server.key), "CLIENT_KEY": str(pki.client.key), "CA": str(pki.ca.cert)}
    line = _refusal(tmp_path, **{name: paths[value] for name, value in files.items()})
    assert f"{named}: " in line and words in line, line


def test_allow_insecure_starts_an_exposed_server_with_a_warning(tmp_path: Path) -> None:
    # 0.0.0.0 only for this start-up check: probed on loopback, stopped at once.
    process = subprocess.Popen([sys.executable, str(ROOT / "server.py")], cwd=tmp_path, stderr=subprocess.PIPE,
                               text=True, env=_env(tmp_path, GRPC_HOST="0.0.0.0", ALLOW_INSECURE="true",
                                                   LOG_FORMAT="json"))
    lines: list[str] = []
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 120
        port = None
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            if '"server started"' in line:
                port = int(json.loads(line)["address"].rsplit(":", 1)[1])
        assert port is not None, "".join(lines)
        threading.Thread(target=lines.extend, args=(process.stderr,), daemon=True).start()
        report = probe(f"127.0.0.1:{port}")
        assert report.serving, report.text
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    warnings = [e for e in events if e.get("level") == "warning" and "ALLOW_INSECURE=true" in e["event"]]
    assert len(warnings) == 1, lines
    assert "TLS_CERT_FILE" in warnings[0]["event"] and "AUTH_TOKENS_FILE" in warnings[0]["event"]
    started = next(e for e in events if e["event"] == "server started")
    assert started["transport"] == "plaintext"
    assert process.returncode == 0


# ------------------------------------------------------------------------------------ simulations over TLS


@contextlib.contextmanager
def tls_env_server_process(cert: Pem) -> Iterator[str]:
    """`python -m rl_service.envserver` serving TLS; yields the grpcs:// address it announces."""
    process = subprocess.Popen(
        [sys.executable, "-m", "rl_service.envserver", "--env", "CartPole-v1", "--num-envs", "2", "--port", "0",
         "--tls-cert-file", str(cert.cert), "--tls-key-file", str(cert.key)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert " on grpcs://127.0.0.1:" in line, line
        yield line.rsplit(" on ", 1)[1].strip()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()


@pytest.fixture(scope="module")
def training(pki: TestPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = start_server(tmp_path_factory.mktemp("training"), external_env_ca_file=pki.ca.cert,
                          env_connect_timeout_seconds=2.0)
    yield handle
    handle.stop()


def test_a_run_trains_through_a_simulation_served_over_tls(pki: TestPki, training: ServerHandle) -> None:
    with tls_env_server_process(pki.server) as address:
        run_id = training.start("PPO", env_id=address, total_timesteps=256, hyperparameters=FAST_PPO)
        final = training.watch_to_end(run_id)[-1]
        assert final.state == pb.SUCCEEDED, final.error
        assert final.env_id == address and final.timesteps_done >= 256
        # The same simulation in plaintext is not reachable: the port speaks TLS only.
        plaintext = address.replace("grpcs://", "grpc://")
        with pytest.raises(grpc.RpcError) as info:
            training.start("PPO", env_id=plaintext, total_timesteps=256, hyperparameters=FAST_PPO)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert plaintext in (info.value.details() or "")


def test_a_simulation_whose_certificate_does_not_verify_is_refused_at_start(pki: TestPki,
                                                                           training: ServerHandle) -> None:
    expired = serve_gym("CartPole-v1", 2, tls=load_server_tls(pki.expired_server.cert, pki.expired_server.key))
    try:
        with pytest.raises(grpc.RpcError) as info:
            training.start("PPO", env_id=expired.address, total_timesteps=256, hyperparameters=FAST_PPO)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert expired.address in (info.value.details() or "")
        assert "certificate has expired" in (info.value.details() or "")
        assert "EXTERNAL_ENV_CA_FILE" in (info.value.details() or "")
        assert expired.servicer.calls["GetSpec"] == 0, "no RPC reached an unverified simulation"
    finally:
        expired.stop()


def test_the_adapter_verifies_against_the_configured_roots_only(pki: TestPki) -> None:
    good = serve_gym("CartPole-v1", 1, tls=load_server_tls(pki.server.cert, pki.server.key))
    try:
        trusted = GrpcExternalEnvironments(options=ConnectionOptions(connect_timeout=2.0,
                                                                     tls_roots=pki.ca.cert_bytes()))
        assert trusted.spaces(good.address).num_envs == 1
        other = GrpcExternalEnvironments(options=ConnectionOptions(connect_timeout=2.0,
                                                                   tls_roots=pki.other_ca.cert_bytes()))
        with pytest.raises(EnvironmentUnavailable) as info:
            other.spaces(good.address)
        assert "CERTIFICATE_VERIFY_FAILED" in info.value.message and good.address in info.value.message
        assert good.servicer.calls["GetSpec"] == 1
    finally:
        good.stop()


@pytest.mark.parametrize(("flags", "words"), [
    (["--tls-cert-file", "CERT"], "--tls-key-file is not set"),
    (["--tls-cert-file", "CERT", "--tls-key-file", "OTHER_KEY"], "--tls-key-file:"),
    (["--tls-cert-file", "/no/such.pem", "--tls-key-file", "KEY"], "--tls-cert-file: cannot read"),
    (["--unix", "/tmp/x.sock", "--tls-cert-file", "CERT", "--tls-key-file", "KEY"], "--unix cannot be combined"),
])
def test_the_env_server_refuses_unusable_tls_flags(pki: TestPki, flags: list[str], words: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    values = {"CERT": str(pki.server.cert), "KEY": str(pki.server.key), "OTHER_KEY": str(pki.client.key)}
    with pytest.raises(SystemExit) as info:
        env_server_main(["--env", "CartPole-v1", "--port", "0", *[values.get(f, f) for f in flags]])
    assert info.value.code == 2 and words in capsys.readouterr().err
