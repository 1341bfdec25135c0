"""TLS material read from PEM files and turned into gRPC credentials, for servers and for clients.

Every file is read once, when the server (or a probe) starts, and checked with the standard library's ssl module
before gRPC sees it: a missing or unreadable file, a file that holds no certificate, an encrypted key or a key
that does not belong to its certificate is a TlsFileError naming the setting or flag it came from (gRPC itself
would only fail later, at the first handshake, with a message naming neither).
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from rl_service.infra.config_errors import ConfigurationError

# A certificate chain, a key or a CA bundle is a few KiB; a system CA bundle some hundreds. The cap only keeps a
# mistaken path (a log file, /dev/zero) from being read without end.
MAX_PEM_BYTES = 4 * 1024 * 1024
_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
StrPath = str | os.PathLike[str]


class TlsFileError(ConfigurationError):
    """A certificate, key or CA file cannot be used; the message names the setting or flag it came from."""


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key, and the CA its clients' certificates must chain to (mutual TLS)."""

    certificate_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = None

    @property
    def mutual(self) -> bool:
        """True when clients must present a certificate signed by client_ca."""
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials: TLS only, and a client certificate required when mutual."""
        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)],
                                           root_certificates=self.client_ca, require_client_auth=self.mutual)


def read_pem(path: StrPath, name: str) -> bytes:
    """The bytes of a PEM file; TlsFileError naming `name` if it is missing, unreadable, too large or not PEM."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PEM_BYTES + 1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise TlsFileError(f"{name}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise TlsFileError(f"{name}: {path} is larger than {MAX_PEM_BYTES} bytes; it is not a PEM file")
    if not _BEGIN.search(data):
        raise TlsFileError(f"{name}: {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def check_certificates(data: bytes, path: StrPath, name: str) -> None:
    """TlsFileError unless `data` holds at least one PEM certificate that OpenSSL can parse."""
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=data.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError, ValueError, TypeError) as exc:
        reason = "it holds non-ASCII bytes" if isinstance(exc, UnicodeDecodeError) else _reason(exc)
        raise TlsFileError(f"{name}: {path} holds no usable PEM certificate ({reason})") from None
    if context.cert_store_stats()["x509"] == 0:
        raise TlsFileError(f"{name}: {path} holds no PEM certificate")


def read_ca_bundle(path: StrPath, name: str) -> bytes:
    """A PEM CA bundle, read and checked (TlsFileError naming `name`)."""
    data = read_pem(path, name)
    check_certificates(data, path, name)
    return data


def read_key_pair(cert_file: StrPath, key_file: StrPath, cert_name: str, key_name: str) -> tuple[bytes, bytes]:
    """(certificate chain, private key) from two PEM files, checked to belong together."""
    chain = read_pem(cert_file, cert_name)
    first = _BEGIN.search(chain)
    if first is None or first.group(1) != b"CERTIFICATE":
        raise TlsFileError(f"{cert_name}: {cert_file} must start with a certificate "
                           "(-----BEGIN CERTIFICATE-----), the server's own, then its intermediates")
    check_certificates(chain, cert_file, cert_name)
    key = read_pem(key_file, key_name)
    labels = {m.group(1) for m in _BEGIN.finditer(key)}
    if b"ENCRYPTED PRIVATE KEY" in labels or b"Proc-Type: 4,ENCRYPTED" in key:
        raise TlsFileError(f"{key_name}: {key_file} is encrypted; give the key unencrypted and protect the file "
                           "with its permissions (chmod 600)")
    if not any(label.endswith(b"PRIVATE KEY") for label in labels):
        raise TlsFileError(f"{key_name}: {key_file} holds no PEM private key (-----BEGIN PRIVATE KEY-----)")
    _check_match(cert_file, key_file, cert_name, key_name)
    return chain, key


def _check_match(cert_file: StrPath, key_file: StrPath, cert_name: str, key_name: str) -> None:
    """OpenSSL loads the pair as a server would; a key of another certificate is refused here, not at a handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password callback, so that OpenSSL never prompts on the terminal for a key we failed to spot as encrypted.
        context.load_cert_chain(os.fspath(cert_file), os.fspath(key_file), password=_no_password)
    except _EncryptedKey:
        raise TlsFileError(f"{key_name}: {key_file} is encrypted; give the key unencrypted") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsFileError(f"{key_name}: {key_file} does not match the certificate in {cert_name} "
                               f"({cert_file})") from None
        raise TlsFileError(f"{key_name}: {key_file} cannot be loaded with the certificate in {cert_name} "
                           f"({_reason(exc)})") from None
    except OSError as exc:  # the file went away since it was read
        raise TlsFileError(f"{key_name}: cannot read {key_file}: {exc.strerror or exc}") from None


class _EncryptedKey(Exception):
    """OpenSSL asked for a password."""


def _no_password() -> bytes:
    raise _EncryptedKey()


def _reason(exc: BaseException) -> str:
    """OpenSSL's short reason (e.g. KEY_VALUES_MISMATCH) or the message, without the source line."""
    reason = getattr(exc, "reason", None)
    text = str(reason) if reason else str(exc)
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)


def load_server_tls(cert_file: StrPath | None, key_file: StrPath | None, client_ca_file: StrPath | None = None,
                    names: tuple[str, str, str] = ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE"),
                    ) -> ServerTls | None:
    """The server's TLS material, or None for plaintext; TlsFileError naming the setting that is wrong."""
    cert_name, key_name, ca_name = names
    if cert_file is None and key_file is None:
        if client_ca_file is not None:
            raise TlsFileError(f"{ca_name} is set but {cert_name} is not: mutual TLS needs the server's "
                               f"certificate and key ({cert_name}, {key_name})")
        return None
    if cert_file is None or key_file is None:
        missing, given = (cert_name, key_name) if cert_file is None else (key_name, cert_name)
        raise TlsFileError(f"{missing} is not set: {given} needs it (TLS takes a certificate and its key)")
    chain, key = read_key_pair(cert_file, key_file, cert_name, key_name)
    client_ca = None if client_ca_file is None else read_ca_bundle(client_ca_file, ca_name)
    return ServerTls(chain, key, client_ca)


def system_ca_bundle() -> bytes | None:
    """The operating system's CA bundle (SSL_CERT_FILE when set), or None where there is none to read (gRPC then
    uses the roots it ships)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            try:
                return read_ca_bundle(candidate, "the system CA bundle")
            except TlsFileError:
                return None
    return None


def channel_credentials(ca_file: StrPath | None = None, cert_file: StrPath | None = None,
                        key_file: StrPath | None = None,
                        names: tuple[str, str, str] = ("--ca-file", "--cert-file", "--key-file"),
                        ) -> grpc.ChannelCredentials:
    """Client credentials: the server verified against `ca_file` (unset: the system's roots), and a client
    certificate for mutual TLS when `cert_file` and `key_file` are given."""
    ca_name, cert_name, key_name = names
    roots = system_ca_bundle() if ca_file is None else read_ca_bundle(ca_file, ca_name)
    if (cert_file is None) != (key_file is None):
        missing, given = (cert_name, key_name) if cert_file is None else (key_name, cert_name)
        raise TlsFileError(f"{missing} is required with {given} (a client certificate needs its key)")
    chain = key = None
    if cert_file is not None and key_file is not None:
        chain, key = read_key_pair(cert_file, key_file, cert_name, key_name)
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)
