"""The environment protocol's data: spaces and batches to and from proto, with every check a peer's data needs.

Both sides use it: the adapter decodes what a simulation answers, the reference server decodes what the adapter
asks. Nothing here trusts the peer: counts, shapes, dtypes, ranges and finiteness are checked, and nothing is
unpickled or evaluated. Deliberately free of torch and stable-baselines3 so the reference server starts fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from rl_service_proto.v1 import environment_pb2 as pb

PROTOCOL_VERSION = 1  # what a simulation announces by default (EnvSpec.protocol_version)
# The newest version this client speaks: 2 adds StepRequest.env_ids (stepping a subset of the envs).
MAX_PROTOCOL_VERSION = 2
ENV_SUBSETS_VERSION = 2
MAX_NUM_ENVS = 1024
MAX_ELEMENTS = 10_000_000  # values in one observation or action; a larger spec is refused
MAX_DIMS = 8
BOX_DTYPES = ("float32", "float64", "int8", "int16", "int32", "int64", "uint8")
_FLOAT_DTYPES = ("float32", "float64")

AnySpace = gym.Space[Any]


class MalformedData(ValueError):
    """A peer's message breaks the protocol; `field` names the offending field (e.g. "observations")."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class EnvSpec:
    """What GetSpec returns, as Gymnasium spaces."""

    observation_space: AnySpace
    action_space: AnySpace
    num_envs: int
    name: str = ""
    version: str = ""
    protocol_version: int = PROTOCOL_VERSION  # 1, or 2: steps a subset of its envs (StepRequest.env_ids)

    @property
    def supports_env_subsets(self) -> bool:
        """Whether the simulation steps a subset of its envs (protocol version 2)."""
        return self.protocol_version >= ENV_SUBSETS_VERSION

    def compatible_with(self, other: EnvSpec) -> bool:
        """Same spaces and number of envs (name, version and protocol version may differ)."""
        return (self.num_envs == other.num_envs and self.observation_space == other.observation_space
                and self.action_space == other.action_space)

    def describe(self) -> str:
        """One line for logs and error messages."""
        return (f"{self.name or 'unnamed'} {self.version}".strip()
                + f": {self.num_envs} envs, observations {self.observation_space}, actions {self.action_space}")


# ----------------------------------------------------------------------------------------------- spaces


def space_to_proto(space: AnySpace) -> pb.Space:
    """A Gymnasium space as the protocol's Space; ValueError for spaces the protocol cannot carry."""
    if isinstance(space, gym.spaces.Box):
        dtype = np.dtype(space.dtype).name
        if dtype not in BOX_DTYPES:
            raise ValueError(f"Box dtype {dtype} is not one of {', '.join(BOX_DTYPES)}")
        return pb.Space(box=pb.BoxSpace(shape=list(space.shape), dtype=dtype,
                                        low=_bounds_list(space.low), high=_bounds_list(space.high)))
    if isinstance(space, gym.spaces.Discrete):
        if int(space.start) != 0:
            raise ValueError(f"Discrete spaces must start at 0, got start={space.start}")
        return pb.Space(discrete=pb.DiscreteSpace(n=int(space.n)))
    if isinstance(space, gym.spaces.MultiDiscrete):
        if space.nvec.ndim != 1 or np.any(space.start != 0):
            raise ValueError("MultiDiscrete spaces must be one-dimensional and start at 0")
        return pb.Space(multi_discrete=pb.MultiDiscreteSpace(nvec=[int(n) for n in space.nvec]))
    if isinstance(space, gym.spaces.MultiBinary):
        return pb.Space(multi_binary=pb.MultiBinarySpace(shape=list(space.shape)))
    raise ValueError(f"{type(space).__name__} spaces are not supported; use Box, Discrete, MultiDiscrete or "
                     "MultiBinary")


def _bounds_list(bounds: np.ndarray) -> list[float]:
    flat = np.asarray(bounds, dtype=np.float64).reshape(-1)
    if flat.size and np.all(flat == flat[0]):
        return [float(flat[0])]  # one value for every element keeps the spec small
    return [float(v) for v in flat]


def space_from_proto(message: pb.Space, field: str) -> AnySpace:
    """The Gymnasium space a Space message describes; MalformedData (naming `field`) when missing or inconsistent."""
    try:
        return _space_from_proto(message, field)
    except MalformedData as exc:
        raise MalformedData(str(exc), field) from None


