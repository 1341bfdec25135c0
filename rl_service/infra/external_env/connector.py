"""GrpcExternalEnvironments: what core calls for grpc://, grpcs:// and unix: env ids (core.envs.ExternalEnvironments).

Built from Settings by the composition root and carried to the worker inside the WorkerJob, so it holds plain
values only and is picklable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stable_baselines3.common.vec_env import VecEnv, VecMonitor

from rl_service.core.envs import EnvSpaces
from rl_service.core.errors import EnvironmentUnavailable
from rl_service.infra.external_env.address import (
    DEFAULT_ALLOWED_HOSTS,
    ExternalAddress,
    HostAllowList,
    SocketDirectory,
    parse_address,
)
from rl_service.infra.external_env.grpc_adapter import ConnectionOptions, GrpcExternalEnvAdapter
from rl_service.infra.external_env.vec_env import ExternalVecEnv
from rl_service.infra.settings import Settings
from rl_service.infra.tls import read_ca_bundle, system_ca_bundle


@dataclass(frozen=True)
class GrpcExternalEnvironments:
    """Simulations reached over gRPC: on the allowed hosts, or on unix sockets inside the socket directory."""

    allowed_hosts: HostAllowList = field(default_factory=lambda: HostAllowList.parse(DEFAULT_ALLOWED_HOSTS))
    options: ConnectionOptions = field(default_factory=ConnectionOptions)
    socket_dir: SocketDirectory = field(default_factory=SocketDirectory)  # unix: addresses refused by default

    @classmethod
    def from_settings(cls, settings: Settings) -> GrpcExternalEnvironments:
        """The EXTERNAL_ENV_ALLOWED_HOSTS, EXTERNAL_ENV_SOCKET_DIR, EXTERNAL_ENV_CA_FILE and ENV_* settings; reads
        the CA file (TlsFileError naming EXTERNAL_ENV_CA_FILE when it cannot be used)."""
        ca_file = settings.external_env_ca_file
        roots = system_ca_bundle() if ca_file is None else read_ca_bundle(ca_file, "EXTERNAL_ENV_CA_FILE")
        return cls(HostAllowList.parse(settings.external_env_allowed_hosts), ConnectionOptions(
            step_timeout=settings.env_step_timeout_seconds, connect_timeout=settings.env_connect_timeout_seconds,
            retries=settings.env_connect_retries, backoff=settings.env_retry_backoff_seconds,
            max_message_bytes=settings.max_message_bytes, use_stream=settings.env_transport == "stream",
            tls_roots=roots),
            SocketDirectory(settings.external_env_socket_dir))

    def check(self, address: str) -> ExternalAddress:
        """Parse the address and check its host (grpc://, grpcs://) or socket path (unix:); nothing is contacted."""
        parsed = parse_address(address)
        if parsed.is_unix:
            return self.socket_dir.resolve(parsed)
        self.allowed_hosts.check(parsed)
        return parsed

    def spaces(self, address: str) -> EnvSpaces:
        """The simulation's spaces, number of envs and whether it steps env subsets (GetSpec within
        ENV_CONNECT_TIMEOUT_SECONDS, not retried)."""
        adapter = GrpcExternalEnvAdapter(self.check(address), self.options)
        try:
            spec = adapter.spec
            return EnvSpaces(spec.observation_space, spec.action_space, spec.num_envs,
                             env_subsets=adapter.supports_env_subsets)
        finally:
            adapter.close()

    def adapter(self, address: str, retry_connect: bool = True) -> GrpcExternalEnvAdapter:
        """A connected adapter (retrying the first connection when asked)."""
        return GrpcExternalEnvAdapter(self.check(address), self.options, retry_connect=retry_connect)

    def make_vec_env(self, address: str, n_envs: int, seed: int) -> VecEnv:
        """The simulation as a VecMonitor-wrapped VecEnv; refuses a simulation whose env count changed."""
        adapter = self.adapter(address)
        if adapter.spec.num_envs != n_envs:
            adapter.close()
            raise EnvironmentUnavailable(
                f"env {address} now hosts {adapter.spec.num_envs} envs; the run was accepted for {n_envs}",
                field="env_id")
        env = VecMonitor(ExternalVecEnv(adapter))
        env.seed(seed)
        return env

