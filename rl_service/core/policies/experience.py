"""Client-collected experience: validate a flattened batch and split it into complete episodes.

An episode that the batch leaves unfinished is returned as the tail and joined to the front of the next batch
for the same policy, so returns stay true Monte-Carlo returns across batch boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rl_service.core.algorithms.reinforce_update import Episode
from rl_service.core.errors import InvalidRequest


@dataclass(frozen=True)
class SpaceShape:
    """What one observation and one action look like for a named policy."""

    observation_size: int
    discrete_actions: int | None  # n for Discrete actions, None for Box
    action_size: int  # 1 for Discrete
    action_low: np.ndarray | None = None  # Box bounds, flattened (may hold -inf/inf)
    action_high: np.ndarray | None = None


@dataclass(frozen=True)
class Transitions:
    """Validated arrays of one batch (or a held tail): states (n, obs), actions (n,) or (n, act), rewards, dones."""

    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    @staticmethod
    def empty(shape: SpaceShape) -> Transitions:
        """No transitions."""
        actions = (np.zeros(0, dtype=np.int64) if shape.discrete_actions is not None
                   else np.zeros((0, shape.action_size), dtype=np.float32))
        return Transitions(np.zeros((0, shape.observation_size), dtype=np.float32), actions,
                           np.zeros(0, dtype=np.float64), np.zeros(0, dtype=bool))

    def concat(self, other: Transitions) -> Transitions:
        """These transitions followed by `other`."""
        return Transitions(np.concatenate([self.states, other.states]), np.concatenate([self.actions, other.actions]),
                           np.concatenate([self.rewards, other.rewards]), np.concatenate([self.dones, other.dones]))


def validate_batch(shape: SpaceShape, states: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                   dones: np.ndarray) -> Transitions:
    """Check sizes, finiteness and action bounds; raise InvalidRequest naming the field at fault."""
    n = int(rewards.size)
    if n == 0:
        raise InvalidRequest("rewards: the batch is empty; send at least one transition", field="rewards")
    if dones.size != n:
        raise InvalidRequest(f"dones: {dones.size} values for {n} rewards; one done flag per transition",
                             field="dones")
    if states.size != n * shape.observation_size:
        raise InvalidRequest(
            f"states: {states.size} values for {n} transitions; expected {n} x {shape.observation_size} = "
            f"{n * shape.observation_size}", field="states")
    if actions.size != n * shape.action_size:
        raise InvalidRequest(
            f"actions: {actions.size} values for {n} transitions; expected {n} x {shape.action_size} = "
            f"{n * shape.action_size}", field="actions")
    for name, values in (("states", states), ("actions", actions), ("rewards", rewards)):
        finite = np.isfinite(values)
        if not finite.all():
            index = int(np.flatnonzero(~finite)[0])
            raise InvalidRequest(f"{name}: value at index {index} is {values[index]}; NaN and Inf are refused",
                                 field=name)
    if shape.discrete_actions is not None:
        whole = actions == np.round(actions)
        inside = (actions >= 0) & (actions < shape.discrete_actions)
        bad = ~(whole & inside)
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise InvalidRequest(
                f"actions: value at index {index} is {actions[index]}; actions are integers in "
                f"[0, {shape.discrete_actions})", field="actions")
        typed_actions = actions.astype(np.int64)
    else:
        grid = actions.reshape(n, shape.action_size)
        assert shape.action_low is not None and shape.action_high is not None
        bad = (grid < shape.action_low) | (grid > shape.action_high)
        if bad.any():
            index = int(np.flatnonzero(bad.reshape(-1))[0])
            raise InvalidRequest(
                f"actions: value at index {index} is {actions[index]}, outside the action space's bounds",
                field="actions")
        typed_actions = grid.astype(np.float32)
    return Transitions(states.reshape(n, shape.observation_size).astype(np.float32), typed_actions,
                       rewards.astype(np.float64), dones.astype(bool))


def split_episodes(transitions: Transitions) -> tuple[list[Episode], Transitions]:
    """Complete episodes (each ending at a done) and the unfinished tail after the last done."""
    ends = np.flatnonzero(transitions.dones)
    episodes = []
    start = 0
    for end in ends:
        stop = int(end) + 1
        episodes.append(Episode(transitions.states[start:stop], transitions.actions[start:stop],
                                transitions.rewards[start:stop]))
        start = stop
    tail = Transitions(transitions.states[start:], transitions.actions[start:], transitions.rewards[start:],
                       transitions.dones[start:])
    return episodes, tail
