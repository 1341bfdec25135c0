"""The messages between the reference server and its env-worker processes: raw little-endian numbers, no pickles.

Both ends build the same envs, so both know every array's element type and shape (a `Layout`); a message carries
only a fixed header with its counts, then the arrays' bytes back to back. What a worker reads comes from its own
server, never from a client, and it is read as numbers only: nothing is unpickled or evaluated.

    request  RESET: op, has_seed (u8), seed (i64)
             STEP:  op, count (u32), count local env ids (i32), count actions
             CLOSE: op
    answer   status (u8), then when OK:
             READY: serves_masks (u8), num_envs (u32)                      (a worker's first message)
             RESET: observations, masks
             STEP:  finals (u32), observations, rewards (f32), terminated, truncated (bool), final observations,
                    masks
             masks: present (u8), then rows x n bools when present
             when not OK: the error's text (utf-8)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from rl_service.infra.external_env.codec import AnySpace, element_dtype, element_shape
from rl_service.infra.external_env.env_batch import BatchStep

RESET, STEP, CLOSE = 1, 2, 3
OK, FAILED, RESET_NEEDED = 0, 1, 2
_RESET = struct.Struct("<BBq")
_STEP = struct.Struct("<BI")
_READY = struct.Struct("<BBI")
_STEP_ANSWER = struct.Struct("<BI")
_BOOL = np.dtype(np.bool_)
_IDS = np.dtype("<i4")
_REWARDS = np.dtype("<f4")


class WireError(ValueError):
    """A message that does not have the layout's size (a bug on one side, not bad input from a client)."""


@dataclass(frozen=True)
class Layout:
    """Element types and shapes of the arrays that travel, the same at both ends."""

    observation_dtype: np.dtype[Any]  # little-endian
    observation_shape: tuple[int, ...]
    action_dtype: np.dtype[Any]  # little-endian
    action_shape: tuple[int, ...]
    mask_width: int  # actions per env (Discrete n), for the masks

    @classmethod
    def of(cls, observation_space: AnySpace, action_space: AnySpace) -> Layout:
        """The layout of a batch of envs with these spaces."""
        masks = int(action_space.n) if isinstance(action_space, gym.spaces.Discrete) else 0  # masks: Discrete only
        return cls(element_dtype(observation_space).newbyteorder("<"), element_shape(observation_space),
                   element_dtype(action_space).newbyteorder("<"), element_shape(action_space), masks)


class _Reader:
    """Reads arrays one after the other from a message."""

    def __init__(self, data: bytes, offset: int) -> None:
        self.data = data
        self.offset = offset

    def array(self, dtype: np.dtype[Any], rows: int, shape: tuple[int, ...] = ()) -> np.ndarray:
        count = rows * int(np.prod(shape, dtype=np.int64))
        end = self.offset + count * dtype.itemsize
        if end > len(self.data):
            raise WireError(f"message of {len(self.data)} bytes is too short for {rows} rows of {dtype.name}")
        values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset = end
        return values.astype(dtype.newbyteorder("="), copy=True).reshape((rows, *shape))  # native and writable

    def masks(self, layout: Layout, rows: int) -> np.ndarray | None:
        present = self.data[self.offset] if self.offset < len(self.data) else 0
        self.offset += 1
        return self.array(_BOOL, rows, (layout.mask_width,)) if present else None

    def done(self) -> None:
        if self.offset != len(self.data):
            raise WireError(f"message of {len(self.data)} bytes has {len(self.data) - self.offset} bytes left over")


def _bytes(values: np.ndarray, dtype: np.dtype[Any]) -> bytes:
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def _masks(masks: np.ndarray | None) -> bytes:
    return b"\x00" if masks is None else b"\x01" + _bytes(masks, _BOOL)


# ------------------------------------------------------------------------------------------------ requests


def reset_request(seed: int | None) -> bytes:
    """Reset every env of the worker; its first env gets `seed` (the worker adds its offset)."""
    return _RESET.pack(RESET, seed is not None, 0 if seed is None else seed)


def step_request(layout: Layout, local_ids: np.ndarray, actions: np.ndarray) -> bytes:
    """Step the worker's envs `local_ids` (in that order) with one action each."""
    return step_prefix(local_ids) + action_bytes(layout, actions)


