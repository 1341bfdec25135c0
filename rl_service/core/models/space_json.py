"""Observation and action spaces as plain JSON, for a run's metadata.json: serving rebuilds a run's policy from them
without reading stable-baselines3's pickled copy of the spaces.

Box, Discrete, MultiDiscrete and MultiBinary (every space the service trains on). Bounds equal across a Box are
stored once; infinite bounds travel as the strings "inf" and "-inf" (JSON has no infinity). Reading checks every
field, since the file is data on disk, not code.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

FORMAT = 1
MAX_ELEMENTS = 1 << 24  # an observation of 16 M numbers is far beyond any policy this service trains
MAX_DIMS = 8
_BOX_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
               "uint64", "bool")


class SpaceFormatError(ValueError):
    """A JSON space that is not one this module writes."""


def space_to_json(space: gym.Space[Any]) -> dict[str, Any]:
    """A JSON-ready description of a space; ValueError for a kind the service does not train on."""
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "shape": [int(d) for d in space.shape], "dtype": np.dtype(space.dtype).name,
                "low": _bounds(space.low), "high": _bounds(space.high)}
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": np.asarray(space.nvec).tolist(),
                "start": np.asarray(space.start).tolist()}
    if isinstance(space, gym.spaces.MultiBinary):
        return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}
    raise ValueError(f"{type(space).__name__} spaces cannot be recorded")


def spaces_to_json(observation_space: gym.Space[Any], action_space: gym.Space[Any]) -> dict[str, Any]:
    """The `spaces` entry of metadata.json."""
    return {"format": FORMAT, "observation": space_to_json(observation_space), "action": space_to_json(action_space)}


def spaces_from_json(data: Any) -> tuple[gym.Space[Any], gym.Space[Any]]:
    """(observation space, action space) from a `spaces` entry; SpaceFormatError when it is not one."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SpaceFormatError(f"spaces: not a format-{FORMAT} spaces record")
    return space_from_json(data.get("observation")), space_from_json(data.get("action"))


def space_from_json(data: Any) -> gym.Space[Any]:
    """The space a space_to_json description names; SpaceFormatError for anything else."""
    if not isinstance(data, dict):
        raise SpaceFormatError("space: not an object")
    kind = data.get("type")
    if kind == "Box":
        return _box(data)
    if kind == "Discrete":
        return gym.spaces.Discrete(_int(data.get("n"), 1), start=_int(data.get("start"), None))
    if kind == "MultiDiscrete":
        nvec, offsets = _int_array(data.get("nvec"), 1), _int_array(data.get("start"), None)
        if nvec.shape != offsets.shape:
            raise SpaceFormatError("MultiDiscrete: nvec and start differ in shape")
        return gym.spaces.MultiDiscrete(nvec, start=offsets)
    if kind == "MultiBinary":
        size = data.get("n")
        if isinstance(size, int):
            return gym.spaces.MultiBinary(_int(size, 1))
        return gym.spaces.MultiBinary(_int_array(size, 1).tolist())
    raise SpaceFormatError(f"space: unknown type {str(kind)[:32]!r}")


def _bounds(values: np.ndarray) -> Any:
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    encoded = [_float_out(float(v)) for v in flat]
    if encoded and all(v == encoded[0] for v in encoded):
        return encoded[0]  # one value for every element keeps metadata.json small
    return encoded


def _float_out(value: float) -> float | str:
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _float_in(value: Any) -> float:
    if value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpaceFormatError("Box: a bound is not a number")
    return float(value)


def _int(value: Any, minimum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise SpaceFormatError("space: expected a whole number" + (f" >= {minimum}" if minimum is not None else ""))
    return value


def _int_array(value: Any, minimum: int | None) -> np.ndarray:
    array = np.asarray(value if isinstance(value, list) else [None], dtype=object)
    if array.size == 0 or array.size > MAX_ELEMENTS or array.ndim > MAX_DIMS:
        raise SpaceFormatError("space: expected a non-empty list of whole numbers")
    for item in array.reshape(-1):
        _int(item, minimum)
    return array.astype(np.int64)


def _box(data: dict[str, Any]) -> gym.spaces.Box:
    shape_list = data.get("shape")
    if not isinstance(shape_list, list) or len(shape_list) > MAX_DIMS:
        raise SpaceFormatError("Box: shape is not a list of dimensions")
    shape = tuple(_int(d, 1) for d in shape_list)
    size = math.prod(shape)
    if size > MAX_ELEMENTS:
        raise SpaceFormatError(f"Box: more than {MAX_ELEMENTS} elements")
    dtype = data.get("dtype")
    if dtype not in _BOX_DTYPES:
        raise SpaceFormatError("Box: unknown dtype")
    bounds = []
    for name in ("low", "high"):
        raw = data.get(name)
        values = [_float_in(v) for v in raw] if isinstance(raw, list) else [_float_in(raw)]
        if len(values) not in (1, size):
            raise SpaceFormatError(f"Box: {name} holds {len(values)} values for {size} elements")
        bounds.append(np.broadcast_to(np.asarray(values, dtype=np.float64), (size,)).reshape(shape))
    low, high = bounds
    if np.any(low > high):
        raise SpaceFormatError("Box: low exceeds high")
    return gym.spaces.Box(low=low.astype(dtype), high=high.astype(dtype), shape=shape, dtype=np.dtype(dtype))
