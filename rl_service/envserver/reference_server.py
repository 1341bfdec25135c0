"""ReferenceEnvironmentServicer: the environment protocol served over a batch of Gymnasium envs.

Read it as the template for a simulation in another language: GetSpec answers a fixed spec; Reset and Step
decode, check, act under one lock, encode; the Session stream runs the same two handlers per message; every
failure maps to the status code docs/environment-protocol.md names. A hosted env with `action_masks()` (and a
Discrete action space) has its masks sent in every Reset and Step answer.

Served over a ProcessBatch (env-server --processes P > 1), the Session stream reads ahead: a thread checks and
dispatches each request as it arrives (waiting only for the workers it concerns to be idle), so two pipelined
group steps on different workers run at once; the answers are still yielded in request order, and a refused
request ends the stream after the answers before it, as one at a time would.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rl_service.envserver.process_batch import ProcessBatch, StepFailed, WorkerGone
from rl_service.envserver.read_ahead import RpcAbort, session_reading_ahead
from rl_service.infra.external_env.address import MAX_SOCKET_PATH_BYTES, unix_target
from rl_service.infra.external_env.codec import (
    ENV_SUBSETS_VERSION,
    BatchCodec,
    MalformedData,
    encode_action_masks,
    spec_to_proto,
)
from rl_service.infra.external_env.env_batch import (
    BadEnvIds,
    BatchStep,
    EnvBatch,
    ResetNeeded,
    check_env_ids,
)
from rl_service.infra.tls import ServerTls
from rl_service_proto.v1 import environment_pb2 as pb
from rl_service_proto.v1 import environment_pb2_grpc as pb_grpc

ENVIRONMENT_SERVICE = pb.DESCRIPTOR.services_by_name["EnvironmentService"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
AnyBatch = EnvBatch | ProcessBatch


class ReferenceEnvironmentServicer(pb_grpc.EnvironmentServiceServicer):  # type: ignore[misc]
    """Serves one batch of envs to one client at a time; the unary calls and the Session stream share its state."""

    def __init__(self, batch: AnyBatch, raw_observations: bool = False) -> None:
        self.batch = batch
        self._pool = batch if isinstance(batch, ProcessBatch) else None  # envs in worker processes: read ahead
        self._raw = raw_observations
        self._spec = spec_to_proto(batch.spec)
        self._spec.protocol_version = ENV_SUBSETS_VERSION  # Step takes env_ids
        self._observations = BatchCodec(batch.observation_space)
        self._actions = BatchCodec(batch.action_space)
        self._lock = threading.Lock()
        self.calls = {"GetSpec": 0, "Reset": 0, "Step": 0, "Session": 0}
        self.steps_served = 0  # vector steps answered, over unary Step and the stream alike

    # ------------------------------------------------------------------------------------ RPCs

    def GetSpec(self, request: pb.GetSpecRequest, context: grpc.ServicerContext) -> pb.EnvironmentSpec:
        self.calls["GetSpec"] += 1
        return self._spec

    def Reset(self, request: pb.ResetRequest, context: grpc.ServicerContext) -> pb.ResetResponse:
        self.calls["Reset"] += 1
        try:
            return self.reset(request)
        except RpcAbort as abort:
            context.abort(abort.code, abort.message)
            raise

    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepResponse:
        self.calls["Step"] += 1
        try:
            return self.step(request)
        except RpcAbort as abort:
            context.abort(abort.code, abort.message)
            raise

    def Session(self, requests: Iterator[pb.SessionRequest], context: grpc.ServicerContext
                ) -> Iterator[pb.SessionResponse]:
        self.calls["Session"] += 1
        if self._pool is not None:
            yield from session_reading_ahead(requests, context, self._start_session_request, self._pool.wake)
            return
        for request in requests:
            kind = request.WhichOneof("request")
            try:
                if kind == "reset":
                    yield pb.SessionResponse(reset=self.reset(request.reset))
                elif kind == "step":
                    yield pb.SessionResponse(step=self.step(request.step))
                else:
                    raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "SessionRequest: set reset or step")
            except RpcAbort as abort:
                context.abort(abort.code, abort.message)

    # ------------------------------------------------------------------------------------ handlers

    def reset(self, request: pb.ResetRequest) -> pb.ResetResponse:
        """Start new episodes in every env (env i seeded with seed + i)."""
        answer = self._start_reset(request)
        assert answer is not None
        return answer()

    def step(self, request: pb.StepRequest) -> pb.StepResponse:
        """Step every env (or those in env_ids, answered in that order); ended envs auto-reset and report their
        final observation."""
        answer = self._start_step(request)
        assert answer is not None
        return answer()

    def _start_reset(self, request: pb.ResetRequest, abandon: threading.Event | None = None
                     ) -> Callable[[], pb.ResetResponse] | None:
        """Check and start a Reset; a call that waits for its answer (None: `abandon` was set before it started)."""
        seed = request.seed if request.HasField("seed") else None
        if seed is not None and seed < 0:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"seed: must be >= 0, got {seed}")
        if self._pool is None:
            with self._lock:
                try:
                    observations = self.batch.reset(seed)
                except Exception as exc:
                    raise RpcAbort(grpc.StatusCode.INTERNAL,
                                   f"reset failed: {type(exc).__name__}: {exc}") from None
                masks = self.batch.last_action_masks
            response = self._reset_response(observations, masks)
            return lambda: response
        try:
            pending = self._pool.start_reset(seed, abandon)
        except WorkerGone as exc:
            raise RpcAbort(grpc.StatusCode.INTERNAL, f"reset failed: {_failure_text(exc)}") from None
        if pending is None:
            return None

        def answer() -> pb.ResetResponse:
            try:
                observations, masks = pending.result()
            except Exception as exc:
                raise RpcAbort(grpc.StatusCode.INTERNAL, f"reset failed: {_failure_text(exc)}") from None
            return self._reset_response(observations, masks)

        return answer

    def _start_step(self, request: pb.StepRequest, abandon: threading.Event | None = None
                    ) -> Callable[[], pb.StepResponse] | None:
        """Check and start a Step; a call that waits for its answer (None: `abandon` was set before it started)."""
        batch = self.batch
        env_ids = list(request.env_ids)
        try:
            if env_ids:  # protocol version 2: distinct, in range; the count is checked against the actions below
                check_env_ids(env_ids, batch.num_envs, len(env_ids))
            actions = self._actions.decode(request.actions, len(env_ids) or batch.num_envs, "actions",
                                           typed_only=True)
        except BadEnvIds as exc:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None  # state unchanged
        except MalformedData as exc:
            message = f"env_ids: {len(env_ids)} envs named, and {exc}" if env_ids else str(exc)
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, message) from None  # state unchanged
        _check_box_actions(actions, batch)
        if self._pool is None:
            with self._lock:
                result = _stepping(lambda: self.batch.step(actions, env_ids or None))
                self.steps_served += 1
            response = self._step_response(result)
            return lambda: response
        pool = self._pool
        pending = _stepping(lambda: pool.start_step(actions, env_ids or None, abandon))
        if pending is None:
            return None

        def answer() -> pb.StepResponse:
            result = _stepping(pending.result)
            with self._lock:
                self.steps_served += 1
            return self._step_response(result)

        return answer

    def _reset_response(self, observations: np.ndarray, masks: np.ndarray | None) -> pb.ResetResponse:
        return pb.ResetResponse(observations=self._encode(observations), action_masks=encode_action_masks(masks))

    def _step_response(self, result: BatchStep) -> pb.StepResponse:
        return pb.StepResponse(
            observations=self._encode(result.observations),
            rewards=result.rewards.tolist(),
            terminated=result.terminated.tolist(),
            truncated=result.truncated.tolist(),
            final_observations=self._encode(result.final_observations) if len(result.final_observations) else None,
            action_masks=encode_action_masks(result.action_masks),  # after the auto-resets, like observations
        )

    def _encode(self, observations: np.ndarray) -> pb.Tensor:
        return self._observations.encode(observations, raw=self._raw)

    def _start_session_request(self, request: pb.SessionRequest, abandon: threading.Event
                               ) -> Callable[[], pb.SessionResponse] | None:
        """Check and start one message of the stream (RpcAbort if refused); a call that waits for its answer."""
        kind = request.WhichOneof("request")
        if kind == "reset":
            reset = self._start_reset(request.reset, abandon)
            return None if reset is None else (lambda: pb.SessionResponse(reset=reset()))
        if kind == "step":
            step = self._start_step(request.step, abandon)
            return None if step is None else (lambda: pb.SessionResponse(step=step()))
        raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "SessionRequest: set reset or step")


def _stepping(call: Callable[[], Any]) -> Any:
    """call(), its failures turned into the status codes of a failed Step."""
    try:
        return call()
    except ResetNeeded as exc:
        raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
    except Exception as exc:
        raise RpcAbort(grpc.StatusCode.INTERNAL, f"step failed: {_failure_text(exc)}; Reset is required") from None


def _failure_text(exc: Exception) -> str:
    """"<ExceptionType>: <message>" of what failed; a worker's env failure already reads so."""
    return str(exc) if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"