def _space_from_proto(message: pb.Space, field: str) -> AnySpace:
    kind = message.WhichOneof("kind")
    if kind == "box":
        return _box_from_proto(message.box, f"{field}.box")
    if kind == "discrete":
        n = message.discrete.n
        if not 1 <= n <= 2**31 - 1:
            raise MalformedData(f"{field}.discrete.n: must be at least 1, got {n}", field)
        return gym.spaces.Discrete(n)
    if kind == "multi_discrete":
        nvec = list(message.multi_discrete.nvec)
        if not nvec or len(nvec) > MAX_ELEMENTS or min(nvec) < 1:
            raise MalformedData(f"{field}.multi_discrete.nvec: needs at least one entry, each >= 1; got {nvec[:8]}",
                                field)
        return gym.spaces.MultiDiscrete(np.asarray(nvec, dtype=np.int64))
    if kind == "multi_binary":
        shape = _shape(message.multi_binary.shape, f"{field}.multi_binary.shape", allow_scalar=False)
        return gym.spaces.MultiBinary(shape[0] if len(shape) == 1 else list(shape))
    raise MalformedData(f"{field}: no space set (expected box, discrete, multi_discrete or multi_binary)", field)


def _shape(dims: Any, field: str, allow_scalar: bool) -> tuple[int, ...]:
    shape = tuple(int(d) for d in dims)
    if (not shape and not allow_scalar) or len(shape) > MAX_DIMS or any(d < 1 for d in shape):
        raise MalformedData(f"{field}: every dimension must be >= 1 and at most {MAX_DIMS} dimensions, got "
                            f"{len(shape)} dimensions starting [{', '.join(str(d)[:20] for d in shape[:MAX_DIMS])}]",
                            field)
    # math.prod on Python ints (at most MAX_DIMS of them): numpy's int64 product wraps around, and
    # [2**62, 4] would count as 0 elements.
    if math.prod(shape) > MAX_ELEMENTS:
        raise MalformedData(f"{field}: {list(shape)} has more than {MAX_ELEMENTS} elements", field)
    return shape


def _box_from_proto(box: pb.BoxSpace, field: str) -> gym.spaces.Box:
    shape = _shape(box.shape, f"{field}.shape", allow_scalar=True)
    dtype = box.dtype or "float32"
    if dtype not in BOX_DTYPES:
        raise MalformedData(f"{field}.dtype: {dtype!r} is not one of {', '.join(BOX_DTYPES)}", field)
    size = math.prod(shape)
    bounds = []
    for name, values in (("low", box.low), ("high", box.high)):
        array = np.asarray(values, dtype=np.float64)
        if array.size not in (1, size):
            raise MalformedData(f"{field}.{name}: {array.size} values; expected 1 or {size} (shape {list(shape)})",
                                field)
        if np.any(np.isnan(array)) or (dtype not in _FLOAT_DTYPES and not np.all(np.isfinite(array))):
            raise MalformedData(f"{field}.{name}: NaN, or an infinite bound for integer dtype {dtype}", field)
        bounds.append(np.broadcast_to(array, (size,)).reshape(shape))
    low, high = bounds
    if np.any(low > high):
        raise MalformedData(f"{field}: low exceeds high", field)
    if dtype not in _FLOAT_DTYPES:
        info = np.iinfo(dtype)
        if np.any(low < info.min) or np.any(high > info.max):
            raise MalformedData(f"{field}: bounds outside the range of {dtype}", field)
    return gym.spaces.Box(low=low.astype(dtype), high=high.astype(dtype), shape=shape, dtype=np.dtype(dtype))


def spec_to_proto(spec: EnvSpec) -> pb.EnvironmentSpec:
    """An EnvSpec as the GetSpec answer."""
    return pb.EnvironmentSpec(observation_space=space_to_proto(spec.observation_space),
                              action_space=space_to_proto(spec.action_space), num_envs=spec.num_envs,
                              name=spec.name, version=spec.version, protocol_version=spec.protocol_version)


def spec_from_proto(message: pb.EnvironmentSpec) -> EnvSpec:
    """A GetSpec answer, checked; MalformedData names the field at fault."""
    if message.protocol_version > MAX_PROTOCOL_VERSION:
        raise MalformedData(f"protocol_version: {message.protocol_version} is not supported; this client speaks "
                            f"versions 1 to {MAX_PROTOCOL_VERSION}", "protocol_version")
    if not 1 <= message.num_envs <= MAX_NUM_ENVS:
        raise MalformedData(f"num_envs: must be in [1, {MAX_NUM_ENVS}], got {message.num_envs}", "num_envs")
    if not message.HasField("observation_space"):
        raise MalformedData("observation_space: not set", "observation_space")
    if not message.HasField("action_space"):
        raise MalformedData("action_space: not set", "action_space")
    return EnvSpec(observation_space=space_from_proto(message.observation_space, "observation_space"),
                   action_space=space_from_proto(message.action_space, "action_space"),
                   num_envs=message.num_envs, name=message.name[:200], version=message.version[:200],
                   protocol_version=max(message.protocol_version, 1))


