"""GrpcExternalEnvAdapter: the client of a simulation's EnvironmentService.

Every call has a deadline. By default reset/step travel on one bidirectional Session stream (a watchdog cancels
an exchange past its deadline); a simulation that answers UNIMPLEMENTED to Session is driven with the unary calls.
A lost connection (UNAVAILABLE) is retried with exponential backoff: reconnect, check the spec is unchanged,
Reset, and report the interrupted step as truncated for every env (the episodes could not go on). Anything else
the simulation does wrong ends the run with an error naming the address, the call and the cause. Optional action
masks in Reset and Step answers are checked like the rest and kept for action_masks().
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import gymnasium as gym
import numpy as np

from rl_service.core.errors import EnvironmentProtocolError, EnvironmentUnavailable
from rl_service.infra.external_env.adapter import ExternalEnvAdapter, StepResult
from rl_service.infra.external_env.address import ExternalAddress
from rl_service.infra.external_env.codec import (
    BatchCodec,
    EnvSpec,
    MalformedData,
    decode_action_masks,
    decode_bools,
    decode_floats,
    spec_from_proto,
)
from rl_service.infra.logging_setup import get_logger
from rl_service_proto.v1 import environment_pb2 as pb
from rl_service_proto.v1 import environment_pb2_grpc as pb_grpc

_END = object()  # ends the Session request iterator
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


@dataclass(frozen=True)
class ConnectionOptions:
    """How the adapter talks to a simulation (from the ENV_* settings)."""

    step_timeout: float = 10.0  # deadline of each Reset and Step (ENV_STEP_TIMEOUT_SECONDS)
    connect_timeout: float = 5.0  # deadline of GetSpec, at StartTraining and on reconnects
    retries: int = 5  # reconnect attempts after a lost connection (ENV_CONNECT_RETRIES)
    backoff: float = 1.0  # first wait before reconnecting, doubled per attempt (ENV_RETRY_BACKOFF_SECONDS)
    max_backoff: float = 30.0
    max_message_bytes: int = 16 * 1024 * 1024
    use_stream: bool = True  # the Session stream (false: unary Reset/Step)
    # PEM roots that grpcs:// simulations' certificates must chain to (EXTERNAL_ENV_CA_FILE, or the system's bundle,
    # read once at start-up); None: the roots gRPC ships. Bytes, not a path, so a worker never reads a file.
    tls_roots: bytes | None = field(default=None, repr=False)

    def backoff_for(self, attempt: int) -> float:
        """Seconds to wait before reconnect attempt `attempt` (from 1)."""
        return float(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))


class _Lost(Exception):
    """The connection is gone (retryable); `cause` says how."""

    def __init__(self, call: str, cause: str) -> None:
        super().__init__(f"{call}: {cause}")
        self.call = call
        self.cause = cause


def open_channel(address: ExternalAddress, options: ConnectionOptions) -> grpc.Channel:
    """A channel with the message size caps: TLS for grpcs:// (the certificate verified for the address's host),
    plaintext for grpc:// and unix:."""
    channel_options = [
        ("grpc.max_receive_message_length", options.max_message_bytes),
        ("grpc.max_send_message_length", options.max_message_bytes),
    ]
    if address.tls:
        credentials = grpc.ssl_channel_credentials(root_certificates=options.tls_roots)
        return grpc.secure_channel(address.target, credentials, options=channel_options)
    return grpc.insecure_channel(address.target, options=channel_options)


def fetch_spec(address: ExternalAddress, options: ConnectionOptions) -> EnvSpec:
    """Ask a simulation for its spec once, within connect_timeout; EnvironmentUnavailable if it cannot answer."""
    channel = open_channel(address, options)
    try:
        return _get_spec(pb_grpc.EnvironmentServiceStub(channel), address, options)
    except _Lost as lost:
        raise EnvironmentUnavailable(f"env {address} is not reachable: {lost.cause}", field="env_id") from None
    finally:
        channel.close()


