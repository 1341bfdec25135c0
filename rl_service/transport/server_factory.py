"""Builds the whole service from Settings: store, registry, executor, orchestrator, gRPC server, health."""

from __future__ import annotations

import importlib
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rl_service.core.policies.manager import PolicyManager
from rl_service.core.policies.records import PolicyConfig
from rl_service.core.runs.orchestrator import Orchestrator, OrchestratorConfig
from rl_service.core.runs.worker import WorkerServices, run_worker
from rl_service.infra.atomic import remove_temp_files
from rl_service.infra.data_dir_lock import DataDirLock
from rl_service.infra.external_env.connector import GrpcExternalEnvironments
from rl_service.infra.logging_setup import get_logger
from rl_service.infra.model_store import FileModelStore
from rl_service.infra.policy_store import FilePolicyStore
from rl_service.infra.process_executor import LocalProcessExecutor
from rl_service.infra.process_lifeline import exit_later
from rl_service.infra.ray_executor import RayExecutor
from rl_service.infra.settings import Settings
from rl_service.infra.sqlite_run_registry import SqliteRunRegistry
from rl_service.transport.auth import AuthInterceptor, auth_interceptors
from rl_service.transport.decode_guard import server_interceptors
from rl_service.transport.health_port import start_health_server
from rl_service.transport.http.server import HttpServer, start_http_api
from rl_service.transport.metrics import MetricsInterceptor, ServiceMetrics
from rl_service.transport.policy_servicer import PolicyServicer
from rl_service.transport.port_security import PortSecurity
from rl_service.transport.stream_slots import StreamSlots
from rl_service.transport.training_servicer import TrainingServicer
from rl_service_proto.v1 import policy_pb2, policy_pb2_grpc, training_pb2, training_pb2_grpc

TRAINING_SERVICE = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name
POLICY_SERVICE = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
HEALTH_SERVICES = ("", TRAINING_SERVICE, POLICY_SERVICE)
# Modules the fork server imports once so every worker starts without re-importing torch.
WORKER_PRELOAD = ("rl_service.core.runs.worker",)
# After SIGTERM the process ends within SHUTDOWN_GRACE_SECONDS plus this, or the watchdog ends it: covers killing
# late workers, the event pump's join, policy saves and gRPC's 5 s for RPCs in flight.
SHUTDOWN_OVERRUN_SECONDS = 10.0