def _check_box_actions(actions: np.ndarray, batch: AnyBatch) -> None:
    """Box actions must lie within the bounds (the client clips them)."""
    space = batch.action_space
    low, high = getattr(space, "low", None), getattr(space, "high", None)
    if low is None or high is None or actions.dtype.kind != "f":
        return
    if np.any(actions < low) or np.any(actions > high):
        raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"actions: outside the action space {space}")


@dataclass
class EnvServerHandle:
    """A started environment server, on host:port or on a unix socket (socket_path)."""

    server: grpc.Server
    port: int
    host: str
    servicer: Any
    socket_path: str | None = None  # absolute
    socket_inode: int | None = None  # the socket file this server created (stop removes only that one)
    tls: bool = False  # serves TLS only (grpcs://)
    closers: list[Callable[[], None]] = field(default_factory=list)  # called by stop(), after the server stops

    @property
    def address(self) -> str:
        """grpc://host:port, grpcs://host:port (TLS) or unix:///absolute/path, as StartTraining takes it."""
        if self.socket_path is not None:
            return f"unix://{self.socket_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'grpcs' if self.tls else 'grpc'}://{host}:{self.port}"

    def stop(self, grace: float | None = 0) -> None:
        """Stop serving (in-flight calls are cancelled after `grace` seconds) and remove the socket file."""
        self.server.stop(grace).wait()
        for close in self.closers:
            close()
        if self.socket_path is not None and self.socket_inode is not None:
            try:
                if os.lstat(self.socket_path).st_ino == self.socket_inode:
                    os.unlink(self.socket_path)
            except OSError:
                pass  # already gone (gRPC removes it too), or not ours to remove

    def wait(self) -> None:
        """Block until the server stops."""
        self.server.wait_for_termination()


