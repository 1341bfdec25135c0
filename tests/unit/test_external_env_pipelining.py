"""GrpcExternalEnvAdapter with steps in flight and env subsets, against real servers on 127.0.0.1: answers in the
order sent, subsets (protocol version 2) in env_ids order, deadlines and reconnects with two steps in flight, and
v1 simulations (typed or raw payloads, no subsets) stepped as before."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import pytest

from rl_service.core.errors import EnvironmentProtocolError, EnvironmentUnavailable
from rl_service.envserver.faults import FaultyEnvironmentServicer
from rl_service.envserver.reference_server import EnvServerHandle, serve_gym, start_env_server
from rl_service.infra.external_env.address import parse_address
from rl_service.infra.external_env.codec import BatchCodec, encode_action_masks, spec_to_proto
from rl_service.infra.external_env.env_batch import EnvBatch
from rl_service.infra.external_env.grpc_adapter import ConnectionOptions, GrpcExternalEnvAdapter
from rl_service_proto.v1 import environment_pb2 as pb
from rl_service_proto.v1 import environment_pb2_grpc as pb_grpc
from tests.integration.test_env_groups_service import VersionOneServicer

FAST = ConnectionOptions(step_timeout=0.5, connect_timeout=1.0, retries=3, backoff=0.05)
N = 4


class SubsetServicer(pb_grpc.EnvironmentServiceServicer):  # type: ignore[misc]
    """A protocol-version-2 simulation: N CartPole envs, each its own EnvBatch, stepped by env_ids.

    `wrong_count` answers one observation too many (a simulation that ignored env_ids)."""

    def __init__(self, env_id: str = "CartPole-v1", wrong_count: bool = False) -> None:
        self.envs = [EnvBatch.from_gym_id(env_id, 1) for _ in range(N)]
        spec = dataclasses.replace(self.envs[0].spec, num_envs=N, protocol_version=2)
        self.spec = spec_to_proto(spec)
        self.observations = BatchCodec(spec.observation_space)
        self.actions = BatchCodec(spec.action_space)
        self.wrong_count = wrong_count
        self.stepped: list[list[int]] = []  # env ids of each step, in the order served
        self.lock = threading.Lock()

    def GetSpec(self, request: pb.GetSpecRequest, context: grpc.ServicerContext) -> pb.EnvironmentSpec:
        return self.spec

    def Reset(self, request: pb.ResetRequest, context: grpc.ServicerContext) -> pb.ResetResponse:
        seed = request.seed if request.HasField("seed") else None
        with self.lock:
            observations = np.concatenate([env.reset(None if seed is None else seed + i)
                                           for i, env in enumerate(self.envs)])
        return pb.ResetResponse(observations=self.observations.encode(observations))

    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepResponse:
        ids = list(request.env_ids) or list(range(N))
        if len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= N:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"env_ids: must be distinct in [0, {N}), got {ids}")
        actions = self.actions.decode(request.actions, len(ids), "actions", typed_only=True)
        with self.lock:
            steps = [self.envs[i].step(actions[j:j + 1]) for j, i in enumerate(ids)]
            self.stepped.append(ids)
        observations = np.concatenate([s.observations for s in steps])
        if self.wrong_count:
            observations = np.concatenate([observations, observations[:1]])
        finals = [s.final_observations for s in steps if len(s.final_observations)]
        return pb.StepResponse(
            observations=self.observations.encode(observations),
            rewards=[float(s.rewards[0]) for s in steps], terminated=[bool(s.terminated[0]) for s in steps],
            truncated=[bool(s.truncated[0]) for s in steps],
            final_observations=self.observations.encode(np.concatenate(finals)) if finals else None,
            action_masks=encode_action_masks(None))

    def Session(self, requests: Iterator[pb.SessionRequest], context: grpc.ServicerContext
                ) -> Iterator[pb.SessionResponse]:
        for request in requests:
            if request.WhichOneof("request") == "reset":
                yield pb.SessionResponse(reset=self.Reset(request.reset, context))
            else:
                yield pb.SessionResponse(step=self.Step(request.step, context))


@pytest.fixture
def servers() -> Iterator[Callable[..., EnvServerHandle]]:
    """Start env servers; all are stopped at the end of the test."""
    started: list[EnvServerHandle] = []

    def start(servicer: pb_grpc.EnvironmentServiceServicer, port: int = 0) -> EnvServerHandle:
        handle = start_env_server(servicer, port=port)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


def adapter_for(handle: EnvServerHandle, options: ConnectionOptions = FAST) -> GrpcExternalEnvAdapter:
    return GrpcExternalEnvAdapter(parse_address(handle.address), options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_envs() -> list[EnvBatch]:
    return [EnvBatch.from_gym_id("CartPole-v1", 1) for _ in range(N)]


# ------------------------------------------------------------------------------------ subsets


@pytest.mark.parametrize("use_stream", [True, False], ids=["stream", "unary"])
def test_subset_steps_answer_the_envs_asked_in_their_order(servers: Callable[..., EnvServerHandle],
                                                           use_stream: bool) -> None:
    servicer = SubsetServicer()
    adapter = adapter_for(servers(servicer), dataclasses.replace(FAST, use_stream=use_stream))
    local = local_envs()
    assert adapter.supports_env_subsets and adapter.spec.protocol_version == 2
    first = adapter.reset(seed=5)
    np.testing.assert_array_equal(first, np.concatenate([env.reset(5 + i) for i, env in enumerate(local)]))
    rng = np.random.default_rng(0)
    ended = 0
    for step in range(150):
        ids = [3, 0] if step % 2 else [1, 2, 0]
        actions = rng.integers(0, 2, len(ids))
        got = adapter.step(actions, env_ids=ids)
        want = [local[i].step(actions[j:j + 1]) for j, i in enumerate(ids)]
        assert got.observations.shape == (len(ids), 4) and got.rewards.shape == (len(ids),)
        np.testing.assert_array_equal(got.observations, np.concatenate([w.observations for w in want]))
        np.testing.assert_array_equal(got.terminated, [w.terminated[0] for w in want])
        np.testing.assert_array_equal(got.truncated, [w.truncated[0] for w in want])
        # final observations are keyed by position in this answer (env_ids order), not by env id
        assert sorted(got.final_observations) == [j for j, w in enumerate(want) if len(w.final_observations)]
        for j, final in got.final_observations.items():
            np.testing.assert_array_equal(final, want[j].final_observations[0])
        ended += len(got.final_observations)
    assert ended > 0
    assert servicer.stepped[:2] == [[1, 2, 0], [3, 0]]
    full = adapter.step(np.zeros(N, dtype=np.int64))  # no env_ids: every env, in env order
    assert full.observations.shape == (N, 4) and servicer.stepped[-1] == list(range(N))
    adapter.close()


@pytest.mark.parametrize(("env_ids", "match"), [
    ([0, 0], "env_ids: must be distinct indices in \\[0, 4\\), got \\[0, 0\\]"),
    ([4], "env_ids: must be distinct indices in \\[0, 4\\), got \\[4\\]"),
    ([-1, 2], "env_ids: must be distinct"),
    ([], "env_ids: expected a non-empty list"),
    ([0.5], "env_ids: expected a non-empty list of env indices, got float64"),
])
def test_bad_env_ids_are_refused_before_sending(servers: Callable[..., EnvServerHandle], env_ids: list[float],
                                                match: str) -> None:
    servicer = SubsetServicer()
    adapter = adapter_for(servers(servicer))
    adapter.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        adapter.step(np.zeros(max(len(env_ids), 1), dtype=np.int64), env_ids=env_ids)  # type: ignore[arg-type]
    assert adapter.steps_in_flight == 0 and servicer.stepped == []
    with pytest.raises(ValueError, match="3 action values for 2 envs"):
        adapter.step(np.zeros(3, dtype=np.int64), env_ids=[0, 1])
    assert adapter.step(np.zeros(2, dtype=np.int64), env_ids=[0, 1]).observations.shape == (2, 4)
    adapter.close()


def test_a_version_1_simulation_steps_no_subsets(servers: Callable[..., EnvServerHandle]) -> None:
    handle = start_env_server(VersionOneServicer(EnvBatch.from_gym_id("CartPole-v1", N)))
    try:
        adapter = adapter_for(handle)
        assert not adapter.supports_env_subsets and adapter.spec.protocol_version == 1
        adapter.reset(seed=0)
        with pytest.raises(ValueError, match=r"env_ids: env grpc://127.0.0.1:.* speaks protocol version 1; stepping "
                                             r"a subset of its envs needs version 2"):
            adapter.step(np.zeros(2, dtype=np.int64), env_ids=[0, 1])
        assert adapter.step(np.zeros(N, dtype=np.int64)).observations.shape == (N, 4)
        adapter.close()
    finally:
        handle.stop()


def test_a_subset_answer_of_the_wrong_size_names_the_field(servers: Callable[..., EnvServerHandle]) -> None:
    adapter = adapter_for(servers(SubsetServicer(wrong_count=True)))
    adapter.reset(seed=0)
    with pytest.raises(EnvironmentProtocolError, match="answered Step with a malformed field 'observations': "
                                                       "observations: 12 values; expected 8 "):
        adapter.step(np.zeros(2, dtype=np.int64), env_ids=[2, 3])
    assert adapter.steps_in_flight == 0
    adapter.close()


# ------------------------------------------------------------------------------------ steps in flight


@pytest.mark.parametrize(("use_stream", "raw"), [(True, False), (True, True), (False, False)],
                         ids=["stream-typed", "stream-raw", "unary-typed"])
def test_two_full_steps_in_flight_answer_in_order(use_stream: bool, raw: bool) -> None:
    """A version-1 simulation (typed or raw observations) pipelined: the same transitions as one at a time."""
    handle = serve_gym("CartPole-v1", N, raw_observations=raw)
    adapter = adapter_for(handle, dataclasses.replace(FAST, use_stream=use_stream))
    local = EnvBatch.from_gym_id("CartPole-v1", N)
    try:
        np.testing.assert_array_equal(adapter.reset(seed=1), local.reset(seed=1))
        rng = np.random.default_rng(1)
        for _ in range(60):
            first, second = rng.integers(0, 2, N), rng.integers(0, 2, N)
            adapter.send_step(first)
            adapter.send_step(second)
            assert adapter.steps_in_flight == 2
            with pytest.raises(RuntimeError, match="at most 2 steps may be in flight"):
                adapter.send_step(first)
            with pytest.raises(RuntimeError, match="step with 2 step\\(s\\) in flight"):
                adapter.step(first)
            with pytest.raises(RuntimeError, match="reset with 2 step\\(s\\) in flight"):
                adapter.reset()
            for actions in (first, second):
                got, want = adapter.receive_step(), local.step(actions)
                np.testing.assert_array_equal(got.observations, want.observations)
                np.testing.assert_array_equal(got.rewards, want.rewards)
                np.testing.assert_array_equal(got.terminated | got.truncated, want.terminated | want.truncated)
        with pytest.raises(RuntimeError, match="receive_step without a step in flight"):
            adapter.receive_step()
        assert handle.servicer.steps_served == 120
    finally:
        adapter.close()
        handle.stop()
        local.close()


def test_two_groups_in_flight_on_the_stream(servers: Callable[..., EnvServerHandle]) -> None:
    servicer = SubsetServicer()
    adapter = adapter_for(servers(servicer))
    local = local_envs()
    adapter.reset(seed=2)
    for i, env in enumerate(local):
        env.reset(2 + i)
    groups = ([0, 1], [2, 3])
    for _ in range(40):
        actions = [np.ones(2, dtype=np.int64), np.zeros(2, dtype=np.int64)]
        for group, group_actions in zip(groups, actions, strict=True):
            adapter.send_step(group_actions, env_ids=group)
        for group, group_actions in zip(groups, actions, strict=True):
            got = adapter.receive_step()
            want = np.concatenate([local[i].step(group_actions[j:j + 1]).observations for j, i in enumerate(group)])
            np.testing.assert_array_equal(got.observations, want)
    assert servicer.stepped[:4] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    adapter.close()


@pytest.mark.parametrize("slow_step", [1, 2], ids=["first-hangs", "second-hangs"])
def test_a_hung_simulation_times_out_with_two_steps_in_flight(servers: Callable[..., EnvServerHandle],
                                                              slow_step: int) -> None:
    servicer = FaultyEnvironmentServicer(EnvBatch.from_gym_id("CartPole-v1", N), "slow", at_step=2 + slow_step,
                                         delay=10)
    adapter = adapter_for(servers(servicer), dataclasses.replace(FAST, step_timeout=0.5))
    try:
        adapter.reset()
        adapter.step(np.zeros(N, dtype=np.int64))
        adapter.step(np.zeros(N, dtype=np.int64))
        started = time.monotonic()
        adapter.send_step(np.zeros(N, dtype=np.int64))
        adapter.send_step(np.zeros(N, dtype=np.int64))
        with pytest.raises(EnvironmentUnavailable) as info:
            for _ in range(2):
                adapter.receive_step()
        assert 0.45 < time.monotonic() - started < 2.0
        assert "Step did not answer within 0.5s (ENV_STEP_TIMEOUT_SECONDS)" in info.value.message
        assert adapter.address in info.value.message
        assert adapter.steps_in_flight == 0, "the steps behind a hung one are gone with the stream"
    finally:
        servicer.release.set()
        adapter.close()


@contextmanager
def simulation_restarting(servers: Callable[..., EnvServerHandle], use_stream: bool
                          ) -> Iterator[tuple[GrpcExternalEnvAdapter, np.ndarray]]:
    """An adapter stepped once (its observations given), whose simulation is stopped and restarted on the same
    port 0.15 s later, while the body runs: the body's first call finds the connection lost."""
    port = free_port()
    first = servers(SubsetServicer(), port=port)
    options = ConnectionOptions(step_timeout=2, connect_timeout=1, retries=5, backoff=0.1, use_stream=use_stream)
    adapter = adapter_for(first, options)
    adapter.reset(seed=3)
    before = adapter.step(np.zeros(N, dtype=np.int64)).observations
    first.stop()
    timer = threading.Timer(0.15, lambda: servers(SubsetServicer(), port=port))
    timer.start()
    try:
        yield adapter, before
    finally:
        timer.join()


