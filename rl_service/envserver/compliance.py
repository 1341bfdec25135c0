"""A reusable compliance test class for EnvironmentService servers (in the spirit of dm_env_rpc's compliance tests).

Point it at any simulation, whatever its language, and it checks the contract of docs/environment-protocol.md:

    # in a pytest module
    from rl_service.envserver.compliance import EnvironmentServiceCompliance

    class TestMySimulation(EnvironmentServiceCompliance):
        __test__ = True
        address = "grpc://127.0.0.1:50061"

or from a shell: `python -m rl_service.envserver.compliance grpc://127.0.0.1:50061` (exit code 0 when every check
passes). A unix domain socket is named as gRPC names it: `unix:///absolute/path.sock` or `unix:relative.sock`.
Each check starts with its own Reset, so the checks are independent of one another and of their order.
Without pytest installed the class still runs through `run_checks`. Action masks are optional: every answer's
are checked when sent, and a simulation that sends none passes (the mask checks are skipped). So are env subsets
(protocol version 2, compliance_subsets.py): a version 1 simulation passes with those checks skipped.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
import gymnasium as gym
import numpy as np

from rl_service.envserver.compliance_masks import ActionMaskChecks, ComplianceSkip
from rl_service.envserver.compliance_subsets import EnvSubsetChecks
from rl_service.infra.external_env.codec import (
    EnvSpec,
    MalformedData,
    decode_batch,
    decode_bools,
    decode_floats,
    encode_batch,
    spec_from_proto,
)
from rl_service_proto.v1 import environment_pb2 as pb
from rl_service_proto.v1 import environment_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Transition:
    """One decoded StepResponse."""

    observations: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    final_observations: np.ndarray
    action_masks: np.ndarray | None = None  # (num_envs, n) bool for `observations`; None: none sent


class EnvironmentServiceCompliance(ActionMaskChecks, EnvSubsetChecks):
    """The protocol's checks; a subclass sets `address` (and `__test__ = True` for pytest to collect it)."""

    __test__ = False
    address: str = ""
    timeout: float = 10.0  # deadline of every call
    max_steps_to_episode_end: int = 5000  # Step calls to wait for some env to end (auto-reset check)
    seeded_reset_is_deterministic: bool = True  # the doc's SHOULD; set False to skip that check
    steps_per_check: int = 32
    standalone: bool = False  # run by run_checks: skips raise ComplianceSkip rather than pytest's

    # ------------------------------------------------------------------------------------ plumbing

    def fresh_address(self) -> str | None:
        """The address of a simulation that has not been reset yet, for the start-up checks (None: skipped)."""
        return None

    def setup_method(self, method: Any = None) -> None:
        """Connect (pytest calls this before each check)."""
        self.channel = grpc.insecure_channel(_target(self.address))
        self.stub = pb_grpc.EnvironmentServiceStub(self.channel)
        self.spec = self.get_spec()
        self.rng = np.random.default_rng(12345)
        self.forget_masks()

    def teardown_method(self, method: Any = None) -> None:
        """Disconnect."""
        self.channel.close()

    def get_spec(self, stub: pb_grpc.EnvironmentServiceStub | None = None) -> EnvSpec:
        """GetSpec, decoded and checked."""
        message = (stub or self.stub).GetSpec(pb.GetSpecRequest(), timeout=self.timeout)
        try:
            return spec_from_proto(message)
        except MalformedData as exc:
            raise AssertionError(f"GetSpec answered a malformed spec: {exc}") from None

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Unary Reset, decoded and checked."""
        request = pb.ResetRequest() if seed is None else pb.ResetRequest(seed=seed)
        return self.decode_reset(self.stub.Reset(request, timeout=self.timeout))

    def step(self, actions: np.ndarray) -> Transition:
        """Unary Step, decoded and checked."""
        return self.decode_step(self.stub.Step(self.step_request(actions), timeout=self.timeout))

    def step_request(self, actions: np.ndarray) -> pb.StepRequest:
        """Actions encoded as the training service sends them."""
        return pb.StepRequest(actions=encode_batch(actions, self.spec.action_space))

    def random_actions(self) -> np.ndarray:
        """One valid action per env: a legal one where the last answer sent masks."""
        space = self.spec.action_space
        space.seed(int(self.rng.integers(2**31)))
        if self.last_masks is not None:
            return self.legal_actions(self.last_masks)
        return np.stack([np.asarray(space.sample()) for _ in range(self.spec.num_envs)])

    def decode_reset(self, response: pb.ResetResponse) -> np.ndarray:
        """ResetResponse -> observations (masks in last_masks); AssertionError names the field at fault."""
        observations: np.ndarray = self._decoded(lambda: decode_batch(
            response.observations, self.spec.observation_space, self.spec.num_envs, "observations"))
        self.keep_masks("Reset", response.action_masks)
        return observations

    def decode_step(self, response: pb.StepResponse) -> Transition:
        """StepResponse -> Transition; AssertionError names the field at fault."""
        n = self.spec.num_envs

        def decode() -> Transition:
            terminated = decode_bools(response.terminated, n, "terminated")
            truncated = decode_bools(response.truncated, n, "truncated")
            ended = int(np.count_nonzero(terminated | truncated))
            return Transition(
                decode_batch(response.observations, self.spec.observation_space, n, "observations"),
                decode_floats(response.rewards, n, "rewards"), terminated, truncated,
                decode_batch(response.final_observations, self.spec.observation_space, ended, "final_observations"))

        transition: Transition = self._decoded(decode)
        return replace(transition, action_masks=self.keep_masks("Step", response.action_masks))

    @staticmethod
    def _decoded(decode: Callable[[], Any]) -> Any:
        try:
            return decode()
        except MalformedData as exc:
            raise AssertionError(f"malformed answer: {exc}") from None

    def expect_code(self, code: grpc.StatusCode, call: Callable[[], Any], what: str) -> grpc.RpcError:
        """Run `call` and check it fails with `code`."""
        try:
            call()
        except grpc.RpcError as exc:
            assert exc.code() == code, f"{what}: expected {code.name}, got {exc.code().name}: {exc.details()}"
            return exc
        raise AssertionError(f"{what}: expected {code.name}, but the call succeeded")

    def session(self, requests: Sequence[pb.SessionRequest]) -> list[pb.SessionResponse]:
        """Send the requests on one Session stream; the responses (skips when Session is unimplemented)."""
        try:
            return list(self.stub.Session(iter(requests), timeout=self.timeout * max(len(requests), 1)))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.skip("the simulation does not implement the optional Session stream")
            raise

    # ------------------------------------------------------------------------------------ spec

    def test_spec_is_well_formed(self) -> None:
        spec = self.spec
        assert spec.num_envs >= 1, "num_envs must be at least 1"
        assert spec.name, "name should say what the simulation is"
        assert isinstance(spec.observation_space, gym.spaces.Box | gym.spaces.Discrete | gym.spaces.MultiDiscrete
                          | gym.spaces.MultiBinary)

    def test_spec_is_stable(self) -> None:
        again = self.get_spec()
        assert again == self.spec, "GetSpec must answer the same spec every time"

    # ------------------------------------------------------------------------------------ reset

    def test_reset_returns_one_observation_per_env(self) -> None:
        observations = self.reset()
        assert observations.shape == (self.spec.num_envs, *(self.spec.observation_space.shape or ()))
        for i, obs in enumerate(observations):
            self._check_in_space(obs, f"observations[{i}]")

    def test_reset_with_a_seed_is_reproducible(self) -> None:
        if not self.seeded_reset_is_deterministic:
            self.skip("seeded_reset_is_deterministic is False")
        first = self.reset(seed=42)
        first_masks = self.last_masks
        self.step(self.random_actions())
        second = self.reset(seed=42)
        np.testing.assert_array_equal(first, second, err_msg="Reset with the same seed must give the same "
                                                             "first observations")
        np.testing.assert_array_equal(first_masks, self.last_masks,
                                      err_msg="Reset with the same seed must give the same action masks")

    def test_reset_refuses_a_negative_seed(self) -> None:
        self.expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: self.reset(seed=-1), "Reset(seed=-1)")

    def test_reset_is_accepted_at_any_time(self) -> None:
        self.reset()
        for _ in range(3):
            self.step(self.random_actions())
        self.reset()
        self.reset()
        self.step(self.random_actions())

    # ------------------------------------------------------------------------------------ step

    def test_step_answers_every_env(self) -> None:
        self.reset(seed=1)
        n = self.spec.num_envs
        for _ in range(self.steps_per_check):
            result = self.step(self.random_actions())
            assert result.observations.shape[0] == n
            assert result.rewards.shape == (n,) and result.terminated.shape == (n,)
            ended = int(np.count_nonzero(result.terminated | result.truncated))
            assert len(result.final_observations) == ended, "one final observation per env that ended"
            for i, obs in enumerate(result.observations):
                self._check_in_space(obs, f"observations[{i}]")

    def test_episodes_end_and_auto_reset(self) -> None:
        self.reset(seed=2)
        for _ in range(self.max_steps_to_episode_end):
            result = self.step(self.random_actions())
            ended = np.flatnonzero(result.terminated | result.truncated)
            if len(ended):
                assert len(result.final_observations) == len(ended)
                for j, i in enumerate(ended):
                    self._check_in_space(result.final_observations[j], f"final_observations[{j}] (env {i})")
                    self._check_in_space(result.observations[i], f"observations[{i}] after auto-reset")
                # The next step goes on from the auto-reset observations without a Reset.
                self.step(self.random_actions())
                return
        self.skip(f"no episode ended within {self.max_steps_to_episode_end} steps of random actions")

    def test_step_refuses_a_wrong_number_of_actions_and_keeps_its_state(self) -> None:
        self.reset(seed=3)
        actions = self.random_actions()
        flat = actions.reshape(-1)
        short = pb.StepRequest(actions=encode_batch(flat[:-1], _flat_space(self.spec.action_space, flat.size - 1)))
        self.expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: self.stub.Step(short, timeout=self.timeout),
                         "Step with one value too few")
        empty = pb.StepRequest()
        self.expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: self.stub.Step(empty, timeout=self.timeout),
                         "Step with no actions")
        self.step(actions)  # a refused request changed nothing: stepping goes on

    def test_step_refuses_out_of_range_actions(self) -> None:
        space = self.spec.action_space
        self.reset(seed=4)
        bad = self.random_actions().copy()
        first = bad.reshape(len(bad), -1)[0]
        if isinstance(space, gym.spaces.Discrete):
            bad[0] = space.n
        elif isinstance(space, gym.spaces.MultiDiscrete):
            first[0] = space.nvec[0]
        elif isinstance(space, gym.spaces.MultiBinary):
            first[0] = 2
        elif bad.dtype.kind == "f":
            first[0] = np.nan
        else:
            self.skip("an integer Box action space has no invalid value to send")
        request = self.step_request(bad)
        self.expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: self.stub.Step(request, timeout=self.timeout),
                         f"Step with an action outside {space} (or NaN)")
        self.step(self.random_actions())

    def test_step_refuses_an_unexpected_payload(self) -> None:
        space = self.spec.action_space
        self.reset(seed=6)
        actions = self.random_actions()
        typed = self.step_request(actions).actions.WhichOneof("payload")
        other = "float64" if typed != "float64" else "int64"
        values = actions.reshape(-1).astype(np.float64 if other == "float64" else np.int64).tolist()
        wrong = pb.StepRequest(actions=pb.Tensor(**{other: {"values": values}}))
        self.expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: self.stub.Step(wrong, timeout=self.timeout),
                         f"Step with {other} actions for {space} (the client sends {typed})")
        raw = pb.StepRequest(actions=pb.Tensor(raw=actions.astype(actions.dtype.newbyteorder("<")).tobytes()))
        self.expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: self.stub.Step(raw, timeout=self.timeout),
                         "Step with raw actions (the client never sends raw)")
        self.step(self.random_actions())

    def test_step_before_the_first_reset_is_refused(self) -> None:
        address = self.fresh_address()
        if address is None:
            self.skip("no fresh simulation to check (override fresh_address)")
            return
        with grpc.insecure_channel(_target(address)) as channel:
            stub = pb_grpc.EnvironmentServiceStub(channel)
            self.get_spec(stub)
            request = self.step_request(self.random_actions())
            self.expect_code(grpc.StatusCode.FAILED_PRECONDITION, lambda: stub.Step(request, timeout=self.timeout),
                             "Step before any Reset")

    # ------------------------------------------------------------------------------------ Session stream

    def test_session_answers_in_order(self) -> None:
        requests = [pb.SessionRequest(reset=pb.ResetRequest(seed=5))]
        requests += [pb.SessionRequest(step=self.step_request(self.random_actions())) for _ in range(8)]
        requests.append(pb.SessionRequest(reset=pb.ResetRequest()))
        responses = self.session(requests)
        assert [r.WhichOneof("response") for r in responses] == [q.WhichOneof("request") for q in requests], \
            "one response per request, of the same kind, in order"
        self.decode_reset(responses[0].reset)
        for response in responses[1:-1]:
            self.decode_step(response.step)

    def test_session_matches_unary_calls(self) -> None:
        if not self.seeded_reset_is_deterministic:
            self.skip("seeded_reset_is_deterministic is False")
        unary = self.reset(seed=6)
        unary_masks = self.last_masks
        streamed = self.session([pb.SessionRequest(reset=pb.ResetRequest(seed=6))])
        np.testing.assert_array_equal(self.decode_reset(streamed[0].reset), unary,
                                      err_msg="Session and unary Reset act on the same envs")
        np.testing.assert_array_equal(self.last_masks, unary_masks,
                                      err_msg="Session and unary Reset answer the same action masks")

    def test_session_ends_with_the_status_of_a_bad_request(self) -> None:
        requests = [pb.SessionRequest(reset=pb.ResetRequest(seed=7)), pb.SessionRequest(step=pb.StepRequest())]
        stream = self.stub.Session(iter(requests), timeout=self.timeout * 2)
        try:
            first = next(stream)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.skip("the simulation does not implement the optional Session stream")
            raise
        assert first.WhichOneof("response") == "reset"
        self.expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: next(stream), "Session step with no actions")

    # ------------------------------------------------------------------------------------ helpers

    def _check_in_space(self, value: np.ndarray, what: str) -> None:
        space = self.spec.observation_space
        if isinstance(space, gym.spaces.Box):
            return  # decoding checked dtype, shape and finiteness; bounds are a SHOULD
        assert space.contains(np.asarray(value, dtype=space.dtype).reshape(space.shape or ())), \
            f"{what}: {value} is not in {space}"


def _flat_space(space: gym.Space[Any], size: int) -> gym.Space[Any]:
    """A space whose encoding matches `space` but takes `size` values (to build a short request)."""
    if isinstance(space, gym.spaces.Box):
        return gym.spaces.Box(-np.inf, np.inf, shape=(size,), dtype=space.dtype)
    return gym.spaces.MultiDiscrete(np.full(max(size, 1), 2))


def _target(address: str) -> str:
    """The gRPC target: host:port from grpc://host:port; a unix: address is already one (gRPC's naming)."""
    if address.lower().startswith("unix:"):
        return "unix:" + address[len("unix:"):]
    return address.split("://", 1)[1] if "://" in address else address