def start_env_server(servicer: pb_grpc.EnvironmentServiceServicer, host: str = "127.0.0.1", port: int = 0,
                     max_workers: int = 8, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                     unix_socket: str | os.PathLike[str] | None = None, tls: ServerTls | None = None
                     ) -> EnvServerHandle:
    """Serve `servicer` (plus health and reflection) on host:port (0: any free port), TLS only when `tls` is
    given, or on the unix socket `unix_socket` instead (a stale socket left there is replaced); return at once."""
    if tls is not None and unix_socket is not None:
        raise ValueError("TLS is served on host:port (grpcs://), not on a unix socket")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="env-rpc"),
                         options=[("grpc.max_receive_message_length", max_message_bytes),
                                  ("grpc.max_send_message_length", max_message_bytes),
                                  ("grpc.so_reuseport", 0)])
    pb_grpc.add_EnvironmentServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (ENVIRONMENT_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    socket_path = None if unix_socket is None else os.path.abspath(unix_socket)
    if socket_path is not None:
        _make_way_for_socket(socket_path)
        bound = unix_target(socket_path)
    else:
        bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        actual = server.add_insecure_port(bound) if tls is None else server.add_secure_port(bound, tls.credentials())
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {bound}: {exc}") from None
    server.start()
    for name in ("", ENVIRONMENT_SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if socket_path is None:
        return EnvServerHandle(server, actual, host, servicer, tls=tls is not None)
    return EnvServerHandle(server, 0, "", servicer, socket_path, os.lstat(socket_path).st_ino)


def _make_way_for_socket(path: str) -> None:
    """Check that a socket can be created at `path`; remove a stale one (nobody listening) from a previous run.

    OSError, naming the path, for anything else: a path too long, a missing directory, a file that is not a socket
    (never removed), a socket another server still listens on.
    """
    where = f"cannot listen on unix:{path}"
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise OSError(f"{where}: the path is {size} bytes; a unix socket path holds at most "
                      f"{MAX_SOCKET_PATH_BYTES} (sun_path)")
    if not os.path.isdir(os.path.dirname(path)):
        raise OSError(f"{where}: directory {os.path.dirname(path)} does not exist")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{where}: it exists and is not a socket; refusing to remove it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            pass  # stale: its server is gone
        except OSError as exc:
            raise OSError(f"{where}: cannot tell whether the socket there is in use ({exc})") from None
        else:
            raise OSError(f"{where}: another server is listening on it")
    os.unlink(path)


def serve_gym(env_id: str, num_envs: int, host: str = "127.0.0.1", port: int = 0,
              raw_observations: bool = False, unix_socket: str | os.PathLike[str] | None = None,
              tls: ServerTls | None = None, processes: int = 1, modules: Sequence[str] = ()) -> EnvServerHandle:
    """Serve num_envs instances of a Gymnasium id (a reference server in one call, for tests and benchmarks);
    over `processes` worker processes when > 1 (each imports `modules` first); stop() ends them too."""
    batch: AnyBatch = (EnvBatch.from_gym_id(env_id, num_envs, version=server_version()) if processes == 1 else
                       ProcessBatch(env_id, num_envs, processes, modules=modules, version=server_version()))
    try:
        handle = start_env_server(ReferenceEnvironmentServicer(batch, raw_observations), host, port,
                                  unix_socket=unix_socket, tls=tls)
    except BaseException:
        batch.close()
        raise
    if isinstance(batch, ProcessBatch):
        handle.closers.append(batch.close)
    return handle


def server_version() -> str:
    """This server's version string: rl_service and gymnasium versions."""
    import gymnasium

    import rl_service

    return f"rl_service {rl_service.__version__}, gymnasium {gymnasium.__version__}"
