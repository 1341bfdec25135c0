"""GrpcExternalEnvAdapter: the client of a simulation's EnvironmentService.

Every call has a deadline. By default reset/step travel on one bidirectional Session stream (grpc_session.py; a
watchdog cancels it past an answer's deadline); a simulation that answers UNIMPLEMENTED to Session is driven with
the unary calls. Up to MAX_STEPS_IN_FLIGHT steps may be sent before their answers are read (send_step /
receive_step); on the stream they are pipelined, answered in order. A simulation speaking protocol version 2 steps a
subset of its envs (env_ids). A lost connection (UNAVAILABLE) is retried with exponential backoff: reconnect, check
the spec is unchanged, Reset, and report every step in flight as truncated for each of its envs (the episodes could
not go on). Anything else the simulation does wrong ends the run with an error naming the address, the call and
the cause. Optional action masks in Reset and Step answers are checked like the rest and kept for action_masks().
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import gymnasium as gym
import numpy as np

from rl_service.core.errors import EnvironmentProtocolError, EnvironmentUnavailable
from rl_service.infra.external_env.adapter import MAX_STEPS_IN_FLIGHT, ExternalEnvAdapter, StepResult
from rl_service.infra.external_env.address import ExternalAddress
from rl_service.infra.external_env.codec import (
    BatchCodec,
    EnvSpec,
    MalformedData,
    decode_action_masks,
    decode_bools,
    decode_floats,
)
from rl_service.infra.external_env.grpc_session import (
    RETRYABLE,
    ConnectionOptions,
    Lost,
    SessionStream,
    StreamUnimplemented,
    fetch_spec,
    get_spec,
    open_channel,
)
from rl_service.infra.logging_setup import get_logger
from rl_service_proto.v1 import environment_pb2 as pb
from rl_service_proto.v1 import environment_pb2_grpc as pb_grpc

__all__ = ["ConnectionOptions", "GrpcExternalEnvAdapter", "SessionStream", "fetch_spec", "open_channel"]


@dataclass
class _Sent:
    """A step sent and not yet received: its request, its envs, and (unary calls, reconnects) its outcome."""

    request: pb.StepRequest
    env_ids: np.ndarray | None  # None: every env
    outcome: pb.StepResponse | Exception | None = None  # a unary call's answer or failure
    result: StepResult | None = None  # already decided (a reconnect cut it)


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
        self._in_flight: deque[_Sent] = deque()
        # Every env's last observation and mask (our own copies, updated row by row by subset steps): the final
        # observations of a reconnect, and action_masks().
        self._last_observations: np.ndarray | None = None
        self._action_masks: np.ndarray | None = None  # None: every action legal
        # Envs a reconnect reset while no step of theirs was in flight (another group's was): their next answer
        # must still report the cut episode, ending at the observation the trainer last saw (_cut_from).
        self._restarted: np.ndarray | None = None
        self._cut_from: np.ndarray | None = None
        self.reconnects = 0
        self._closed = False
        self._known_spec: EnvSpec | None = None
        try:
            try:
                spec = self._connect()
            except Lost as lost:
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

    @property
    def supports_env_subsets(self) -> bool:
        """Whether the simulation speaks protocol version 2 (step takes env_ids)."""
        return self._spec.supports_env_subsets

    @property
    def steps_in_flight(self) -> int:
        """Steps sent and not yet received."""
        return len(self._in_flight)

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Reset every env; a lost connection is retried (reconnect, then the same Reset)."""
        if self._in_flight:
            raise RuntimeError(f"reset with {len(self._in_flight)} step(s) in flight; receive them first")
        try:
            observations = self._reset_once(seed)
        except Lost as lost:
            observations = self._reconnect_with_retries(lost, reset=True, seed=seed)[1]
        self._last_observations = observations.copy()
        self._restarted = self._cut_from = None  # every episode starts here, as the caller knows
        return observations

    def step(self, actions: np.ndarray, env_ids: Sequence[int] | None = None) -> StepResult:
        """Step every env (or those in env_ids) in one message; after a restored connection, every episode stepped
        is reported truncated."""
        if self._in_flight:
            raise RuntimeError(f"step with {len(self._in_flight)} step(s) in flight; use receive_step")
        self.send_step(actions, env_ids)
        return self.receive_step()

    def send_step(self, actions: np.ndarray, env_ids: Sequence[int] | None = None) -> None:
        """Send a step without waiting for its answer; receive_step returns the answers in the order sent."""
        self._require_open()
        if len(self._in_flight) >= MAX_STEPS_IN_FLIGHT:
            raise RuntimeError(f"at most {MAX_STEPS_IN_FLIGHT} steps may be in flight")
        ids = self._check_env_ids(env_ids)
        count = self._spec.num_envs if ids is None else len(ids)
        request = pb.StepRequest(actions=self._actions.encode(self._check_actions(actions, count)))
        if ids is not None:
            request.env_ids.extend(ids.tolist())
        sent = _Sent(request, ids)
        if self._use_stream:
            self._stream().send(pb.SessionRequest(step=request))
        else:
            sent.outcome = self._unary_step(request)
        self._in_flight.append(sent)

    def receive_step(self) -> StepResult:
        """The answer to the oldest step sent and not yet received (raises what it failed with)."""
        if not self._in_flight:
            raise RuntimeError("receive_step without a step in flight")
        head = self._in_flight[0]
        if head.result is not None:
            self._in_flight.popleft()
            return head.result
        try:
            response = self._await(head)
        except Lost as lost:
            return self._recover(lost)
        except BaseException:
            self._in_flight.clear()  # the stream is gone, and the answers of the later steps with it
            raise
        self._in_flight.popleft()
        try:
            return self._decode_step(response, head.env_ids)
        except BaseException:
            self._end_session()  # a simulation that answers malformed steps is not stepped on
            self._in_flight.clear()
            raise

    def action_masks(self) -> np.ndarray | None:
        """The masks of every env's last observation, (num_envs, n) bool; None when the answers carried none."""
        return self._action_masks

    def close(self) -> None:
        """End the stream and close the channel (idempotent)."""
        if not self._closed:
            self._closed = True
            self._in_flight.clear()
            self._close_channel()

    # ------------------------------------------------------------------------------------ steps

    def _check_env_ids(self, env_ids: Sequence[int] | None) -> np.ndarray | None:
        """env_ids as an int64 array; ValueError naming env_ids unless distinct, in range and supported."""
        if env_ids is None:
            return None
        spec = self._spec
        if not spec.supports_env_subsets:
            raise ValueError(f"env_ids: env {self.address} speaks protocol version {spec.protocol_version}; stepping "
                             "a subset of its envs needs version 2")
        ids = np.asarray(env_ids)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ValueError(f"env_ids: expected a non-empty list of env indices, got {ids.dtype.name} of shape "
                             f"{ids.shape}")
        if ids.min() < 0 or ids.max() >= spec.num_envs or len(np.unique(ids)) != ids.size:
            raise ValueError(f"env_ids: must be distinct indices in [0, {spec.num_envs}), got {ids[:16].tolist()}")
        return ids.astype(np.int64)

    def _check_actions(self, actions: np.ndarray, count: int) -> np.ndarray:
        array = np.asarray(actions)
        if array.size != count * self._actions.size:
            raise ValueError(f"{array.size} action values for {count} envs of {self._spec.action_space}")
        space = self._spec.action_space
        if isinstance(space, gym.spaces.Box):  # the protocol promises Box actions within low/high
            array = np.clip(array.reshape((count, *self._actions.shape)), space.low, space.high)
        return array

    def _await(self, sent: _Sent) -> pb.StepResponse:
        """The answer to `sent` (the oldest step in flight): from the stream, or the unary call's outcome."""
        if sent.outcome is None:
            try:
                response = self._receive_stream("Step")
            except StreamUnimplemented:
                self._use_stream = False
                self._log.info("the simulation does not implement Session; using unary Reset and Step")
                for waiting in self._in_flight:  # none of them reached the simulation: send them again, in order
                    waiting.outcome = self._unary_step(waiting.request)
            else:
                assert isinstance(response, pb.StepResponse)
                return response
        outcome = sent.outcome
        if isinstance(outcome, Exception):
            raise outcome
        assert isinstance(outcome, pb.StepResponse)
        return outcome

    def _unary_step(self, request: pb.StepRequest) -> pb.StepResponse | Exception:
        """One unary Step; its failure is returned, to be raised when its answer is received."""
        try:
            response = self._call("Step", request)
        except (Lost, EnvironmentUnavailable, EnvironmentProtocolError) as exc:
            return exc
        assert isinstance(response, pb.StepResponse)
        return response

    def _recover(self, lost: Lost) -> StepResult:
        """Reconnect and Reset; every step in flight is answered as cut short: truncated, no reward."""
        previous = self._last_observations
        entries = list(self._in_flight)
        self._in_flight.clear()
        self._end_session()
        observations = self._reconnect_with_retries(lost, reset=True)[1]
        n = self._spec.num_envs
        results = [self._cut(observations, previous, sent.env_ids) for sent in entries]
        restarted = np.ones(n, dtype=bool)
        for sent in entries:
            restarted[slice(None) if sent.env_ids is None else sent.env_ids] = False
        self._restarted = restarted if restarted.any() else None
        self._cut_from = None if previous is None else previous.copy()
        self._last_observations = observations.copy()
        for sent, result in zip(entries[1:], results[1:], strict=True):
            sent.result = result
            self._in_flight.append(sent)
        self._log.warning("steps in flight reported truncated after the reconnect", steps=len(entries), num_envs=n)
        return results[0]

    def _cut(self, observations: np.ndarray, previous: np.ndarray | None, ids: np.ndarray | None) -> StepResult:
        """A step's answer after a reconnect: each of its envs truncated, its final observation the last known."""
        rows = np.arange(self._spec.num_envs) if ids is None else ids
        count = len(rows)
        before = observations if previous is None else previous
        masks = None if self._action_masks is None else self._action_masks[rows]
        return StepResult(observations[rows], np.zeros(count, dtype=np.float32), np.zeros(count, dtype=bool),
                          np.ones(count, dtype=bool), {j: before[int(i)] for j, i in enumerate(rows)},
                          reconnected=True, action_masks=masks)

    def _decode_step(self, response: pb.StepResponse, ids: np.ndarray | None) -> StepResult:
        spec = self._spec
        count = spec.num_envs if ids is None else len(ids)
        try:
            observations = self._observations.decode(response.observations, count, "observations")
            rewards = decode_floats(response.rewards, count, "rewards")
            terminated = decode_bools(response.terminated, count, "terminated")
            truncated = decode_bools(response.truncated, count, "truncated")
            done = terminated | truncated
            ended = np.flatnonzero(done) if done.any() else ()
            finals = self._observations.decode(response.final_observations, len(ended), "final_observations")
            # For an env that ended: the mask of its next episode's first observation, as `observations` holds.
            masks = decode_action_masks(response.action_masks, spec.action_space, count)
        except MalformedData as exc:
            raise self._malformed("Step", exc) from None
        self._remember(observations, masks, ids)
        # Keys index this answer's arrays: env ids for a full step, positions in env_ids for a subset.
        final_observations = {int(i): finals[j] for j, i in enumerate(ended)} if len(ended) else {}
        if self._restarted is not None:
            self._report_restarts(ids, rewards, terminated, truncated, final_observations)
        return StepResult(observations, rewards, terminated, truncated, final_observations, action_masks=masks)

    def _report_restarts(self, ids: np.ndarray | None, rewards: np.ndarray, terminated: np.ndarray,
                         truncated: np.ndarray, final_observations: dict[int, np.ndarray]) -> None:
        """Mark this answer's envs that a reconnect reset since their last answer: truncated, no reward, the
        episode ending at the observation the trainer last had (the step ran on a new episode's first state)."""
        assert self._restarted is not None
        rows = np.arange(self._spec.num_envs) if ids is None else ids
        for position in np.flatnonzero(self._restarted[rows]):
            env = int(rows[position])
            rewards[position], terminated[position], truncated[position] = 0.0, False, True
            if self._cut_from is not None:
                final_observations[int(position)] = self._cut_from[env]
            self._restarted[env] = False
        if not self._restarted.any():
            self._restarted = self._cut_from = None

    def _remember(self, observations: np.ndarray, masks: np.ndarray | None, ids: np.ndarray | None) -> None:
        """Keep every env's last observation and mask, the rows of a subset step replaced."""
        if ids is None:
            self._last_observations = observations.copy()
            self._action_masks = masks
            return
        if self._last_observations is not None:
            self._last_observations[ids] = observations
        if masks is None and self._action_masks is None:
            return
        if self._action_masks is None:  # the first answer with masks: the other envs' actions are all legal
            assert masks is not None
            self._action_masks = np.ones((self._spec.num_envs, masks.shape[1]), dtype=bool)
        else:
            self._action_masks = self._action_masks.copy()  # a caller may hold the previous array
        self._action_masks[ids] = True if masks is None else masks

    def _malformed(self, call: str, exc: MalformedData) -> EnvironmentProtocolError:
        return EnvironmentProtocolError(
            f"env {self.address} answered {call} with a malformed field '{exc.field}': {exc}", field="env_id")

    # ------------------------------------------------------------------------------------ connection

    def _connect(self) -> EnvSpec:
        """A fresh channel and GetSpec; Lost when the simulation cannot be reached."""
        self._close_channel()
        self._channel = open_channel(self._target, self._options)
        self._stub = pb_grpc.EnvironmentServiceStub(self._channel)
        return get_spec(self._stub, self._target, self._options)

    def _reconnect_with_retries(self, lost: Lost, reset: bool, seed: int | None = None
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
                self._check_same(spec)
                observations = self._reset_once(seed) if reset else np.empty(0)
            except Lost as again:
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

    def _check_same(self, spec: EnvSpec) -> None:
        """A simulation that came back must host the same envs, and still step subsets if it did."""
        known = self._known_spec
        if known is None:
            return
        if not spec.compatible_with(known) or (known.supports_env_subsets and not spec.supports_env_subsets):
            raise EnvironmentProtocolError(
                f"env {self.address} came back with a different spec ({spec.describe()}, protocol version "
                f"{spec.protocol_version}) than the run started with ({known.describe()}, protocol version "
                f"{known.protocol_version})", field="env_id")

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

    def _require_open(self) -> None:
        if self._closed or self._stub is None:
            state = "closed" if self._closed else "not connected (the connection was lost)"
            raise EnvironmentUnavailable(f"env {self.address}: the adapter is {state}", field="env_id")

    def _call(self, name: str, request: pb.ResetRequest | pb.StepRequest) -> pb.ResetResponse | pb.StepResponse:
        """One Reset or Step on the stream (or unary), nothing else in flight; raises Lost, or
        EnvironmentUnavailable for the rest."""
        self._require_open()
        assert self._stub is not None
        if self._use_stream:
            message = pb.SessionRequest(reset=request) if isinstance(request, pb.ResetRequest) \
                else pb.SessionRequest(step=request)
            self._stream().send(message)
            try:
                return self._receive_stream(name)
            except StreamUnimplemented:
                self._use_stream = False
                self._log.info("the simulation does not implement Session; using unary Reset and Step")
        method = self._stub.Reset if name == "Reset" else self._stub.Step
        try:
            response: pb.ResetResponse | pb.StepResponse = method(request, timeout=self._options.step_timeout)
        except grpc.RpcError as exc:
            raise self._failure(name, exc, timed_out=False) from None
        return response

    def _stream(self) -> SessionStream:
        self._require_open()
        assert self._stub is not None
        if self._session is None:
            self._session = SessionStream(self._stub, self._options.step_timeout)
        return self._session

    def _receive_stream(self, name: str) -> pb.ResetResponse | pb.StepResponse:
        """The next answer on the stream, expected to answer `name`."""
        session = self._session
        assert session is not None
        try:
            response = session.receive()
        except grpc.RpcError as exc:
            self._end_session()
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and session.exchanges == 0:
                raise StreamUnimplemented() from None
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
        if code in RETRYABLE or code == grpc.StatusCode.CANCELLED:
            return Lost(name, f"{code.name}: {details}")
        return EnvironmentUnavailable(f"env {self.address}: {name} failed: {code.name}: {details}", field="env_id")

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
