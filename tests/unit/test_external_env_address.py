"""grpc:// and unix: addresses, the EXTERNAL_ENV_ALLOWED_HOSTS allow-list, the EXTERNAL_ENV_SOCKET_DIR
confinement, and the ENV_* settings."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from pydantic import ValidationError

from rl_service.core.envs import is_external_env  # what the orchestrator routes on
from rl_service.core.errors import InvalidRequest, PermissionDenied
from rl_service.infra.external_env.address import (
    DEFAULT_ALLOWED_HOSTS,
    MAX_SOCKET_PATH_BYTES,
    ExternalAddress,
    HostAllowList,
    SocketDirectory,
    parse_address,
)
from rl_service.infra.external_env.connector import GrpcExternalEnvironments
from rl_service.infra.settings import Settings, describe_validation_error


@pytest.mark.parametrize(("text", "host", "port", "target"), [
    ("grpc://127.0.0.1:50061", "127.0.0.1", 50061, "127.0.0.1:50061"),
    ("  GRPC://LocalHost:1/ ", "localhost", 1, "localhost:1"),
    ("grpc://[::1]:50061", "::1", 50061, "[::1]:50061"),
    ("grpc://sim-01.internal.example:65535", "sim-01.internal.example", 65535, "sim-01.internal.example:65535"),
])
def test_parse_valid_addresses(text: str, host: str, port: int, target: str) -> None:
    address = parse_address(text)
    assert (address.host, address.port, address.target) == (host, port, target)
    assert is_external_env(text)


@pytest.mark.parametrize("text", [
    "grpc://127.0.0.1", "grpc://127.0.0.1:0", "grpc://127.0.0.1:70000", "grpc://:50061", "http://127.0.0.1:1",
    "grpc://user@127.0.0.1:1", "grpc://127.0.0.1:1/path", "grpc://127.0.0.1:1?x=1", "grpc://127.0.0.1:port",
    "grpc://bad_host!:1", "grpc://" + "a" * 300 + ":1",
])
def test_parse_refuses_anything_else(text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_address(text)
    assert info.value.field == "env_id"
    assert "grpc://" in info.value.message or "address" in info.value.message


def test_gym_ids_are_not_addresses() -> None:
    assert not is_external_env("CartPole-v1")
    assert not is_external_env("rl_service/CrashAfter-v0")


def test_default_allow_list_is_loopback_only() -> None:
    allowed = HostAllowList.parse(DEFAULT_ALLOWED_HOSTS)
    for host in ("localhost", "127.0.0.1", "127.0.0.2", "::1"):
        assert allowed.allows(host), host
    for host in ("10.0.0.1", "192.168.1.1", "example.com", "::2", "localhost.example.com", "0.0.0.0"):
        assert not allowed.allows(host), host


def test_allow_list_entries() -> None:
    allowed = HostAllowList.parse("sim.lan, 10.0.0.0/8 ,fd00::/8,192.168.1.7")
    assert allowed.allows("sim.lan") and allowed.allows("10.1.2.3") and allowed.allows("fd00::5")
    assert allowed.allows("192.168.1.7")
    assert not allowed.allows("192.168.1.8") and not allowed.allows("other.lan") and not allowed.allows("127.0.0.1")
    assert HostAllowList.parse("*").allows("anything.example")
    nothing = HostAllowList.parse("none")
    assert not nothing.allows("127.0.0.1") and not nothing.allows("localhost")


def test_hostnames_are_never_resolved() -> None:
    # "localhost" resolves to 127.0.0.1, but only the literal name on the list counts.
    assert not HostAllowList.parse("127.0.0.1").allows("localhost")


def test_check_raises_permission_denied_with_the_list() -> None:
    with pytest.raises(PermissionDenied) as info:
        HostAllowList.parse(DEFAULT_ALLOWED_HOSTS).check(parse_address("grpc://10.1.2.3:50061"))
    assert "grpc://10.1.2.3:50061" in info.value.message
    assert "EXTERNAL_ENV_ALLOWED_HOSTS" in info.value.message and "nothing was contacted" in info.value.message


@pytest.mark.parametrize("entry", ["bad host", "10.0.0.0/33", "-x-", "a..b"])
def test_bad_allow_list_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="allowed host"):
        HostAllowList.parse(f"localhost,{entry}")


def make_settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path, **values)  # type: ignore[call-arg]


def test_settings_defaults_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path)
    assert settings.external_env_allowed_hosts == DEFAULT_ALLOWED_HOSTS
    assert settings.env_step_timeout_seconds == 10.0 and settings.env_connect_retries == 5
    assert settings.env_transport == "stream"
    monkeypatch.setenv("EXTERNAL_ENV_ALLOWED_HOSTS", "10.0.0.0/8")
    monkeypatch.setenv("ENV_STEP_TIMEOUT_SECONDS", "0.5")
    monkeypatch.setenv("ENV_CONNECT_RETRIES", "0")
    monkeypatch.setenv("ENV_TRANSPORT", "unary")
    settings = make_settings(tmp_path)
    environments = GrpcExternalEnvironments.from_settings(settings)
    assert environments.allowed_hosts.allows("10.9.9.9") and not environments.allowed_hosts.allows("127.0.0.1")
    assert environments.options.step_timeout == 0.5 and environments.options.retries == 0
    assert not environments.options.use_stream
    assert environments.options.max_message_bytes == settings.max_message_bytes
    # It travels to the worker process inside the WorkerJob.
    assert pickle.loads(pickle.dumps(environments)) == environments


@pytest.mark.parametrize(("key", "value"), [
    ("external_env_allowed_hosts", "localhost,not a host"),
    ("env_step_timeout_seconds", 0),
    ("env_connect_retries", -1),
    ("env_transport", "carrier-pigeon"),
])
def test_bad_settings_are_refused(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(ValidationError):
        make_settings(tmp_path, **{key: value})


# ------------------------------------------------------------------------------------ unix: addresses


@pytest.fixture
def socket_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "socks"
    directory.mkdir()
    return directory


@pytest.mark.parametrize(("text", "path"), [
    ("unix:cartpole.sock", "cartpole.sock"),
    (" UNIX:sims/cartpole.sock ", "sims/cartpole.sock"),
    ("unix:/run/sims/cartpole.sock", "/run/sims/cartpole.sock"),
    ("unix:///run/sims/cartpole.sock", "/run/sims/cartpole.sock"),
])
def test_parse_unix_addresses(text: str, path: str) -> None:
    address = parse_address(text)
    assert address.is_unix and address.socket_path == path and address.host == ""
    assert address.url == str(address) == text.strip()
    assert is_external_env(text)


@pytest.mark.parametrize(("text", "message"), [
    ("unix:", "has no socket path"),
    ("unix://", "has no socket path"),
    ("unix:///", "has no socket path"),
    ("unix://sim-host/x.sock", "names a host"),
    ("unix:a\x00b.sock", "NUL byte"),
    ("unix:a\nb.sock", "NUL byte or another control character"),
    ("unix:x.sock?mode=1", "no ?, # or %"),
    ("unix:x.sock#f", "no ?, # or %"),
    ("unix:%2e%2e/x.sock", "no ?, # or %"),  # gRPC would decode it to ../x.sock
])
def test_parse_refuses_malformed_unix_addresses(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_address(text)
    assert info.value.field == "env_id"
    assert message in info.value.message and "unix:NAME" in info.value.message


def test_a_relative_name_resolves_against_the_socket_dir_not_the_cwd(socket_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    resolved = SocketDirectory(socket_dir).resolve(parse_address("unix:cartpole.sock"))
    expected = os.path.join(os.path.realpath(socket_dir), "cartpole.sock")
    assert resolved.socket_path == expected and resolved.target == f"unix:{expected}"
    assert resolved.url == "unix:cartpole.sock"
    nested = SocketDirectory(socket_dir).resolve(parse_address("unix:a/../b/c.sock"))
    assert nested.socket_path == os.path.join(os.path.realpath(socket_dir), "b", "c.sock")


def test_an_absolute_path_inside_the_dir_is_allowed(socket_dir: Path) -> None:
    path = os.path.realpath(socket_dir / "sim.sock")
    for text in (f"unix:{path}", f"unix://{path}"):
        assert SocketDirectory(socket_dir).resolve(parse_address(text)).socket_path == path


def test_unix_addresses_are_refused_when_no_dir_is_set() -> None:
    with pytest.raises(PermissionDenied) as info:
        SocketDirectory().resolve(parse_address("unix:cartpole.sock"))
    assert info.value.field == "env_id" and info.value.message.startswith("env_id: unix:cartpole.sock is not allowed")
    assert "unix socket addresses are disabled; set EXTERNAL_ENV_SOCKET_DIR" in info.value.message
    assert "nothing was contacted" in info.value.message


def test_paths_outside_the_dir_are_refused(socket_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (socket_dir / "escape").symlink_to(outside)  # a symlink inside the dir that leads out of it
    (socket_dir / "inner").symlink_to(socket_dir / "sub")  # one that stays inside
    directory = SocketDirectory(socket_dir)
    for text in (f"unix://{outside}/sim.sock", "unix:../elsewhere/sim.sock", "unix:escape/sim.sock",
                 "unix:sub/../../elsewhere/sim.sock", "unix:.", "unix:///etc/passwd"):
        with pytest.raises(PermissionDenied) as info:
            directory.resolve(parse_address(text))
        assert info.value.field == "env_id", text
        assert info.value.message == (f"env_id: {text} is not allowed: the socket must lie inside "
                                      f"EXTERNAL_ENV_SOCKET_DIR ({socket_dir}); nothing was contacted")
    assert directory.resolve(parse_address("unix:inner/sim.sock")).socket_path == \
        os.path.join(os.path.realpath(socket_dir), "sub", "sim.sock")


def test_a_socket_path_longer_than_sun_path_is_refused(socket_dir: Path) -> None:
    room = MAX_SOCKET_PATH_BYTES - len(os.fsencode(os.path.realpath(socket_dir))) - 1  # after the "/"
    directory = SocketDirectory(socket_dir)
    assert len(directory.resolve(parse_address("unix:" + "s" * room)).socket_path) == MAX_SOCKET_PATH_BYTES
    with pytest.raises(InvalidRequest) as info:
        directory.resolve(parse_address("unix:" + "s" * (room + 1)))
    assert info.value.field == "env_id"
    assert f"{MAX_SOCKET_PATH_BYTES + 1} bytes" in info.value.message and "sun_path" in info.value.message


def test_each_policy_applies_to_its_own_kind_of_address(socket_dir: Path) -> None:
    # The host allow-list does not apply to sockets (the directory does), even when it allows no host.
    environments = GrpcExternalEnvironments(HostAllowList.parse("none"), socket_dir=SocketDirectory(socket_dir))
    assert environments.check("unix:sim.sock").socket_path.endswith("/socks/sim.sock")
    with pytest.raises(PermissionDenied):
        environments.check("grpc://127.0.0.1:50061")
    with pytest.raises(ValueError):
        HostAllowList.parse("*").check(parse_address("unix:sim.sock"))
    with pytest.raises(ValueError):
        SocketDirectory(socket_dir).resolve(parse_address("grpc://127.0.0.1:1"))
    with pytest.raises(ValueError):
        ExternalAddress(url="grpc://x:1")  # neither a host nor a socket path


def test_addresses_and_the_socket_dir_pickle(socket_dir: Path) -> None:
    # They travel to the worker process inside the WorkerJob.
    for address in (parse_address("grpc://[::1]:50061"), parse_address("unix:sim.sock"),
                    SocketDirectory(socket_dir).resolve(parse_address("unix:sim.sock"))):
        copy = pickle.loads(pickle.dumps(address))
        assert copy == address and copy.target == address.target and str(copy) == str(address)
    environments = GrpcExternalEnvironments(socket_dir=SocketDirectory(socket_dir))
    assert pickle.loads(pickle.dumps(environments)) == environments


def test_socket_dir_setting(tmp_path: Path, socket_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXTERNAL_ENV_SOCKET_DIR", raising=False)
    assert make_settings(tmp_path).external_env_socket_dir is None
    assert GrpcExternalEnvironments.from_settings(make_settings(tmp_path)).socket_dir == SocketDirectory()
    monkeypatch.setenv("EXTERNAL_ENV_SOCKET_DIR", str(socket_dir))
    settings = make_settings(tmp_path)
    assert settings.external_env_socket_dir == socket_dir
    assert GrpcExternalEnvironments.from_settings(settings).socket_dir == SocketDirectory(socket_dir)
    monkeypatch.setenv("EXTERNAL_ENV_SOCKET_DIR", str(tmp_path / "not-yet"))  # created later is fine
    assert make_settings(tmp_path).external_env_socket_dir == tmp_path / "not-yet"


def test_bad_socket_dir_settings_name_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for value, message in ((str(a_file), "is not a directory"), ("/" + "d" * 110, "is too long")):
        monkeypatch.setenv("EXTERNAL_ENV_SOCKET_DIR", value)
        with pytest.raises(ValidationError) as info:
            make_settings(tmp_path)
        line = describe_validation_error(info.value)
        assert line.startswith("invalid configuration: EXTERNAL_ENV_SOCKET_DIR: ") and message in line, line
    monkeypatch.delenv("EXTERNAL_ENV_SOCKET_DIR")
    with pytest.raises(ValidationError, match="NUL byte"):
        make_settings(tmp_path, external_env_socket_dir="a\x00b")


@pytest.mark.parametrize(("text", "host", "target"), [
    ("grpcs://127.0.0.1:50061", "127.0.0.1", "127.0.0.1:50061"),
    (" GRPCS://Sim.Example:443 ", "sim.example", "sim.example:443"),
    ("grpcs://[::1]:50061", "::1", "[::1]:50061"),
])
def test_grpcs_addresses_are_tls_and_otherwise_the_same(text: str, host: str, target: str) -> None:
    address = parse_address(text)
    assert address.tls and address.host == host and address.target == target and not address.is_unix
    assert is_external_env(text)
    assert not parse_address("grpc://127.0.0.1:1").tls and not parse_address("unix:sim.sock").tls
    assert pickle.loads(pickle.dumps(address)) == address
    with pytest.raises(ValueError):
        ExternalAddress(url="x", socket_path="/s.sock", tls=True)  # TLS is never a unix: address's


@pytest.mark.parametrize("text", ["grpcs://127.0.0.1", "grpcs://user@127.0.0.1:1", "grpcs://127.0.0.1:1/p",
                                  "grpcss://127.0.0.1:1", "https://127.0.0.1:1"])
def test_malformed_grpcs_addresses_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_address(text)
    assert info.value.field == "env_id" and "grpcs://" in info.value.message


def test_the_allow_list_applies_to_grpcs_as_to_grpc() -> None:
    environments = GrpcExternalEnvironments(HostAllowList.parse("sim.example,10.0.0.0/8"))
    assert environments.check("grpcs://sim.example:443").tls
    assert environments.check("grpcs://10.1.2.3:443").tls
    for refused in ("grpcs://127.0.0.1:443", "grpcs://other.example:443"):
        with pytest.raises(PermissionDenied) as info:
            environments.check(refused)
        assert "EXTERNAL_ENV_ALLOWED_HOSTS" in info.value.message and "nothing was contacted" in info.value.message


def test_external_env_ca_file_is_read_at_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rl_service.infra.tls import TlsFileError
    from tests.support.certs import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    monkeypatch.setenv("EXTERNAL_ENV_CA_FILE", str(pki.ca.cert))
    environments = GrpcExternalEnvironments.from_settings(make_settings(tmp_path))
    assert environments.options.tls_roots == pki.ca.cert_bytes()  # bytes: a worker reads no file
    assert pickle.loads(pickle.dumps(environments)) == environments
    monkeypatch.setenv("EXTERNAL_ENV_CA_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(TlsFileError) as info:
        GrpcExternalEnvironments.from_settings(make_settings(tmp_path))
    assert str(info.value).startswith("EXTERNAL_ENV_CA_FILE: cannot read")
    monkeypatch.setenv("EXTERNAL_ENV_CA_FILE", str(pki.server.key))
    with pytest.raises(TlsFileError, match=r"^EXTERNAL_ENV_CA_FILE: .* holds no"):
        GrpcExternalEnvironments.from_settings(make_settings(tmp_path))
    # Unset: the system's bundle (SSL_CERT_FILE overrides where it is), read at start-up too.
    monkeypatch.delenv("EXTERNAL_ENV_CA_FILE")
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.other_ca.cert))
    assert GrpcExternalEnvironments.from_settings(make_settings(tmp_path)).options.tls_roots == \
        pki.other_ca.cert_bytes()
