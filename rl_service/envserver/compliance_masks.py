"""The compliance suite's action-mask checks (a mixin of EnvironmentServiceCompliance).

Masks are optional: decoding checks every answer's masks when sent (Discrete action space, num_envs * n flags,
one legal action per env), and these checks skip for a simulation that sends none.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from rl_service.infra.external_env.codec import EnvSpec, MalformedData, decode_action_masks
from rl_service_proto.v1 import environment_pb2 as pb


class ComplianceSkip(Exception):
    """A check that does not apply to this simulation (pytest reports it as skipped)."""


class ActionMaskChecks:
    """Keeps the masks of each decoded answer and checks them; the suite's reset/step/skip do the rest."""

    masks_in_every_answer: bool = True  # the doc's SHOULD: a simulation with masks sends them in every answer
    steps_per_check: int  # the suite's settings
    standalone: bool
    spec: EnvSpec
    rng: np.random.Generator
    last_masks: np.ndarray | None  # of the last decoded answer: random actions are picked among its legal ones
    masks_sent: dict[str, list[bool]]  # per call ("Reset", "Step"), per answer: were masks sent

    def reset(self, seed: int | None = None) -> np.ndarray:
        raise NotImplementedError  # the suite's

    def step(self, actions: np.ndarray) -> Any:
        raise NotImplementedError  # the suite's

    def random_actions(self) -> np.ndarray:
        raise NotImplementedError  # the suite's

    def skip(self, reason: str) -> None:
        """Skip the current check (pytest's skip under pytest)."""
        if not self.standalone and "pytest" in sys.modules:
            import pytest

            pytest.skip(reason)
        raise ComplianceSkip(reason)

    def forget_masks(self) -> None:
        """Start a check with no masks seen."""
        self.last_masks = None
        self.masks_sent = {"Reset": [], "Step": []}

    def keep_masks(self, call: str, message: pb.ActionMasks) -> np.ndarray | None:
        """Decode an answer's masks (AssertionError naming the field when malformed) and remember them."""
        try:
            masks = decode_action_masks(message, self.spec.action_space, self.spec.num_envs)
        except MalformedData as exc:
            raise AssertionError(f"malformed answer: {exc}") from None
        self.last_masks = masks
        self.masks_sent[call].append(masks is not None)
        return masks

    def legal_actions(self, masks: np.ndarray) -> np.ndarray:
        """One random legal action per env (masks exist for Discrete action spaces only)."""
        return np.array([self.rng.choice(np.flatnonzero(mask)) for mask in masks], dtype=np.int64)

    def test_action_masks_are_well_formed_and_sent_consistently(self) -> None:
        self.reset(seed=8)
        for _ in range(self.steps_per_check):
            self.step(self.random_actions())  # decoding checks each answer's masks
        if not any(self.masks_sent["Reset"] + self.masks_sent["Step"]):
            self.skip("the simulation sends no action masks (optional: every action is legal)")
        if self.masks_in_every_answer:
            missing = [call for call, sent in self.masks_sent.items() if not all(sent)]
            assert not missing, (f"action_masks: sent in some answers but missing from {' and '.join(missing)} "
                                 "answers; a simulation with masks should send them in every answer (empty means "
                                 "every action legal; set masks_in_every_answer = False to allow it)")

    def test_illegal_actions_are_stepped_not_refused(self) -> None:
        self.reset(seed=9)
        for _ in range(self.steps_per_check):
            masks = self.last_masks
            if masks is not None and not masks.all():
                env, action = np.argwhere(~masks)[0]
                actions = self.random_actions()
                actions[env] = action
                # Algorithms other than MaskablePPO ignore masks: an illegal action is the simulation's to judge.
                self.step(actions)
                return
            self.step(self.random_actions())
        self.skip(f"no action was masked as illegal within {self.steps_per_check} steps")
