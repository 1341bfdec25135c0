"""Configuration from environment variables and an optional .env file (pydantic-settings).

Every field is one variable of the same name in upper case (GRPC_PORT, MODELS_DIR, ...). server.py flags
override the environment by passing init values.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rl_service.infra.cpu_placement import format_cpu_list, parse_cpu_list, usable_cpus
from rl_service.infra.external_env.address import DEFAULT_ALLOWED_HOSTS, MAX_SOCKET_PATH_BYTES, HostAllowList

_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class Settings(BaseSettings):
    """The service's settings, with embedded defaults that need no external server."""

    # env_ignore_empty: MODELS_DIR= (empty) means "the default", not the current directory.
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore",
                                      case_sensitive=False, env_ignore_empty=True)

    grpc_host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0 exposes the service")
    grpc_port: int = Field(50051, ge=0, le=65535, description="port to listen on (0: any free port)")
    data_dir: Path = Field(Path("rl_service_data"), description="root of the run registry (runs.sqlite3)")
    models_dir: Path | None = Field(None, description="final models, metadata, history (default DATA_DIR/models)")
    checkpoint_dir: Path | None = Field(None, description="checkpoints (default DATA_DIR/checkpoints)")
    tensorboard_dir: Path | None = Field(
        None, description="write each run's TensorBoard logs to TENSORBOARD_DIR/<run_id> (needs tensorboard)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log threshold")
    log_format: Literal["json", "console"] = Field("json", description="JSON lines or human-readable")
    max_concurrent_runs: int = Field(2, ge=1, le=256, description="runs training at once (one process each)")
    max_queued_runs: int = Field(16, ge=0, le=10_000, description="PENDING runs beyond which StartTraining is refused")
    max_total_timesteps: int = Field(100_000_000, ge=1, description="cap on a run's total_timesteps")
    keep_checkpoints: int = Field(5, ge=1, le=1000, description="checkpoints kept per run (newest)")
    default_checkpoint_interval: int = Field(10_000, ge=100, description="timesteps between checkpoints by default")
    progress_interval_seconds: float = Field(1.0, gt=0, le=3600, description="progress report (and Watch) period")
    worker_torch_threads: int = Field(1, ge=1, le=256, description="torch threads per training process")
    worker_cpus: str = Field(
        "", description="CPUs training processes are pinned to, as a list such as 0-3,6: each gets the "
                        "WORKER_TORCH_THREADS least-used of them (unset: not pinned; EXECUTOR=local only)")
    worker_start_method: Literal["forkserver", "spawn"] = Field(
        "forkserver", description="how worker processes start (forkserver pre-imports torch once)")
    stop_timeout_seconds: float = Field(30.0, gt=0, description="StopTraining waits this long, then kills")
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="on SIGTERM, time for runs to checkpoint")
    grpc_max_workers: int = Field(32, ge=4, le=1024, description="threads serving RPCs")
    max_watch_streams: int = Field(16, ge=1, le=1000, description="concurrent WatchTraining streams")
    max_act_batch: int = Field(4096, ge=1, description="observations per ActBatch call")
    # 128 MiB: existing trainer clients send experience in chunks of up to 100 MB.
    max_message_bytes: int = Field(128 * 1024 * 1024, ge=1024, description="largest gRPC message accepted")
    policies_dir: Path | None = Field(None, description="named policies' states and checkpoints "
                                                        "(default DATA_DIR/policies)")
    max_batch_bytes: int = Field(1024 * 1024 * 1024, ge=1024,
                                 description="largest experience batch once its streamed chunks are assembled")
    max_pending_steps: int = Field(1_000_000, ge=1,
                                   description="transitions an unfinished episode may hold between batches")
    policy_versions_kept: int = Field(4, ge=1, le=1000,
                                      description="recent policy versions ComputeLogProb can still evaluate")
    policy_sync: Literal["always", "background"] = Field(
        "background", description="named policies' saves: before each reply (always) or by a writer thread "
                                  "at most POLICY_SYNC_INTERVAL_SECONDS behind (background)")
    policy_sync_interval_seconds: float = Field(1.0, gt=0, le=3600,
                                                description="how far background saves may lag the newest version")
    auto_resume: bool = Field(True, description="at start-up, resume runs a crash or a shutdown left unfinished")
    max_run_attempts: int = Field(3, ge=1, le=100,
                                  description="worker deaths after which a run ends FAILED instead of resuming "
                                              "(a server's own death does not count)")
    save_replay_buffer: bool = Field(True, description="save off-policy replay buffers with each checkpoint")
    external_env_allowed_hosts: str = Field(
        DEFAULT_ALLOWED_HOSTS, description="hosts a grpc:// or grpcs:// env may be on: hostnames, IPs, CIDR "
                                           "networks, * (any), none")
    external_env_socket_dir: Path | None = Field(
        None, description="directory a unix: env's socket must be in (unset: unix: addresses are refused)")
    env_step_timeout_seconds: float = Field(10.0, gt=0, le=3600, description="deadline of each env Reset and Step")
    env_connect_timeout_seconds: float = Field(5.0, gt=0, le=600, description="deadline of env GetSpec (connect)")
    env_connect_retries: int = Field(5, ge=0, le=100, description="reconnects to a lost env before the run fails")
    env_retry_backoff_seconds: float = Field(1.0, ge=0, le=600, description="first reconnect wait, doubled each try")
    env_transport: Literal["stream", "unary"] = Field("stream", description="env calls on the Session stream or unary")
    gym_packages: str = Field(
        "", description="comma-separated modules imported by the server and every worker at start-up, so the "
                        "Gymnasium environments they register can be trained (as rl-baselines3-zoo's --gym-packages)")

    # Security (see README "Secure set-up"). Files are read once at start-up; a bad one stops the server.
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: with TLS_KEY_FILE, serve TLS only")
    # validate_default: the pair rules below must also run when the second file is left unset.
    tls_key_file: Path | None = Field(None, validate_default=True, description="PEM private key of TLS_CERT_FILE")
    tls_client_ca_file: Path | None = Field(
        None, validate_default=True,
        description="PEM CA bundle: clients must present a certificate it signed (mutual TLS)")
    auth_tokens_file: Path | None = Field(
        None, description="bearer tokens, one `NAME ROLE sha256:HEX` line each; unset: no authentication")
    allow_insecure: bool = Field(
        False, description="start on a non-loopback GRPC_HOST without TLS and tokens (logs a warning)")
    max_policies: int = Field(1000, ge=1, le=1_000_000, description="named policies the server holds at most")
    max_network_parameters: int = Field(
        10_000_000, ge=1000, le=2_000_000_000,
        description="parameters one network (a run's policy, a named policy's actor or critic) may have")
    external_env_ca_file: Path | None = Field(
        None, description="PEM CA bundle that grpcs:// simulations' certificates must chain to "
                          "(unset: the system's roots)")

    # The HTTP/JSON API, /metrics and the dashboard, served beside gRPC by the same process (same host, TLS, tokens).
    http_enabled: bool = Field(True, description="serve the HTTP/JSON API, /metrics and the dashboard on HTTP_PORT")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP port (0: any free port), on GRPC_HOST")

    # Where runs train (see docs/architecture.md, "Executors").
    executor: Literal["local", "ray"] = Field(
        "local", description="local: one process per run on this machine; ray: one Ray actor per run on a cluster")
    ray_address: str = Field("", description="EXECUTOR=ray: the Ray cluster to join (unset: start a local Ray "
                                             "instance bound to loopback)")
    ray_cpus_per_run: float = Field(1.0, gt=0, le=1024, description="EXECUTOR=ray: CPUs each run's actor reserves")
    health_port: int | None = Field(
        None, ge=0, le=65535,
        description="also serve grpc.health.v1 alone, in plaintext, on this port (for Kubernetes' native gRPC "
                    "probes, which cannot speak TLS); unset: health only on GRPC_PORT")

    @field_validator("gym_packages")
    @classmethod
    def _check_gym_packages(cls, value: str) -> str:
        for name in split_modules(value):
            if not _MODULE_NAME.fullmatch(name):
                raise ValueError(f"{name[:40]!r} is not a module name")
            try:
                found = importlib.util.find_spec(name) is not None
            except ModuleNotFoundError:  # a parent package is missing
                found = False
            if not found:
                raise ValueError(f"module {name!r} is not installed")
        return value

    @field_validator("worker_cpus")
    @classmethod
    def _check_worker_cpus(cls, value: str) -> str:
        cpus = parse_cpu_list(value)  # ValueError names the bad entry
        if not cpus:
            return value
        usable = usable_cpus()
        if usable is None:
            raise ValueError("is set, but this platform cannot pin processes to CPUs (no sched_setaffinity)")
        missing = [cpu for cpu in cpus if cpu not in usable]
        if missing:
            raise ValueError(f"CPU {missing[0]} is not one this server may run on "
                             f"(it may use {format_cpu_list(usable)})")
        return value

    @field_validator("external_env_allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value: str) -> str:
        HostAllowList.parse(value)  # ValueError names the bad entry
        return value

    @field_validator("external_env_socket_dir")
    @classmethod
    def _check_socket_dir(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if "\0" in str(value):
            raise ValueError("holds a NUL byte")
        if value.exists() and not value.is_dir():
            raise ValueError(f"{value} exists and is not a directory")
        if len(os.fsencode(os.path.realpath(value))) + 2 > MAX_SOCKET_PATH_BYTES:
            raise ValueError(f"{value} is too long: a socket path inside it must fit in {MAX_SOCKET_PATH_BYTES} "
                             "bytes (sun_path)")
        return value

    @field_validator("tls_key_file")
    @classmethod
    def _check_tls_pair(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # The files are read at start-up (rl_service.infra.tls); here only the rule that they come in pairs.
        if "tls_cert_file" not in info.data:
            return value  # TLS_CERT_FILE itself is invalid and reported
        cert = info.data["tls_cert_file"]
        if cert is not None and value is None:
            raise ValueError("is required when TLS_CERT_FILE is set (TLS takes a certificate and its key)")
        if cert is None and value is not None:
            raise ValueError("is set, but TLS_CERT_FILE is not (TLS takes a certificate and its key)")
        return value

    @field_validator("tls_client_ca_file")
    @classmethod
    def _check_client_ca(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("tls_cert_file") is None and "tls_cert_file" in info.data:
            raise ValueError("is set, but TLS_CERT_FILE is not: mutual TLS needs the server's own certificate and "
                             "key (TLS_CERT_FILE, TLS_KEY_FILE)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("tensorboard_dir")
    @classmethod
    def _check_tensorboard(cls, value: Path | None) -> Path | None:
        if value is not None and not tensorboard_installed():
            raise ValueError("is set, but the tensorboard package is not installed: "
                             "pip install 'rl-service[tensorboard]', or unset TENSORBOARD_DIR")
        return value

    @field_validator("executor")
    @classmethod
    def _check_executor(cls, value: str) -> str:
        if value == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError("is ray, but the ray package is not installed: pip install 'rl-service[ray]', "
                             "or set EXECUTOR=local")
        return value

    @model_validator(mode="after")
    def _fill_dirs(self) -> Settings:
        if self.models_dir is None:
            self.models_dir = self.data_dir / "models"
        if self.checkpoint_dir is None:
            self.checkpoint_dir = self.data_dir / "checkpoints"
        if self.policies_dir is None:
            self.policies_dir = self.data_dir / "policies"
        if self.max_watch_streams >= self.grpc_max_workers:
            raise ValueError(f"MAX_WATCH_STREAMS ({self.max_watch_streams}) must be below GRPC_MAX_WORKERS "
                             f"({self.grpc_max_workers}), or Watch streams could take every RPC thread")
        pinned = len(parse_cpu_list(self.worker_cpus))
        if 0 < pinned < self.worker_torch_threads:
            # torch's threads would share fewer CPUs than there are of them, and its OpenMP threads spin-wait.
            raise ValueError(f"WORKER_CPUS lists {pinned} CPU(s), fewer than WORKER_TORCH_THREADS "
                             f"({self.worker_torch_threads}): each worker gets that many CPUs of the list")
        if self.worker_cpus.strip() and self.executor == "ray":
            raise ValueError("WORKER_CPUS pins the local executor's processes; with EXECUTOR=ray, Ray places "
                             "each run (RAY_CPUS_PER_RUN): unset WORKER_CPUS")
        if self.worker_start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"WORKER_START_METHOD {self.worker_start_method} is not available on this platform")
        return self

    @property
    def models_root(self) -> Path:
        """MODELS_DIR, filled in."""
        assert self.models_dir is not None
        return self.models_dir

    @property
    def checkpoint_root(self) -> Path:
        """CHECKPOINT_DIR, filled in."""
        assert self.checkpoint_dir is not None
        return self.checkpoint_dir

    @property
    def policies_root(self) -> Path:
        """POLICIES_DIR, filled in."""
        assert self.policies_dir is not None
        return self.policies_dir

    @property
    def worker_cpu_list(self) -> tuple[int, ...]:
        """WORKER_CPUS as CPU numbers; () when workers are not pinned."""
        return parse_cpu_list(self.worker_cpus)

    @property
    def gym_modules(self) -> tuple[str, ...]:
        """GYM_PACKAGES as module names."""
        return split_modules(self.gym_packages)

    @property
    def registry_path(self) -> Path:
        """The SQLite file of the run registry."""
        return self.data_dir / "runs.sqlite3"

    @property
    def address(self) -> str:
        """host:port to bind."""
        host = f"[{self.grpc_host}]" if ":" in self.grpc_host else self.grpc_host
        return f"{host}:{self.grpc_port}"


def split_modules(value: str) -> tuple[str, ...]:
    """Module names out of a comma-separated list (blanks ignored)."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def tensorboard_installed() -> bool:
    """True when the tensorboard package (stable-baselines3's TensorBoard writer needs it) can be imported."""
    return importlib.util.find_spec("tensorboard") is not None


def describe_validation_error(error: ValidationError) -> str:
    """One line naming each bad variable and why, for the process's exit message."""
    parts = []
    for item in error.errors():
        name = "_".join(str(p) for p in item["loc"]).upper() or "configuration"
        parts.append(f"{name}: {item['msg']}")
    return "invalid configuration: " + "; ".join(parts)