def _get_spec(stub: pb_grpc.EnvironmentServiceStub, address: ExternalAddress, options: ConnectionOptions) -> EnvSpec:
    try:
        message = stub.GetSpec(pb.GetSpecRequest(), timeout=options.connect_timeout)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        if code in _RETRYABLE:
            raise _Lost("GetSpec", f"{code.name}: {details}{_tls_hint(address, details)}") from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise _Lost("GetSpec", f"no answer to GetSpec within {options.connect_timeout:g}s "
                                   "(ENV_CONNECT_TIMEOUT_SECONDS)") from None
        raise EnvironmentUnavailable(f"env {address}: GetSpec failed: {code.name}: {details}",
                                     field="env_id") from None
    try:
        return spec_from_proto(message)
    except MalformedData as exc:
        raise EnvironmentProtocolError(f"env {address} sent a malformed spec: {exc}", field="env_id") from None


def _tls_hint(address: ExternalAddress, details: str | None) -> str:
    """What to check when a grpcs:// simulation's certificate did not verify."""
    if address.tls and "CERTIFICATE_VERIFY_FAILED" in (details or ""):
        return (" (the simulation's certificate does not verify against EXTERNAL_ENV_CA_FILE, or the system's roots "
                "when it is unset, for the host in the address)")
    return ""


class SessionStream:
    """The Session stream: one response per request; a watchdog cancels an exchange past its deadline."""

    def __init__(self, stub: pb_grpc.EnvironmentServiceStub, timeout: float) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        request_iterator: Iterator[pb.SessionRequest] = iter(self._requests.get, _END)
        self._responses: Any = stub.Session(request_iterator)
        self._timeout = timeout
        self._pending: tuple[int, float] | None = None
        self._sequence = 0
        self.exchanges = 0
        self.timed_out = False
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="env-session-watchdog", daemon=True)
        self._watchdog.start()

    def exchange(self, request: pb.SessionRequest) -> pb.SessionResponse:
        """Send one request, wait for its response (RpcError or StopIteration when the stream ends)."""
        self._sequence += 1
        self._pending = (self._sequence, time.monotonic() + self._timeout)
        self._requests.put(request)
        try:
            response: pb.SessionResponse = next(self._responses)
        finally:
            self._pending = None
        self.exchanges += 1
        return response

    def _watch(self) -> None:
        tick = min(max(self._timeout / 20, 0.005), 0.1)
        while not self._closed.wait(tick):
            pending = self._pending
            if pending is not None and time.monotonic() > pending[1] and self._pending is pending:
                self.timed_out = True
                self._responses.cancel()
                return

    def close(self) -> None:
        """Half-close the stream and cancel it; stop the watchdog."""
        self._closed.set()
        self._requests.put(_END)
        self._responses.cancel()


