"""What the server's port serves: TLS (optionally mutual) or plaintext, decided and checked before anything starts.

PortSecurity.from_settings reads the TLS files and applies the exposure rule (rl_service.infra.exposure); both
raise a ConfigurationError naming the setting, before the data directories are touched. bind() then opens the
port with the matching credentials, so a TLS port never also answers plaintext.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from rl_service.infra.exposure import check_exposure
from rl_service.infra.settings import Settings
from rl_service.infra.tls import ServerTls, load_server_tls


@dataclass(frozen=True)
class PortSecurity:
    """The port's TLS material (None: plaintext) and the warning to log when only ALLOW_INSECURE let it start."""

    tls: ServerTls | None
    insecure_warning: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> PortSecurity:
        """Read TLS_CERT_FILE, TLS_KEY_FILE and TLS_CLIENT_CA_FILE, then check GRPC_HOST against TLS and tokens."""
        tls = load_server_tls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
        warning = check_exposure(settings.grpc_host, tls=tls is not None,
                                 tokens=settings.auth_tokens_file is not None,
                                 allow_insecure=settings.allow_insecure)
        return cls(tls, warning)

    @property
    def mode(self) -> str:
        """'plaintext', 'tls' or 'mutual-tls', for the start-up log line."""
        if self.tls is None:
            return "plaintext"
        return "mutual-tls" if self.tls.mutual else "tls"

    def bind(self, server: grpc.Server, address: str) -> int:
        """Add the one listening port (TLS when configured); the bound port number. RuntimeError when it cannot."""
        if self.tls is None:
            return int(server.add_insecure_port(address))
        return int(server.add_secure_port(address, self.tls.credentials()))
