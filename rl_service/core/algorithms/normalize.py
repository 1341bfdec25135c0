"""The `normalize` hyperparameter: rl-baselines3-zoo's meaning (VecNormalize of observations and rewards), parsed
from a word or a JSON object, never evaluated.

    true | false          observations and rewards normalised | nothing normalised
    obs                   observations only (rewards stay raw)
    {"norm_obs": true, "norm_reward": false, "clip_obs": 10, "clip_reward": 10, "gamma": 0.99, "epsilon": 1e-8}
                          VecNormalize's own keyword arguments, each optional (its defaults otherwise)

Without "gamma" the reward normaliser discounts with the algorithm's own gamma, as the zoo does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_TEXT = 512  # characters of a JSON form: a handful of keys never needs more
_FLAGS = ("norm_obs", "norm_reward")
# key -> (low, high, low exclusive): the accepted range of each number.
_NUMBERS: dict[str, tuple[float, float, bool]] = {
    "clip_obs": (0.0, 1e6, True),
    "clip_reward": (0.0, 1e6, True),
    "gamma": (0.0, 1.0, False),
    "epsilon": (0.0, 1.0, True),
}
KEYS = (*_FLAGS, *_NUMBERS)


@dataclass(frozen=True)
class NormalizeOptions:
    """What VecNormalize is built with (stable-baselines3's defaults); gamma None: the algorithm's gamma."""

    norm_obs: bool = False
    norm_reward: bool = False
    clip_obs: float = 10.0
    clip_reward: float = 10.0
    gamma: float | None = None
    epsilon: float = 1e-8

    @property
    def enabled(self) -> bool:
        """True when anything is normalised (the run gets a VecNormalize wrapper and statistics files)."""
        return self.norm_obs or self.norm_reward

    def __str__(self) -> str:
        """The canonical text: a word for the presets, else a JSON object with sorted keys (parses back equal)."""
        for word, preset in PRESETS.items():
            if self == preset:
                return word
        data: dict[str, Any] = {"norm_obs": self.norm_obs, "norm_reward": self.norm_reward,
                                "clip_obs": self.clip_obs, "clip_reward": self.clip_reward, "epsilon": self.epsilon}
        if self.gamma is not None:
            data["gamma"] = self.gamma
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


OFF = NormalizeOptions()
PRESETS: dict[str, NormalizeOptions] = {
    "false": OFF,
    "true": NormalizeOptions(norm_obs=True, norm_reward=True),
    "obs": NormalizeOptions(norm_obs=True, norm_reward=False),
}
_ALIASES = {"1": "true", "yes": "true", "0": "false", "no": "false"}


def parse_normalize(text: str) -> NormalizeOptions:
    """The options a `normalize` value names; ValueError (with the reason) for anything else."""
    stripped = text.strip()
    word = stripped.lower()
    word = _ALIASES.get(word, word)
    if word in PRESETS:
        return PRESETS[word]
    if not stripped.startswith("{"):
        raise ValueError("expected true, false, obs or a JSON object such as "
                         '{"norm_obs": true, "norm_reward": false}')
    if len(stripped) > MAX_TEXT:
        raise ValueError(f"the JSON object is longer than {MAX_TEXT} characters")
    try:
        data = json.loads(stripped, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown key {unknown[0][:32]!r}; accepted keys: {', '.join(KEYS)}")
    values: dict[str, Any] = {"norm_obs": True, "norm_reward": True}  # VecNormalize's defaults
    for key in _FLAGS:
        if key in data:
            if not isinstance(data[key], bool):
                raise ValueError(f"{key} must be true or false")
            values[key] = data[key]
    for key, (low, high, low_exclusive) in _NUMBERS.items():
        if key in data:
            values[key] = _number(key, data[key], low, high, low_exclusive)
    return NormalizeOptions(**values)


def _number(key: str, value: Any, low: float, high: float, low_exclusive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    number = float(value)
    if not math.isfinite(number) or number < low or (low_exclusive and number == low) or number > high:
        raise ValueError(f"{key} must be in {'(' if low_exclusive else '['}{low:g}, {high:g}]")
    return number


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("a key appears twice")
    return dict(pairs)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number this accepts")
