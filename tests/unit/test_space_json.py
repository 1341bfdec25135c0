"""Spaces in metadata.json: plain JSON both ways, and anything else refused."""

from __future__ import annotations

import json
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from rl_service.core.models.space_json import (
    SpaceFormatError,
    space_from_json,
    space_to_json,
    spaces_from_json,
    spaces_to_json,
)

SPACES = [
    gym.spaces.Box(-1.0, 1.0, (4,), np.float32),
    gym.spaces.Box(np.array([-np.inf, 0.0]), np.array([np.inf, 5.5]), dtype=np.float64),
    gym.spaces.Box(0, 255, (3, 2, 2), np.uint8),
    gym.spaces.Discrete(5),
    gym.spaces.Discrete(3, start=-1),
    gym.spaces.MultiDiscrete([3, 2, 4]),
    gym.spaces.MultiBinary(4),
    gym.spaces.MultiBinary([2, 3]),
]


@pytest.mark.parametrize("space", SPACES, ids=[repr(s) for s in SPACES])
def test_spaces_round_trip_through_strict_json(space: gym.Space[Any]) -> None:
    text = json.dumps(spaces_to_json(space, space), allow_nan=False)  # no NaN/Infinity tokens: strict JSON
    observation, action = spaces_from_json(json.loads(text))
    assert observation == space and action == space


def test_equal_bounds_are_stored_once() -> None:
    data = space_to_json(gym.spaces.Box(-2.0, 2.0, (100,), np.float32))
    assert data["low"] == -2.0 and data["high"] == 2.0


@pytest.mark.parametrize("data", [
    None, [], {"type": "Tuple"}, {"type": "Discrete", "n": 0, "start": 0}, {"type": "Discrete", "n": True, "start": 0},
    {"type": "Box", "shape": [4], "dtype": "object", "low": 0, "high": 1},
    {"type": "Box", "shape": [4], "dtype": "float32", "low": [0, 1], "high": 1},
    {"type": "Box", "shape": [2], "dtype": "float32", "low": 2, "high": 1},
    {"type": "Box", "shape": [1 << 13, 1 << 13], "dtype": "float32", "low": 0, "high": 1},
    {"type": "Box", "shape": [2], "dtype": "float32", "low": "nan", "high": 1},
    {"type": "MultiDiscrete", "nvec": [2, 3], "start": [0]},
    {"type": "MultiBinary", "n": "__import__('os')"},
])
def test_anything_else_is_refused(data: Any) -> None:
    with pytest.raises(SpaceFormatError):
        space_from_json(data)


def test_a_record_of_another_format_is_refused() -> None:
    record = spaces_to_json(gym.spaces.Discrete(2), gym.spaces.Discrete(2))
    with pytest.raises(SpaceFormatError, match="format"):
        spaces_from_json({**record, "format": 2})