# ----------------------------------------------------------------------------------------------- batches


def element_dtype(space: AnySpace) -> np.dtype[Any]:
    """The numpy type of one value of the space: the Box dtype, or int64 for the discrete spaces."""
    if isinstance(space, gym.spaces.Box):
        return np.dtype(space.dtype)
    return np.dtype(np.int64)


def element_shape(space: AnySpace) -> tuple[int, ...]:
    """The shape of one element of the space (() for Discrete)."""
    return tuple(space.shape or ())


def wire_kind(space: AnySpace) -> str:
    """The typed payload that carries the space's values exactly: float32, float64 or int64."""
    dtype = element_dtype(space)
    if dtype == np.float64:
        return "float64"
    if dtype.kind == "f":
        return "float32"
    return "int64"


_PAYLOAD_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32), "float64": np.dtype(np.float64), "int64": np.dtype(np.int64)}


class BatchCodec:
    """Batches of one space's values to and from Tensor; built once per space, it is on every step's path."""

    def __init__(self, space: AnySpace) -> None:
        self.space = space
        self.dtype = element_dtype(space)
        self.little_endian = self.dtype.newbyteorder("<")
        self.shape = element_shape(space)
        self.size = math.prod(self.shape)
        self.kind = wire_kind(space)
        self.is_float = self.dtype.kind == "f"
        # Inclusive upper bound of each value of the discrete spaces (the lower bound is 0); None for Box.
        self.high: np.ndarray | None = None
        if isinstance(space, gym.spaces.Discrete):
            self.high = np.asarray(int(space.n) - 1, dtype=np.int64)
        elif isinstance(space, gym.spaces.MultiDiscrete):
            self.high = space.nvec.reshape(-1).astype(np.int64) - 1
        elif isinstance(space, gym.spaces.MultiBinary):
            self.high = np.asarray(1, dtype=np.int64)

    def encode(self, values: np.ndarray, raw: bool = False) -> pb.Tensor:
        """The typed payload of wire_kind, or little-endian bytes of the space's element type."""
        if raw:
            return pb.Tensor(raw=np.ascontiguousarray(values, dtype=self.little_endian).tobytes())
        flat = np.asarray(values).ravel()
        if self.kind == "float32":
            return pb.Tensor(float32=pb.Float32Array(values=flat.astype(np.float32, copy=False).tolist()))
        if self.kind == "float64":
            return pb.Tensor(float64=pb.Float64Array(values=flat.astype(np.float64, copy=False).tolist()))
        return pb.Tensor(int64=pb.Int64Array(values=flat.astype(np.int64, copy=False).tolist()))

    def decode(self, tensor: pb.Tensor, count: int, field: str, typed_only: bool = False) -> np.ndarray:
        """`count` values shaped (count, *shape) in the space's dtype; MalformedData names `field`.

        typed_only: accept only the typed payload of wire_kind (how actions travel), not raw or another type.
        """
        expected = count * self.size
        kind = tensor.WhichOneof("payload")
        if typed_only and kind != self.kind and expected:
            raise MalformedData(f"{field}: {kind or 'no'} payload; {self.space} values travel as the {self.kind} "
                                "payload", field)
        values: np.ndarray
        if kind == "raw":
            if len(tensor.raw) != expected * self.dtype.itemsize:
                raise MalformedData(
                    f"{field}: raw payload of {len(tensor.raw)} bytes; expected {expected * self.dtype.itemsize} "
                    f"({count} x {list(self.shape) or 'scalar'} values of {self.dtype.name})", field)
            values = np.frombuffer(tensor.raw, dtype=self.little_endian).astype(self.dtype)  # a writable copy
        else:
            container = getattr(tensor, kind).values if kind is not None else ()
            if len(container) != expected:
                raise MalformedData(
                    f"{field}: {len(container)} values; expected {expected} ({count} x {self.size} for "
                    f"{self.space})", field)
            values = np.fromiter(container, dtype=_PAYLOAD_DTYPES[kind] if kind is not None else self.dtype,
                                 count=expected)
            if values.dtype != self.dtype:
                values = _convert(values, self.dtype, field)
        self._check(values, field)
        return values.reshape((count, *self.shape))

    def _check(self, values: np.ndarray, field: str) -> None:
        if values.size == 0:
            return
        if self.is_float:
            if not np.isfinite(values).all():
                _check_finite(values, field)
            return
        high = self.high
        if high is None:
            return  # integer Box: the dtype range was checked; bounds are the simulation's business
        grid = values.reshape(-1, high.size) if high.ndim else values
        if grid.min() < 0 or (grid > high).any():
            outside = ((grid < 0) | (grid > high)).ravel()
            bad = int(np.flatnonzero(outside)[0])
            raise MalformedData(f"{field}: value {values.ravel()[bad]} at index {bad} is outside {self.space}", field)


