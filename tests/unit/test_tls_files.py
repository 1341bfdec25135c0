"""rl_service.infra.tls: PEM files read and checked before gRPC sees them, each failure naming its setting."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from rl_service.infra.config_errors import ConfigurationError
from rl_service.infra.tls import (
    MAX_PEM_BYTES,
    TlsFileError,
    channel_credentials,
    load_server_tls,
    read_ca_bundle,
    read_key_pair,
    system_ca_bundle,
)
from tests.support.certs import TestPki, make_test_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def _error(call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(TlsFileError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_good_pair_and_client_ca_load(pki: TestPki) -> None:
    tls = load_server_tls(pki.server.cert, pki.server.key, pki.ca.cert)
    assert tls is not None and tls.mutual
    assert tls.certificate_chain == pki.server.cert_bytes()
    assert tls.private_key == pki.server.key_bytes()
    assert tls.client_ca == pki.ca.cert_bytes()
    assert "PRIVATE KEY" not in repr(tls)  # the key never reaches a log line through repr
    assert isinstance(tls.credentials(), grpc.ServerCredentials)
    plain = load_server_tls(pki.server.cert, pki.server.key)
    assert plain is not None and not plain.mutual
    assert load_server_tls(None, None) is None


def test_a_missing_file_names_the_setting_and_the_path(pki: TestPki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    message = _error(load_server_tls, missing, pki.server.key)
    assert message.startswith("TLS_CERT_FILE: cannot read") and str(missing) in message
    assert "No such file" in message
    assert _error(load_server_tls, pki.server.cert, tmp_path / "nope.key").startswith("TLS_KEY_FILE: cannot read")
    assert _error(load_server_tls, pki.server.cert, pki.server.key, missing).startswith(
        "TLS_CLIENT_CA_FILE: cannot read")


def test_an_unreadable_file_names_the_setting(pki: TestPki, tmp_path: Path) -> None:
    assert _error(load_server_tls, tmp_path, pki.server.key).startswith("TLS_CERT_FILE: cannot read")  # a directory


def test_a_file_that_is_not_pem_or_too_large_is_refused(pki: TestPki, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    assert "is not a PEM file" in _error(load_server_tls, junk, pki.server.key)
    big = tmp_path / "big.pem"
    big.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + b"A" * MAX_PEM_BYTES)
    assert "larger than" in _error(read_ca_bundle, big, "EXTERNAL_ENV_CA_FILE")


def test_a_certificate_file_must_hold_certificates(pki: TestPki, tmp_path: Path) -> None:
    # The key given as the certificate: PEM, but not a certificate.
    message = _error(load_server_tls, pki.server.key, pki.server.key)
    assert message.startswith("TLS_CERT_FILE:") and "must start with a certificate" in message
    broken = tmp_path / "broken.crt"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    assert "holds no usable PEM certificate" in _error(load_server_tls, broken, pki.server.key)
    assert _error(read_ca_bundle, pki.server.key, "TLS_CLIENT_CA_FILE").startswith("TLS_CLIENT_CA_FILE:")


def test_a_key_of_another_certificate_is_refused_naming_the_key_setting(pki: TestPki) -> None:
    message = _error(load_server_tls, pki.server.cert, pki.client.key)
    assert message.startswith("TLS_KEY_FILE:") and "does not match the certificate in TLS_CERT_FILE" in message
    assert str(pki.client.key) in message and str(pki.server.cert) in message


def test_a_key_file_without_a_key_is_refused(pki: TestPki) -> None:
    message = _error(load_server_tls, pki.server.cert, pki.ca.cert)
    assert message.startswith("TLS_KEY_FILE:") and "holds no PEM private key" in message


def test_an_encrypted_key_is_refused_without_prompting(pki: TestPki, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.server.key_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    message = _error(load_server_tls, pki.server.cert, encrypted)
    assert message.startswith("TLS_KEY_FILE:") and "encrypted" in message
    traditional = tmp_path / "traditional.key"
    traditional.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.TraditionalOpenSSL,
                                              serialization.BestAvailableEncryption(b"secret")))
    assert "encrypted" in _error(load_server_tls, pki.server.cert, traditional)


def test_halves_of_a_pair_are_refused_naming_the_missing_one(pki: TestPki) -> None:
    assert _error(load_server_tls, pki.server.cert, None).startswith("TLS_KEY_FILE is not set")
    assert _error(load_server_tls, None, pki.server.key).startswith("TLS_CERT_FILE is not set")
    assert _error(load_server_tls, None, None, pki.ca.cert).startswith("TLS_CLIENT_CA_FILE is set")


def test_names_follow_the_caller(pki: TestPki, tmp_path: Path) -> None:
    """The env-server and the health probe name their own flags."""
    message = _error(load_server_tls, tmp_path / "x", pki.server.key,
                     names=("--tls-cert-file", "--tls-key-file", "--tls-client-ca-file"))
    assert message.startswith("--tls-cert-file: cannot read")
    assert _error(channel_credentials, tmp_path / "x").startswith("--ca-file: cannot read")
    assert _error(channel_credentials, pki.ca.cert, pki.client.cert).startswith("--key-file is required")
    assert _error(channel_credentials, pki.ca.cert, None, pki.client.key).startswith("--cert-file is required")
    assert _error(channel_credentials, pki.ca.cert, pki.client.cert, pki.other_client.key).startswith(
        "--key-file:")


def test_tls_file_errors_are_configuration_errors() -> None:
    assert issubclass(TlsFileError, ConfigurationError)


def test_pair_reading_returns_the_bytes_checked(pki: TestPki) -> None:
    chain, key = read_key_pair(pki.client.cert, pki.client.key, "a", "b")
    assert chain == pki.client.cert_bytes() and key == pki.client.key_bytes()


def test_the_system_bundle_follows_ssl_cert_file(pki: TestPki, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca.cert))
    assert system_ca_bundle() == pki.ca.cert_bytes()
    junk = tmp_path / "junk"
    junk.write_text("not pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(junk))
    assert system_ca_bundle() is None  # gRPC's own roots, rather than a start-up failure over the OS's file
