"""Typed hyperparameter schemas: each algorithm declares its keys with type, default and range.

Values arrive as strings and are parsed here, never evaluated. A value can be a number, a boolean
("true"/"false"), a choice, a layer list ("64,64"), "none" for optional keys, or a linear schedule "lin_<start>"
(the rl-baselines3-zoo convention: start at <start>, fall linearly to 0 at the end of training), a word a key
accepts besides numbers ("auto"), or normalisation options (normalize.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from rl_service.core.algorithms.normalize import NormalizeOptions, parse_normalize
from rl_service.core.errors import MAX_QUOTED, InvalidHyperparameter, quoted

Kind = Literal["float", "int", "bool", "choice", "net_arch", "normalize"]

MAX_LAYERS = 8
MAX_LAYER_WIDTH = 4096


@dataclass(frozen=True)
class LinearSchedule:
    """A value that falls linearly from `start` to 0 over training."""

    start: float

    def __str__(self) -> str:
        return f"lin_{self.start!r}"


HyperValue = float | int | bool | str | tuple[int, ...] | LinearSchedule | NormalizeOptions | None


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its type, default and accepted range (bounds inclusive unless stated)."""

    name: str
    kind: Kind
    default: HyperValue
    low: float | None = None
    high: float | None = None
    low_exclusive: bool = False
    schedule: bool = False  # accepts "lin_<start>"
    optional: bool = False  # accepts "none"
    choices: tuple[str, ...] = ()
    words: tuple[str, ...] = ()  # literal words a number key also accepts (SAC's ent_coef "auto")
    help: str = ""

    def describe_range(self) -> str:
        """The accepted values in words, for error messages and docs."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "net_arch":
            return f"comma-separated layer widths, 1 to {MAX_LAYERS} layers of 1..{MAX_LAYER_WIDTH}"
        if self.kind == "normalize":
            return 'true, false, obs, or a JSON object such as {"norm_obs": true, "norm_reward": false}'
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        text = f"{self.kind} in {'(' if self.low_exclusive else '['}{lo}, {hi}]"
        if self.schedule:
            text += ' or "lin_<start>"'
        if self.optional:
            text += ' or "none"'
        for word in self.words:
            text += f' or "{word}"'
        return text

    def parse(self, raw: str) -> HyperValue:
        """Parse one string value, raising InvalidHyperparameter naming the key on any problem."""
        text = raw.strip()
        lowered = text.lower()
        if self.optional and lowered in ("none", "null", ""):
            return None
        if lowered in self.words:
            return lowered
        if self.kind == "normalize":
            try:
                return parse_normalize(text)
            except ValueError as exc:
                raise InvalidHyperparameter(f"hyperparameters[{self.name!r}]: cannot use {quoted(raw)}: {exc}",
                                            field=f"hyperparameters.{self.name}") from None
        try:
            if self.kind == "bool":
                if lowered in ("true", "1", "yes"):
                    return True
                if lowered in ("false", "0", "no"):
                    return False
                raise ValueError
            if self.kind == "choice":
                if lowered in self.choices:
                    return lowered
                raise ValueError
            if self.kind == "net_arch":
                return _parse_net_arch(text)
            if self.schedule and lowered.startswith("lin_"):
                start = float(lowered[4:])
                self._check_range(start)
                return LinearSchedule(start)
            if self.kind == "int":
                number = float(text)
                if not number.is_integer():
                    raise ValueError
                self._check_range(number)
                return int(number)
            number = float(text)
            self._check_range(number)
            return number
        except (ValueError, OverflowError):
            raise InvalidHyperparameter(
                f"hyperparameters[{self.name!r}]: cannot use {quoted(raw)}; expected {self.describe_range()}",
                field=f"hyperparameters.{self.name}",
            ) from None

    def _check_range(self, number: float) -> None:
        if not math.isfinite(number):
            raise ValueError
        if self.low is not None and (number < self.low or (self.low_exclusive and number == self.low)):
            raise ValueError
        if self.high is not None and number > self.high:
            raise ValueError


def _parse_net_arch(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.strip("[]()").split(",") if p.strip()]
    if not 1 <= len(parts) <= MAX_LAYERS:
        raise ValueError
    widths = tuple(int(p) for p in parts)
    if any(not 1 <= w <= MAX_LAYER_WIDTH for w in widths):
        raise ValueError
    return widths


def format_value(value: HyperValue) -> str:
    """The canonical string form of a parsed value (what status reports as the effective setting)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, NormalizeOptions):
        return str(value)  # the shortest text that parses back to exactly this float
    return str(value)


@dataclass(frozen=True)
class Schema:
    """An algorithm's full set of hyperparameters."""

    params: tuple[Param, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if len(names) != len(set(names)):
            raise ValueError(f"duplicate hyperparameter names in schema: {names}")

    @property
    def names(self) -> list[str]:
        """Accepted keys, sorted."""
        return sorted(p.name for p in self.params)

    def defaults(self) -> dict[str, HyperValue]:
        """Every key at its default value."""
        return {p.name: p.default for p in self.params}

    def parse(self, raw: Mapping[str, str]) -> dict[str, HyperValue]:
        """Defaults overlaid with the parsed client values; unknown keys are refused with the accepted list."""
        by_name = {p.name: p for p in self.params}
        values = self.defaults()
        for key, text in raw.items():
            param = by_name.get(key.strip().lower())
            if param is None:
                raise InvalidHyperparameter(
                    f"hyperparameters: unknown key {quoted(key)}; accepted keys: {', '.join(self.names)}",
                    field=f"hyperparameters.{key[:MAX_QUOTED]}",
                )
            values[param.name] = param.parse(text)
        return values


def merge(*groups: Sequence[Param]) -> Schema:
    """A schema from groups of params; later groups override earlier ones of the same name."""
    merged: dict[str, Param] = {}
    for group in groups:
        for param in group:
            merged[param.name] = param
    return Schema(tuple(merged.values()))