def step_prefix(local_ids: np.ndarray) -> bytes:
    """The start of a STEP request for these envs, the actions' bytes to follow (the same for every step)."""
    return _STEP.pack(STEP, len(local_ids)) + _bytes(local_ids, _IDS)


def action_bytes(layout: Layout, actions: np.ndarray) -> bytes:
    """The end of a STEP request: the actions."""
    return _bytes(actions, layout.action_dtype)


def close_request() -> bytes:
    """Ask the worker to close its envs and exit."""
    return bytes([CLOSE])


def read_reset(data: bytes) -> int | None:
    """The seed of a RESET request (None: unseeded)."""
    if len(data) != _RESET.size:
        raise WireError(f"RESET request of {len(data)} bytes; expected {_RESET.size}")
    _, has_seed, seed = _RESET.unpack(data)
    return int(seed) if has_seed else None


def read_step(layout: Layout, data: bytes) -> tuple[list[int], np.ndarray]:
    """The local env ids and actions of a STEP request."""
    _, count = _STEP.unpack_from(data)
    reader = _Reader(data, _STEP.size)
    ids = reader.array(_IDS, count)
    actions = reader.array(layout.action_dtype, count, layout.action_shape)
    reader.done()
    return ids.tolist(), actions


# ------------------------------------------------------------------------------------------------ answers


def failure(status: int, text: str) -> bytes:
    """An answer saying the request failed (FAILED, RESET_NEEDED), with the error's text."""
    return bytes([status]) + text.encode("utf-8", "replace")


def ready_answer(serves_masks: bool, num_envs: int) -> bytes:
    """A worker's first message: its envs are built."""
    return _READY.pack(OK, serves_masks, num_envs)


def reset_answer(layout: Layout, observations: np.ndarray, masks: np.ndarray | None) -> bytes:
    """The first observations (and masks) of every env of the worker."""
    return bytes([OK]) + _bytes(observations, layout.observation_dtype) + _masks(masks)


def step_answer(layout: Layout, result: BatchStep) -> bytes:
    """One step of the envs asked, rows in the order asked."""
    return b"".join((_STEP_ANSWER.pack(OK, len(result.final_observations)),
                     _bytes(result.observations, layout.observation_dtype), _bytes(result.rewards, _REWARDS),
                     _bytes(result.terminated, _BOOL), _bytes(result.truncated, _BOOL),
                     _bytes(result.final_observations, layout.observation_dtype), _masks(result.action_masks)))


def status_of(data: bytes) -> tuple[int, str]:
    """An answer's status, and the error's text when it is not OK."""
    if not data:
        raise WireError("empty answer")
    return data[0], "" if data[0] == OK else data[1:].decode("utf-8", "replace")


def read_ready(data: bytes) -> tuple[bool, int]:
    """serves_masks and num_envs of a READY answer."""
    if len(data) != _READY.size:
        raise WireError(f"READY answer of {len(data)} bytes; expected {_READY.size}")
    _, serves_masks, num_envs = _READY.unpack(data)
    return bool(serves_masks), int(num_envs)


def read_reset_answer(layout: Layout, data: bytes, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Observations and masks of an OK RESET answer for `rows` envs."""
    reader = _Reader(data, 1)
    observations = reader.array(layout.observation_dtype, rows, layout.observation_shape)
    masks = reader.masks(layout, rows)
    reader.done()
    return observations, masks


def read_step_answer(layout: Layout, data: bytes, rows: int) -> BatchStep:
    """An OK STEP answer for `rows` stepped envs."""
    _, finals = _STEP_ANSWER.unpack_from(data)
    reader = _Reader(data, _STEP_ANSWER.size)
    observations = reader.array(layout.observation_dtype, rows, layout.observation_shape)
    rewards = reader.array(_REWARDS, rows)
    terminated = reader.array(_BOOL, rows)
    truncated = reader.array(_BOOL, rows)
    final_observations = reader.array(layout.observation_dtype, finals, layout.observation_shape)
    masks = reader.masks(layout, rows)
    reader.done()
    return BatchStep(observations, rewards, terminated, truncated, final_observations, masks)