@pytest.mark.parametrize("use_stream", [True, False], ids=["stream", "unary"])
def test_a_reconnect_cuts_every_step_in_flight(servers: Callable[..., EnvServerHandle], use_stream: bool) -> None:
    with simulation_restarting(servers, use_stream) as (adapter, before):
        adapter.send_step(np.zeros(2, dtype=np.int64), env_ids=[3, 1])
        adapter.send_step(np.zeros(2, dtype=np.int64), env_ids=[0, 2])
        results = [adapter.receive_step(), adapter.receive_step()]
    assert adapter.reconnects == 1 and adapter.steps_in_flight == 0
    for result, ids in zip(results, ([3, 1], [0, 2]), strict=True):
        assert result.reconnected and result.truncated.all() and not result.terminated.any()
        assert not result.rewards.any() and result.observations.shape == (2, 4)
        assert sorted(result.final_observations) == [0, 1]
        np.testing.assert_array_equal(np.stack([result.final_observations[j] for j in range(2)]), before[ids])
    after = adapter.step(np.zeros(2, dtype=np.int64), env_ids=[1, 0])
    assert not after.reconnected
    adapter.close()


@pytest.mark.parametrize("use_stream", [True, False])
def test_a_reconnect_also_cuts_the_envs_of_the_group_not_in_flight(servers: Callable[..., EnvServerHandle],
                                                                   use_stream: bool) -> None:
    # Two groups: envs 0 and 1 in flight when the connection is lost, 2 and 3 waiting for their actions. The
    # reconnect's Reset restarts all four, so the waiting group's next answer must end its episodes too, or the
    # trainer would pair its last observation with a new episode's step.
    with simulation_restarting(servers, use_stream) as (adapter, before):
        adapter.send_step(np.zeros(2, dtype=np.int64), env_ids=[0, 1])
        in_flight = adapter.receive_step()
    assert in_flight.reconnected and in_flight.truncated.all()
    waiting = adapter.step(np.ones(2, dtype=np.int64), env_ids=[3, 2])
    assert waiting.truncated.all() and not waiting.terminated.any() and not waiting.rewards.any()
    np.testing.assert_array_equal(np.stack([waiting.final_observations[j] for j in range(2)]), before[[3, 2]])
    later = adapter.step(np.zeros(N, dtype=np.int64))  # each env's cut was reported once
    assert not later.reconnected and not later.truncated.any()
    adapter.close()


def test_a_lost_simulation_with_steps_in_flight_fails_after_the_retries(
        servers: Callable[..., EnvServerHandle]) -> None:
    handle = servers(SubsetServicer())
    adapter = adapter_for(handle, dataclasses.replace(FAST, retries=2))
    adapter.reset()
    handle.stop()
    adapter.send_step(np.zeros(2, dtype=np.int64), env_ids=[0, 1])
    adapter.send_step(np.zeros(2, dtype=np.int64), env_ids=[2, 3])
    with pytest.raises(EnvironmentUnavailable, match="2 reconnect attempts failed \\(ENV_CONNECT_RETRIES=2\\)"):
        adapter.receive_step()
    assert adapter.steps_in_flight == 0
    with pytest.raises(EnvironmentUnavailable, match="not connected"):
        adapter.send_step(np.zeros(2, dtype=np.int64), env_ids=[0, 1])