def encode_batch(values: np.ndarray, space: AnySpace, raw: bool = False) -> pb.Tensor:
    """A batch of the space's values as a Tensor: the typed payload of wire_kind, or little-endian bytes."""
    return BatchCodec(space).encode(values, raw)


def decode_batch(tensor: pb.Tensor, space: AnySpace, count: int, field: str) -> np.ndarray:
    """`count` elements of `space` from a Tensor, shaped (count, *shape) in the space's dtype.

    Any of the four payloads is accepted. MalformedData (naming `field`) for a wrong number of values, a raw
    payload whose length is not a whole number of values, NaN or Inf, fractions or out-of-range values for
    integer spaces.
    """
    return BatchCodec(space).decode(tensor, count, field)


def _convert(values: np.ndarray, dtype: np.dtype[Any], field: str) -> np.ndarray:
    if values.dtype == dtype:
        return values
    if values.dtype.kind == "f":
        _check_finite(values, field)
        if dtype.kind != "f":
            if not np.all(values == np.round(values)):
                bad = int(np.flatnonzero(values != np.round(values))[0])
                raise MalformedData(f"{field}: value {values[bad]} at index {bad} is not a whole number", field)
            info = np.iinfo(dtype)
            if np.any(values < info.min) or np.any(values > info.max):
                raise MalformedData(f"{field}: values outside the range of {dtype.name}", field)
        with np.errstate(over="ignore"):
            converted = values.astype(dtype)
        if dtype.kind == "f":
            _check_finite(converted, field)  # 1e39 is finite as float64, Inf as float32
        return converted
    if dtype.kind != "f":
        info = np.iinfo(dtype)
        if np.any(values < info.min) or np.any(values > info.max):
            raise MalformedData(f"{field}: values outside the range of {dtype.name}", field)
    return values.astype(dtype)


def _check_finite(values: np.ndarray, field: str) -> None:
    finite = np.isfinite(values)
    if not np.all(finite):
        bad = int(np.flatnonzero(~finite)[0])
        raise MalformedData(f"{field}: value at index {bad} is {values[bad]}; NaN and Inf are refused", field)


def decode_floats(values: Any, count: int, field: str) -> np.ndarray:
    """A repeated float field of `count` finite values as float32."""
    if len(values) != count:
        raise MalformedData(f"{field}: {len(values)} values; expected {count} (one per env)", field)
    array = np.fromiter(values, dtype=np.float32, count=count)
    if not np.isfinite(array).all():
        _check_finite(array, field)
    return array


def decode_bools(values: Any, count: int, field: str) -> np.ndarray:
    """A repeated bool field of `count` values."""
    if len(values) != count:
        raise MalformedData(f"{field}: {len(values)} values; expected {count} (one per env)", field)
    return np.fromiter(values, dtype=bool, count=count)


# ----------------------------------------------------------------------------------------------- action masks

MASKS_FIELD = "action_masks"


def encode_action_masks(masks: np.ndarray | None) -> pb.ActionMasks | None:
    """(num_envs, n) legal-action flags as ActionMasks, env-major; None (the field left unset) for no masks."""
    if masks is None:
        return None
    return pb.ActionMasks(legal=np.asarray(masks, dtype=bool).ravel().tolist())


def decode_action_masks(message: pb.ActionMasks, action_space: AnySpace, count: int,
                        field: str = MASKS_FIELD) -> np.ndarray | None:
    """The masks of `count` envs shaped (count, n) as bool, or None when none were sent (every action legal).

    MalformedData (naming `field`) for masks sent for an action space that is not Discrete, a number of flags
    other than count * n, or an env without a single legal action (a simulation in that state is broken: no
    action could be taken).
    """
    flags = message.legal
    if not flags:
        return None
    if not isinstance(action_space, gym.spaces.Discrete):
        raise MalformedData(f"{field}: {len(flags)} flags sent, but action masks are defined for Discrete action "
                            f"spaces only and the action space is {action_space}; send none", field)
    n = int(action_space.n)
    expected = count * n
    if len(flags) != expected:
        raise MalformedData(f"{field}: {len(flags)} flags; expected {expected} ({count} envs x {n} actions, "
                            "env-major) or none", field)
    masks = np.fromiter(flags, dtype=bool, count=expected).reshape(count, n)
    stuck = ~masks.any(axis=1)
    if stuck.any():
        env = int(np.flatnonzero(stuck)[0])
        raise MalformedData(f"{field}: env {env} has no legal action (all {n} flags false); every env needs at "
                            "least one", field)
    return masks