def _checks() -> list[str]:
    return [name for name in dir(EnvironmentServiceCompliance) if name.startswith("test_")]


def run_checks(address: str, timeout: float = 10.0) -> Iterator[tuple[str, str, str]]:
    """Run every check against `address`; yields (check, "passed" | "failed" | "skipped", detail)."""
    for name in _checks():
        suite = EnvironmentServiceCompliance()
        suite.address, suite.timeout, suite.standalone = address, timeout, True
        started = time.monotonic()
        try:
            suite.setup_method()
            try:
                getattr(suite, name)()
            finally:
                suite.teardown_method()
        except ComplianceSkip as exc:
            yield name, "skipped", str(exc)
        except (AssertionError, grpc.RpcError) as exc:
            detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
            yield name, "failed", detail
        else:
            yield name, "passed", f"{time.monotonic() - started:.2f}s"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rl_service.envserver.compliance ADDRESS`: 0 when every check passes (skips allowed)."""
    parser = argparse.ArgumentParser(prog="python -m rl_service.envserver.compliance",
                                     description="Check an EnvironmentService server against the protocol.")
    parser.add_argument("address", help="grpc://host:port (or host:port), or unix:PATH (unix:///absolute/path)")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline of every call, seconds")
    args = parser.parse_args(argv)
    failures = 0
    for name, outcome, detail in run_checks(args.address, args.timeout):
        failures += outcome == "failed"
        print(f"{outcome.upper():8} {name}  {detail}", flush=True)
    print("compliant" if not failures else f"{failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
