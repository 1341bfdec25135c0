"""FaultyEnvironmentServicer: the reference server with one deliberate fault, for tests and for checking how a
deployment handles a misbehaving simulation (slow steps, malformed answers, simulation errors, no Session)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Literal

import grpc

from rl_service.envserver.read_ahead import RpcAbort
from rl_service.envserver.reference_server import ReferenceEnvironmentServicer
from rl_service.infra.external_env.env_batch import EnvBatch
from rl_service_proto.v1 import environment_pb2 as pb

Fault = Literal["slow", "nan_reward", "short_observations", "short_terminated", "missing_final_observation",
                "internal", "no_session", "short_action_masks", "no_legal_action"]
FAULTS: tuple[Fault, ...] = ("slow", "nan_reward", "short_observations", "short_terminated",
                             "missing_final_observation", "internal", "no_session", "short_action_masks",
                             "no_legal_action")


class FaultyEnvironmentServicer(ReferenceEnvironmentServicer):
    """Answers like the reference server until step `at_step` (counted from 1), then injects `fault` on that step
    (every later one too when `persistent`). "no_session" answers Session with UNIMPLEMENTED from the start."""

    def __init__(self, batch: EnvBatch, fault: Fault, at_step: int = 1, delay: float = 5.0,
                 persistent: bool = False) -> None:
        super().__init__(batch)
        self.fault = fault
        self.at_step = at_step
        self.delay = delay
        self.persistent = persistent
        self.step_requests = 0
        self.injected = threading.Event()
        self.release = threading.Event()  # set it to end a "slow" step's wait early

    def Session(self, requests: Iterator[pb.SessionRequest], context: grpc.ServicerContext
                ) -> Iterator[pb.SessionResponse]:
        if self.fault == "no_session":
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Session is not implemented by this simulation")
        yield from super().Session(requests, context)

    def step(self, request: pb.StepRequest) -> pb.StepResponse:
        """The reference step, with the fault injected on the chosen step(s)."""
        self.step_requests += 1
        due = self.step_requests == self.at_step or (self.persistent and self.step_requests > self.at_step)
        if not due or self.fault == "no_session":
            return super().step(request)
        self.injected.set()
        if self.fault == "slow":
            self.release.wait(self.delay)
            return super().step(request)
        if self.fault == "internal":
            raise RpcAbort(grpc.StatusCode.INTERNAL, "step failed: physics engine diverged (injected fault)")
        response = super().step(request)
        if self.fault == "nan_reward":
            response.rewards[0] = float("nan")
        elif self.fault == "short_observations":
            payload = response.observations.WhichOneof("payload")
            if payload == "raw":
                response.observations.raw = response.observations.raw[:-4]
            else:
                del getattr(response.observations, str(payload)).values[-1]
        elif self.fault == "short_terminated":
            del response.terminated[-1]
        elif self.fault == "missing_final_observation":
            response.terminated[0] = True
            response.ClearField("final_observations")  # at least one final observation short
        elif self.fault in ("short_action_masks", "no_legal_action"):
            # Masks of a Discrete space, one flag short, or with env 0's all false (whether or not the env has masks).
            n = int(getattr(self.batch.action_space, "n", 2))
            legal = [True] * (self.batch.num_envs * n)
            if self.fault == "short_action_masks":
                del legal[-1]
            else:
                legal[:n] = [False] * n
            response.action_masks.legal[:] = legal
        return response
