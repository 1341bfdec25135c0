"""The compliance suite's env-subset checks (protocol version 2; a mixin of EnvironmentServiceCompliance).

A simulation whose spec says protocol_version 2 steps the envs StepRequest.env_ids names, answers them alone in that
order, leaves the others as they are, and refuses bad env_ids with INVALID_ARGUMENT without changing anything. These
checks skip for a version 1 simulation, and those needing reproducible resets skip where they are not.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from rl_service.infra.external_env.codec import (
    ENV_SUBSETS_VERSION,
    EnvSpec,
    MalformedData,
    decode_batch,
    decode_bools,
    decode_floats,
)
from rl_service_proto.v1 import environment_pb2 as pb

_SEED = 4242


class EnvSubsetChecks:
    """Subset steps checked against full steps from the same seeded Reset; the suite's plumbing does the rest."""

    spec: EnvSpec
    stub: Any
    timeout: float
    seeded_reset_is_deterministic: bool

    def reset(self, seed: int | None = None) -> np.ndarray:
        raise NotImplementedError  # the suite's

    def step(self, actions: np.ndarray) -> Any:
        raise NotImplementedError  # the suite's

    def step_request(self, actions: np.ndarray) -> pb.StepRequest:
        raise NotImplementedError  # the suite's

    def random_actions(self) -> np.ndarray:
        raise NotImplementedError  # the suite's

    def skip(self, reason: str) -> None:
        raise NotImplementedError  # the suite's

    def expect_code(self, code: grpc.StatusCode, call: Any, what: str) -> grpc.RpcError:
        raise NotImplementedError  # the suite's

    # ------------------------------------------------------------------------------------ plumbing

    def require_subsets(self, envs: int = 1, reproducible: bool = False) -> None:
        """Skip unless the spec says protocol version 2 (and, when asked, it has `envs` envs and seeded resets
        that repeat)."""
        version = self.stub.GetSpec(pb.GetSpecRequest(), timeout=self.timeout).protocol_version
        if version < ENV_SUBSETS_VERSION:
            self.skip(f"protocol_version {version or 1}: the simulation steps every env at once")
        if self.spec.num_envs < envs:
            self.skip(f"needs {envs} envs, the simulation has {self.spec.num_envs}")
        if reproducible and not self.seeded_reset_is_deterministic:
            self.skip("seeded resets are not reproducible here (seeded_reset_is_deterministic = False)")

    def step_subset(self, actions: np.ndarray, env_ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A subset Step, its answer decoded with one row per asked env: (observations, rewards, ended)."""
        request = self.step_request(actions)
        request.env_ids.extend(env_ids)
        response = self.stub.Step(request, timeout=self.timeout)
        k = len(env_ids)
        try:
            observations = decode_batch(response.observations, self.spec.observation_space, k, "observations")
            rewards = decode_floats(response.rewards, k, "rewards")
            ended = decode_bools(response.terminated, k, "terminated") | decode_bools(response.truncated, k,
                                                                                        "truncated")
            decode_batch(response.final_observations, self.spec.observation_space, int(ended.sum()),
                         "final_observations")
        except MalformedData as exc:
            raise AssertionError(f"a Step of env_ids {env_ids}: malformed answer: {exc}") from None
        return observations, rewards, ended

    # ------------------------------------------------------------------------------------ checks

    def test_subset_steps_answer_the_asked_envs_in_their_order(self) -> None:
        self.require_subsets(envs=2, reproducible=True)
        self.reset(_SEED)
        actions = self.random_actions()
        full = self.step(actions)
        self.reset(_SEED)
        ids = [1, 0]  # not env order: the answer must follow env_ids
        observations, rewards, _ = self.step_subset(actions[ids], ids)
        np.testing.assert_array_equal(observations, full.observations[ids],
                                      err_msg="a subset Step must answer env_ids' envs, in env_ids order")
        np.testing.assert_array_equal(rewards, full.rewards[ids], err_msg="rewards in env_ids order")

    def test_subset_steps_leave_the_other_envs_untouched(self) -> None:
        self.require_subsets(envs=2, reproducible=True)
        self.reset(_SEED)
        actions = self.random_actions()
        full = self.step(actions)
        self.reset(_SEED)
        for _ in range(3):  # env 0 moves on; every other env must still be where the Reset left it
            self.step_subset(self.random_actions()[:1], [0])
        again = self.step(actions)
        np.testing.assert_array_equal(again.observations[1:], full.observations[1:],
                                      err_msg="envs not named in env_ids must not step")

    def test_subset_steps_of_every_env_in_turn(self) -> None:
        self.require_subsets(envs=1)
        self.reset(_SEED)
        n = self.spec.num_envs
        for i in reversed(range(n)):
            observations, _, _ = self.step_subset(self.random_actions()[i:i + 1], [i])
            assert observations.shape[0] == 1
        assert self.step(self.random_actions()).observations.shape[0] == n, "a full Step still answers every env"

    def test_bad_env_ids_are_refused_and_change_nothing(self) -> None:
        self.require_subsets(envs=2)
        n = self.spec.num_envs
        self.reset(_SEED)
        actions = self.random_actions()
        for ids, rows, what in (([0, 0], [0, 0], "an env named twice"), ([0, n], [0, 1], "an env id >= num_envs"),
                                ([-1, 0], [0, 1], "a negative env id"), ([0, 1], [0], "fewer actions than env_ids")):
            error = self.expect_code(grpc.StatusCode.INVALID_ARGUMENT,
                                     lambda ids=ids, rows=rows: self.step_subset(actions[rows], ids), what)
            assert "env_ids" in (error.details() or ""), f"{what}: the message should name env_ids"
        # Refusals change nothing: the next Step needs no Reset.
        self.step_subset(actions[:1], [0])

    def test_pipelined_session_requests_are_answered_in_order(self) -> None:
        # A trainer keeping two groups in flight sends the second group's Step before reading the first's answer.
        self.require_subsets(envs=2, reproducible=True)
        actions = self.random_actions()
        self.reset(_SEED)
        expected = [self.step_subset(actions[[1]], [1])[0], self.step_subset(actions[[0]], [0])[0]]
        requests = [pb.SessionRequest(reset=pb.ResetRequest(seed=_SEED))]
        for env in (1, 0):
            step = self.step_request(actions[[env]])
            step.env_ids.append(env)
            requests.append(pb.SessionRequest(step=step))
        try:  # the whole iterator is sent without waiting for answers: every request is in flight at once
            responses = list(self.stub.Session(iter(requests), timeout=self.timeout))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.skip("the Session stream is optional, and this simulation does not serve it")
            raise
        assert len(responses) == 3, f"3 requests pipelined on the Session stream got {len(responses)} answers"
        assert responses[0].WhichOneof("response") == "reset", "the first answer must be the Reset's"
        for index, (response, wanted) in enumerate(zip(responses[1:], expected, strict=True)):
            assert response.WhichOneof("response") == "step", f"answer {index + 2} must be a Step's"
            got = decode_batch(response.step.observations, self.spec.observation_space, 1, "observations")
            np.testing.assert_array_equal(got, wanted, err_msg="pipelined Steps must be answered in the order sent")
