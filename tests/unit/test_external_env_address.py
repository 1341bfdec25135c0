"""grpc:// addresses, the EXTERNAL_ENV_ALLOWED_HOSTS allow-list, and the ENV_* settings."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from pydantic import ValidationError

from rl_service.core.errors import InvalidRequest, PermissionDenied
from rl_service.infra.external_env.address import (
    DEFAULT_ALLOWED_HOSTS,
    HostAllowList,
    is_external_address,
    parse_address,
)
from rl_service.infra.external_env.connector import GrpcExternalEnvironments
from rl_service.infra.settings import Settings


@pytest.mark.parametrize(("text", "host", "port", "target"), [
    ("grpc://127.0.0.1:50061", "127.0.0.1", 50061, "127.0.0.1:50061"),
    ("  GRPC://LocalHost:1/ ", "localhost", 1, "localhost:1"),
    ("grpc://[::1]:50061", "::1", 50061, "[::1]:50061"),
    ("grpc://sim-01.internal.example:65535", "sim-01.internal.example", 65535, "sim-01.internal.example:65535"),
])
def test_parse_valid_addresses(text: str, host: str, port: int, target: str) -> None:
    address = parse_address(text)
    assert (address.host, address.port, address.target) == (host, port, target)
    assert is_external_address(text)


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
    assert not is_external_address("CartPole-v1")
    assert not is_external_address("rl_service/CrashAfter-v0")


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