@dataclass
class RunningServer:
    """A started server: its bound port, and how to stop it."""

    server: grpc.Server
    port: int
    orchestrator: Orchestrator
    policies: PolicyManager
    health: health.HealthServicer
    settings: Settings
    lock: DataDirLock | None = None
    health_server: grpc.Server | None = None  # HEALTH_PORT's plaintext health-only server
    health_port: int | None = None
    http_server: HttpServer | None = None  # HTTP_PORT's HTTP/JSON API, /metrics and dashboard
    http_port: int | None = None
    transport: str = "plaintext"  # how GRPC_PORT is served (PortSecurity.mode), for the start-up line
    _stopped: bool = False

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, let runs checkpoint and stop, then stop the gRPC server (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        log = get_logger("server")
        log.info("shutting down", grace_seconds=self.settings.shutdown_grace_seconds)
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        # Stop runs first while RPCs still work, so watchers see their runs end.
        self.orchestrator.shutdown(self.settings.shutdown_grace_seconds if grace is None else grace)
        self.policies.close()
        # Bounded: a gRPC stop that never completes (seen after heavy load) must not keep the data directory.
        if not self.server.stop(grace=5).wait(timeout=SHUTDOWN_OVERRUN_SECONDS):
            log.warning("gRPC server did not stop in time", seconds=SHUTDOWN_OVERRUN_SECONDS)
        if self.http_server is not None:
            self.http_server.stop()
        if self.health_server is not None:
            self.health_server.stop(grace=0)
        if self.lock is not None:
            self.lock.release()  # workers have ended or been killed; one still dying keeps its copy of the lock
        log.info("server stopped")

    def wait(self) -> None:
        """Block until the server terminates."""
        self.server.wait_for_termination()


def orchestrator_config(settings: Settings) -> OrchestratorConfig:
    """The orchestrator's share of the settings."""
    return OrchestratorConfig(
        max_concurrent_runs=settings.max_concurrent_runs,
        max_queued_runs=settings.max_queued_runs,
        max_total_timesteps=settings.max_total_timesteps,
        default_checkpoint_interval=settings.default_checkpoint_interval,
        progress_interval_seconds=settings.progress_interval_seconds,
        worker_torch_threads=settings.worker_torch_threads,
        stop_timeout_seconds=settings.stop_timeout_seconds,
        max_act_batch=settings.max_act_batch,
        tensorboard_dir=settings.tensorboard_dir.resolve() if settings.tensorboard_dir else None,
        external_envs=GrpcExternalEnvironments.from_settings(settings),
        auto_resume=settings.auto_resume,
        max_run_attempts=settings.max_run_attempts,
        save_replay_buffer=settings.save_replay_buffer,
        max_network_parameters=settings.max_network_parameters,
    )


def build_server(settings: Settings) -> RunningServer:
    """Read the files settings name (ConfigurationError: refused before anything is created), own the data
    directories (lock, crash leftovers), then build and start the rest (DataDirInUse: refused)."""
    security = PortSecurity.from_settings(settings)  # TLS files and the exposure rule
    config = orchestrator_config(settings)  # reads EXTERNAL_ENV_CA_FILE
    interceptors = auth_interceptors(settings)  # reads AUTH_TOKENS_FILE
    lock = DataDirLock.acquire(settings.data_dir)
    try:
        removed = remove_temp_files(settings.data_dir, settings.models_root, settings.checkpoint_root,
                                    settings.policies_root)
        if removed:
            get_logger("server").info("removed temp files left by interrupted writes", count=removed)
        return _build_started(settings, lock, config, security, interceptors)
    except BaseException:
        lock.release()
        raise


def _build_started(settings: Settings, lock: DataDirLock, config: OrchestratorConfig, security: PortSecurity,
                   interceptors: list[grpc.ServerInterceptor]) -> RunningServer:
    """Create every component, bind, start; health turns SERVING only once all of it is ready."""
    import torch

    # Act runs small MLPs in RPC threads; one intra-op thread each is fastest and leaves cores to workers.
    torch.set_num_threads(1)
    log = get_logger("server")
    store = FileModelStore(settings.models_root, settings.checkpoint_root, settings.keep_checkpoints)
    registry = SqliteRunRegistry(settings.registry_path)
    for module in settings.gym_modules:  # their Gymnasium registrations, here for validation and Act
        importlib.import_module(module)
    executor = RayExecutor(settings) if settings.executor == "ray" else LocalProcessExecutor(
        run_worker, WorkerServices(store, config.external_envs), settings.worker_start_method,
        (*WORKER_PRELOAD, *settings.gym_modules), log_level=settings.log_level, log_format=settings.log_format,
        lock_fd=lock.fd, cpus=settings.worker_cpu_list, cpus_per_worker=settings.worker_torch_threads)
    orchestrator = Orchestrator(config, registry, store, executor, log)
    policies = PolicyManager(FilePolicyStore(settings.policies_root),
                             PolicyConfig(versions_kept=settings.policy_versions_kept,
                                          max_pending_steps=settings.max_pending_steps,
                                          sync=settings.policy_sync,
                                          sync_interval_seconds=settings.policy_sync_interval_seconds,
                                          max_policies=settings.max_policies,
                                          max_network_parameters=settings.max_network_parameters), log)

    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    # Outermost first: metrics (refusals count too), authentication, then the decode guard, so that an
    # unauthenticated caller's garbage bytes are UNAUTHENTICATED, not INVALID_ARGUMENT (the guard's deserializer
    # never raises).
    metrics = ServiceMetrics(orchestrator, policies)
    auth = next(i for i in interceptors if isinstance(i, AuthInterceptor))
    interceptors = [MetricsInterceptor(metrics), *interceptors, *server_interceptors()]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.grpc_max_workers,
                                                    thread_name_prefix="rpc"),
                         interceptors=interceptors, options=options)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for service in HEALTH_SERVICES:
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    stream_slots = StreamSlots(settings.max_watch_streams)  # one cap over both services' watch streams
    training = TrainingServicer(orchestrator, stream_slots)
    policy = PolicyServicer(policies, settings.max_batch_bytes, stream_slots)
    training_pb2_grpc.add_TrainingServiceServicer_to_server(training, server)
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(policy, server)
    reflection.enable_server_reflection(
        (TRAINING_SERVICE, POLICY_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    if security.insecure_warning:
        log.warning(security.insecure_warning)
    try:
        port = security.bind(server, settings.address)
    except RuntimeError as exc:
        orchestrator.shutdown(0)
        raise OSError(f"cannot listen on {settings.address}: {exc}") from None
    server.start()
    health_server, health_port = None, None
    if settings.health_port is not None:
        try:
            health_server, health_port = start_health_server(health_servicer, settings.grpc_host,
                                                             settings.health_port)
        except OSError:
            server.stop(grace=0)
            orchestrator.shutdown(0)
            raise
    http_server = None
    if settings.http_enabled:  # the same servicers, so both transports answer alike
        try:
            http_server = start_http_api(settings, training, policy, health_servicer, auth, metrics)
        except OSError:
            for stoppable in (server, health_server):
                if stoppable is not None:
                    stoppable.stop(grace=0)
            orchestrator.shutdown(0)
            raise
    for service in HEALTH_SERVICES:
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, orchestrator, policies, health_servicer, settings, lock, health_server,
                         health_port, http_server, http_server.port if http_server else None, transport=security.mode)


def log_started(running: RunningServer) -> None:
    """The "server started" line that supervisors, scripts and tests wait for: logged once SIGTERM and SIGINT are
    handled (install_signal_handlers), so a signal sent on seeing it always stops the server gracefully."""
    settings = running.settings
    get_logger("server").info(
        "server started", address=f"{settings.grpc_host}:{running.port}", transport=running.transport,
        authentication="tokens" if settings.auth_tokens_file is not None else "off (every call acts as admin)",
        models_dir=str(settings.models_root), checkpoint_dir=str(settings.checkpoint_root),
        max_concurrent_runs=settings.max_concurrent_runs, http=_http_address(settings, running.http_server))


def _http_address(settings: Settings, http_server: HttpServer | None) -> str:
    """Where the HTTP API and dashboard answer, for the start-up line ("off" when HTTP_ENABLED=false)."""
    if http_server is None:
        return "off"
    host = f"[{settings.grpc_host}]" if ":" in settings.grpc_host else settings.grpc_host
    return f"{http_server.scheme}://{host}:{http_server.port}/"


def install_signal_handlers(running: RunningServer) -> threading.Event:
    """SIGTERM/SIGINT stop the server gracefully; the returned event is set once stopped."""
    import signal

    done = threading.Event()
    stopping = threading.Event()

    def _stop_then_signal() -> None:
        running.stop()
        done.set()

    def _handle(signum: int, frame: object) -> None:
        get_logger("server").info("signal received", signal=signal.Signals(signum).name)
        if not stopping.is_set():
            stopping.set()
            # Whatever hangs (a gRPC stop, a thread joined at exit), the process ends; its workers die with it.
            exit_later(running.settings.shutdown_grace_seconds + SHUTDOWN_OVERRUN_SECONDS,
                       "shutdown overran its deadline; exiting")
        threading.Thread(target=_stop_then_signal, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    return done
