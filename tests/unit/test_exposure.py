"""rl_service.infra.exposure: a non-loopback address needs TLS and tokens, or ALLOW_INSECURE."""

from __future__ import annotations

import pytest

from rl_service.infra.config_errors import ConfigurationError
from rl_service.infra.exposure import InsecureBindRefused, check_exposure, is_loopback_host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "127.255.255.254", "::1", "[::1]", "localhost",
                                  "LOCALHOST", " 127.0.0.1 ", "::ffff:127.0.0.1", "0:0:0:0:0:0:0:1"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.1", "192.168.1.5", "128.0.0.1", "::2",
                                  "localhost.example.com", "my-host", "example.com", "::ffff:10.0.0.1",
                                  "fe80::1", "[::]"])
def test_hosts_that_are_not_loopback(host: str) -> None:
    assert not is_loopback_host(host)


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("allow_insecure", [False, True])
def test_loopback_needs_nothing(tls: bool, tokens: bool, allow_insecure: bool) -> None:
    assert check_exposure("127.0.0.1", tls=tls, tokens=tokens, allow_insecure=allow_insecure) is None


@pytest.mark.parametrize("allow_insecure", [False, True])
def test_a_public_address_with_tls_and_tokens_starts_without_warning(allow_insecure: bool) -> None:
    assert check_exposure("0.0.0.0", tls=True, tokens=True, allow_insecure=allow_insecure) is None


@pytest.mark.parametrize(("tls", "tokens", "named", "not_named"), [
    (False, False, ["TLS_CERT_FILE", "TLS_KEY_FILE", "AUTH_TOKENS_FILE"], []),
    (True, False, ["AUTH_TOKENS_FILE"], ["TLS_CERT_FILE"]),
    (False, True, ["TLS_CERT_FILE", "TLS_KEY_FILE"], ["AUTH_TOKENS_FILE"]),
])
def test_a_public_address_missing_either_is_refused_naming_the_settings(
        tls: bool, tokens: bool, named: list[str], not_named: list[str]) -> None:
    with pytest.raises(InsecureBindRefused) as info:
        check_exposure("0.0.0.0", tls=tls, tokens=tokens, allow_insecure=False)
    message = str(info.value)
    assert isinstance(info.value, ConfigurationError)
    assert "\n" not in message and "GRPC_HOST='0.0.0.0'" in message and "ALLOW_INSECURE=true" in message
    # The advice ("set A and B, or ...") asks for exactly what is missing.
    advice = message.split(": set ", 1)[1]
    for name in named:
        assert name in advice
    for name in not_named:
        assert name not in advice


def test_allow_insecure_starts_with_a_warning_naming_what_is_missing() -> None:
    warning = check_exposure("192.168.1.5", tls=True, tokens=False, allow_insecure=True)
    assert warning is not None and "ALLOW_INSECURE=true" in warning and "AUTH_TOKENS_FILE" in warning
    assert "TLS_CERT_FILE" not in warning