class GrpcExternalEnvAdapter(ExternalEnvAdapter):
    """A simulation reached over gRPC; connects (GetSpec) on construction."""

    def __init__(self, address: ExternalAddress, options: ConnectionOptions, *,
                 retry_connect: bool = False) -> None:
        self._target = address
        self._options = options
        self._log = get_logger("external_env").bind(env=address.url)
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.EnvironmentServiceStub | None = None
        self._session: SessionStream | None = None
        self._use_stream = options.use_stream
        self._last_observations: np.ndarray | None = None
        self._action_masks: np.ndarray | None = None  # of _last_observations; None: every action legal
        self.reconnects = 0
        self._closed = False
        self._known_spec: EnvSpec | None = None
        try:
            try:
                spec = self._connect()
            except _Lost as lost:
                if not retry_connect:
                    raise EnvironmentUnavailable(f"env {address} is not reachable: {lost.cause}",
                                                 field="env_id") from None
                spec = self._reconnect_with_retries(lost, reset=False)[0]
        except BaseException:
            self._close_channel()
            raise
        self._known_spec = spec
        self._observations = BatchCodec(spec.observation_space)
        self._actions = BatchCodec(spec.action_space)

    # ------------------------------------------------------------------------------------ the contract

    @property
    def spec(self) -> EnvSpec:
        """The spec the simulation announced at connect time."""
        return self._spec

    @property
    def _spec(self) -> EnvSpec:
        assert self._known_spec is not None, "used before connecting"
        return self._known_spec

    @property
    def address(self) -> str:
        """The address as written (grpc://... or unix:...)."""
        return self._target.url

    @property
    def using_stream(self) -> bool:
        """Whether reset/step travel on the Session stream (false after an UNIMPLEMENTED fallback)."""
        return self._use_stream

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Reset every env; a lost connection is retried (reconnect, then the same Reset)."""
        try:
            observations = self._reset_once(seed)
        except _Lost as lost:
            observations = self._reconnect_with_retries(lost, reset=True, seed=seed)[1]
        self._last_observations = observations
        return observations

    def step(self, actions: np.ndarray, env_ids: Sequence[int] | None = None) -> StepResult:
        """Step every env in one message; after a restored connection, every episode is reported truncated."""
        if env_ids is not None:
            raise NotImplementedError("env subsets")  # protocol version 2: to follow
        spec = self._spec
        request = pb.StepRequest(actions=self._actions.encode(self._check_actions(actions)))
        try:
            response = self._call("Step", request)
        except _Lost as lost:
            previous = self._last_observations
            observations = self._reconnect_with_retries(lost, reset=True)[1]
            self._last_observations = observations
            n = spec.num_envs
            finals = {i: previous[i] for i in range(n)} if previous is not None else {i: observations[i]
                                                                                   for i in range(n)}
            return StepResult(observations, np.zeros(n, dtype=np.float32), np.zeros(n, dtype=bool),
                              np.ones(n, dtype=bool), finals, reconnected=True)
        assert isinstance(response, pb.StepResponse)
        result = self._decode_step(response)
        self._last_observations = result.observations
        return result

    def action_masks(self) -> np.ndarray | None:
        """The masks of the last Reset or Step answer, (num_envs, n) bool; None when it carried none."""
        return self._action_masks

    def close(self) -> None:
        """End the stream and close the channel (idempotent)."""
        if not self._closed:
            self._closed = True
            self._close_channel()

    # ------------------------------------------------------------------------------------ internals

    def _connect(self) -> EnvSpec:
        """A fresh channel and GetSpec; _Lost when the simulation cannot be reached."""
        self._close_channel()
        self._channel = open_channel(self._target, self._options)
        self._stub = pb_grpc.EnvironmentServiceStub(self._channel)
        return _get_spec(self._stub, self._target, self._options)

    def _reconnect_with_retries(self, lost: _Lost, reset: bool, seed: int | None = None
                                ) -> tuple[EnvSpec, np.ndarray]:
        """Reconnect with backoff (and Reset); EnvironmentUnavailable once ENV_CONNECT_RETRIES attempts failed."""
        options = self._options
        last = lost
        self._log.warning("connection to the simulation lost; reconnecting", call=lost.call, cause=lost.cause,
                          retries=options.retries)
        for attempt in range(1, options.retries + 1):
            time.sleep(options.backoff_for(attempt))
            try:
                spec = self._connect()
                known = self._known_spec
                if known is not None and not spec.compatible_with(known):
                    raise EnvironmentProtocolError(
                        f"env {self.address} came back with a different spec ({spec.describe()}) than the run "
                        f"started with ({known.describe()})", field="env_id")
                observations = self._reset_once(seed) if reset else np.empty(0)
            except _Lost as again:
                last = again
                self._log.warning("reconnect attempt failed", attempt=attempt, cause=again.cause)
                continue
            self.reconnects += 1
            self._log.warning("reconnected to the simulation", attempt=attempt, episodes_restarted=reset)
            return spec, observations
        self._close_channel()
        retried = (f"{options.retries} reconnect attempts failed (ENV_CONNECT_RETRIES={options.retries}), the last: "
                   f"{last.cause}") if options.retries else "not retried (ENV_CONNECT_RETRIES=0)"
        raise EnvironmentUnavailable(
            f"env {self.address}: connection lost during {lost.call} ({lost.cause}); {retried}", field="env_id")

    def _reset_once(self, seed: int | None) -> np.ndarray:
        request = pb.ResetRequest() if seed is None else pb.ResetRequest(seed=seed)
        response = self._call("Reset", request)
        assert isinstance(response, pb.ResetResponse)
        spec = self._spec
        try:
            observations = self._observations.decode(response.observations, spec.num_envs, "observations")
            masks = decode_action_masks(response.action_masks, spec.action_space, spec.num_envs)
        except MalformedData as exc:
            raise self._malformed("Reset", exc) from None
        self._action_masks = masks
        return observations

    def _call(self, name: str, request: pb.ResetRequest | pb.StepRequest) -> pb.ResetResponse | pb.StepResponse:
        """One Reset or Step on the stream (or unary); raises _Lost, or EnvironmentUnavailable for the rest."""
        if self._closed or self._stub is None:
            state = "closed" if self._closed else "not connected (the connection was lost)"
            raise EnvironmentUnavailable(f"env {self.address}: the adapter is {state}", field="env_id")
        if self._use_stream:
            try:
                return self._call_stream(name, request)
            except _StreamUnimplemented:
                self._use_stream = False
                self._log.info("the simulation does not implement Session; using unary Reset and Step")
        method = self._stub.Reset if name == "Reset" else self._stub.Step
        try:
            response: pb.ResetResponse | pb.StepResponse = method(request, timeout=self._options.step_timeout)
        except grpc.RpcError as exc:
            raise self._failure(name, exc, timed_out=False) from None
        return response

    def _call_stream(self, name: str, request: pb.ResetRequest | pb.StepRequest
                     ) -> pb.ResetResponse | pb.StepResponse:
        assert self._stub is not None
        if self._session is None:
            self._session = SessionStream(self._stub, self._options.step_timeout)
        session = self._session
        message = pb.SessionRequest(reset=request) if isinstance(request, pb.ResetRequest) \
            else pb.SessionRequest(step=request)
        try:
            response = session.exchange(message)
        except grpc.RpcError as exc:
            self._end_session()
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and session.exchanges == 0:
                raise _StreamUnimplemented() from None
            raise self._failure(name, exc, timed_out=session.timed_out) from None
        except StopIteration:
            self._end_session()
            raise EnvironmentProtocolError(
                f"env {self.address}: the simulation ended the Session stream without answering {name} "
                "(a simulation must answer every request on the stream)", field="env_id") from None
        kind = response.WhichOneof("response")
        expected = "reset" if name == "Reset" else "step"
        if kind != expected:
            self._end_session()
            raise EnvironmentProtocolError(
                f"env {self.address}: answered a Session {name} with {kind or 'an empty response'}; expected "
                f"{expected}", field="env_id")
        return response.reset if kind == "reset" else response.step

    def _failure(self, name: str, exc: grpc.RpcError, timed_out: bool) -> Exception:
        code, details = exc.code(), exc.details()
        if timed_out or code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return EnvironmentUnavailable(
                f"env {self.address}: {name} did not answer within {self._options.step_timeout:g}s "
                "(ENV_STEP_TIMEOUT_SECONDS); the simulation is too slow or stuck", field="env_id")
        if code in _RETRYABLE or code == grpc.StatusCode.CANCELLED:
            return _Lost(name, f"{code.name}: {details}")
        return EnvironmentUnavailable(f"env {self.address}: {name} failed: {code.name}: {details}", field="env_id")

    def _decode_step(self, response: pb.StepResponse) -> StepResult:
        spec = self._spec
        n = spec.num_envs
        try:
            observations = self._observations.decode(response.observations, n, "observations")
            rewards = decode_floats(response.rewards, n, "rewards")
            terminated = decode_bools(response.terminated, n, "terminated")
            truncated = decode_bools(response.truncated, n, "truncated")
            done = terminated | truncated
            ended = np.flatnonzero(done) if done.any() else ()
            finals = self._observations.decode(response.final_observations, len(ended), "final_observations")
            # For an env that ended: the mask of its next episode's first observation, as `observations` holds.
            masks = decode_action_masks(response.action_masks, spec.action_space, n)
        except MalformedData as exc:
            raise self._malformed("Step", exc) from None
        self._action_masks = masks
        return StepResult(observations, rewards, terminated, truncated,
                          {int(i): finals[j] for j, i in enumerate(ended)} if len(ended) else {})

    def _malformed(self, call: str, exc: MalformedData) -> EnvironmentProtocolError:
        return EnvironmentProtocolError(
            f"env {self.address} answered {call} with a malformed field '{exc.field}': {exc}", field="env_id")

    def _check_actions(self, actions: np.ndarray) -> np.ndarray:
        array = np.asarray(actions)
        spec = self._spec
        if array.size != spec.num_envs * self._actions.size:
            raise ValueError(f"{array.size} action values for {spec.num_envs} envs of {spec.action_space}")
        space = spec.action_space
        if isinstance(space, gym.spaces.Box):  # the protocol promises Box actions within low/high
            array = np.clip(array.reshape((spec.num_envs, *self._actions.shape)), space.low, space.high)
        return array

    def _end_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _close_channel(self) -> None:
        self._end_session()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._stub = None


class _StreamUnimplemented(Exception):
    """The simulation does not implement Session."""
