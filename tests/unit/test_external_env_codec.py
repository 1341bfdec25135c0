"""rl_service.infra.external_env.codec: spaces and batches to and from proto, and every check on a peer's data."""

from __future__ import annotations

import re
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from rl_service.infra.external_env.codec import (
    BatchCodec,
    EnvSpec,
    MalformedData,
    decode_action_masks,
    decode_batch,
    decode_bools,
    decode_floats,
    encode_action_masks,
    encode_batch,
    space_from_proto,
    space_to_proto,
    spec_from_proto,
    spec_to_proto,
    wire_kind,
)
from rl_service_proto.v1 import environment_pb2 as pb

SPACES: list[gym.Space[Any]] = [
    gym.spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32),
    gym.spaces.Box(low=np.array([-1.0, -np.inf]), high=np.array([2.0, np.inf]), dtype=np.float64),
    gym.spaces.Box(0, 255, shape=(2, 3, 1), dtype=np.uint8),
    gym.spaces.Box(-5, 5, shape=(), dtype=np.int32),
    gym.spaces.Discrete(5),
    gym.spaces.MultiDiscrete([3, 2, 4]),
    gym.spaces.MultiBinary(4),
    gym.spaces.MultiBinary([2, 2]),
]


@pytest.mark.parametrize("space", SPACES, ids=str)
def test_space_round_trip(space: gym.Space[Any]) -> None:
    message = space_to_proto(space)
    again = space_from_proto(pb.Space.FromString(message.SerializeToString()), "observation_space")
    assert again == space
    assert again.dtype == space.dtype


@pytest.mark.parametrize("space", SPACES, ids=str)
@pytest.mark.parametrize("raw", [False, True], ids=["typed", "raw"])
def test_batch_round_trip(space: gym.Space[Any], raw: bool) -> None:
    space.seed(0)
    values = np.stack([np.asarray(space.sample()) for _ in range(3)])
    tensor = encode_batch(values, space, raw=raw)
    assert tensor.WhichOneof("payload") == ("raw" if raw else wire_kind(space))
    decoded = decode_batch(pb.Tensor.FromString(tensor.SerializeToString()), space, 3, "observations")
    assert decoded.shape == (3, *(space.shape or ()))
    assert decoded.dtype == (space.dtype if isinstance(space, gym.spaces.Box) else np.int64)
    np.testing.assert_array_equal(decoded, values)
    assert decoded.flags.writeable


def test_every_payload_is_accepted_for_observations() -> None:
    space = gym.spaces.Box(-10, 10, shape=(2,), dtype=np.float32)
    expected = np.array([[1.5, -2.0], [0.0, 3.25]], dtype=np.float32)
    for tensor in (pb.Tensor(float32=pb.Float32Array(values=[1.5, -2, 0, 3.25])),
                   pb.Tensor(float64=pb.Float64Array(values=[1.5, -2, 0, 3.25])),
                   pb.Tensor(raw=expected.astype("<f4").tobytes())):
        np.testing.assert_array_equal(decode_batch(tensor, space, 2, "observations"), expected)
    ints = decode_batch(pb.Tensor(int64=pb.Int64Array(values=[1, 2, 3, 4])), space, 2, "observations")
    assert ints.dtype == np.float32 and ints.tolist() == [[1, 2], [3, 4]]
    discrete = decode_batch(pb.Tensor(float32=pb.Float32Array(values=[0, 4, 2])), gym.spaces.Discrete(5), 3, "o")
    assert discrete.dtype == np.int64 and discrete.tolist() == [0, 4, 2]


@pytest.mark.parametrize(("space", "tensor", "fragment"), [
    (gym.spaces.Box(-1, 1, (2,)), pb.Tensor(float32=pb.Float32Array(values=[0.0] * 5)), "5 values; expected 6"),
    (gym.spaces.Box(-1, 1, (2,)), pb.Tensor(), "0 values; expected 6"),
    (gym.spaces.Box(-1, 1, (2,)), pb.Tensor(float32=pb.Float32Array(values=[0, 0, float("nan"), 0, 0, 0])), "nan"),
    (gym.spaces.Box(-1, 1, (2,)), pb.Tensor(float64=pb.Float64Array(values=[0, 0, 0, 0, 0, 1e39])), "inf"),
    (gym.spaces.Box(-1, 1, (2,)), pb.Tensor(raw=b"\x00" * 23), "raw payload of 23 bytes; expected 24"),
    (gym.spaces.Box(-1, 1, (2,)), pb.Tensor(raw=np.array([0, 0, 0, np.inf, 0, 0], "<f4").tobytes()), "inf"),
    (gym.spaces.Discrete(3), pb.Tensor(int64=pb.Int64Array(values=[0, 3, 1])), "outside Discrete(3)"),
    (gym.spaces.Discrete(3), pb.Tensor(int64=pb.Int64Array(values=[0, -1, 1])), "outside"),
    (gym.spaces.Discrete(3), pb.Tensor(float32=pb.Float32Array(values=[0, 1.5, 1])), "not a whole number"),
    (gym.spaces.MultiDiscrete([2, 3]), pb.Tensor(int64=pb.Int64Array(values=[1, 2, 1, 3, 0, 0])), "outside"),
    (gym.spaces.MultiBinary(2), pb.Tensor(int64=pb.Int64Array(values=[0, 1, 2, 0, 1, 1])), "outside"),
    (gym.spaces.Box(0, 255, (2,), np.uint8), pb.Tensor(int64=pb.Int64Array(values=[0, 1, 256, 0, 1, 1])),
     "range of uint8"),
])
def test_malformed_batches_name_the_field(space: gym.Space[Any], tensor: pb.Tensor, fragment: str) -> None:
    with pytest.raises(MalformedData) as info:
        decode_batch(tensor, space, 3, "observations")
    assert info.value.field == "observations"
    assert str(info.value).startswith("observations: ")
    assert fragment in str(info.value)


def test_empty_final_observations_decode_to_zero_rows() -> None:
    space = gym.spaces.MultiDiscrete([2, 3])
    assert decode_batch(pb.Tensor(), space, 0, "final_observations").shape == (0, 2)


def test_rewards_and_flags() -> None:
    assert decode_floats([1.0, 2.5], 2, "rewards").dtype == np.float32
    with pytest.raises(MalformedData, match="rewards: 1 values; expected 2"):
        decode_floats([1.0], 2, "rewards")
    with pytest.raises(MalformedData, match="rewards: value at index 1 is inf"):
        decode_floats([1.0, float("inf")], 2, "rewards")
    assert decode_bools([True, False], 2, "terminated").tolist() == [True, False]
    with pytest.raises(MalformedData, match="terminated: 3 values"):
        decode_bools([True, False, True], 2, "terminated")


def spec_message(**changes: Any) -> pb.EnvironmentSpec:
    spec = spec_to_proto(EnvSpec(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), 8, "sim", "1"))
    for key, value in changes.items():
        if value is None:
            spec.ClearField(key)
        elif isinstance(value, pb.Space):
            getattr(spec, key).CopyFrom(value)
        else:
            setattr(spec, key, value)
    return spec


def test_spec_round_trip() -> None:
    spec = spec_from_proto(spec_message())
    assert spec.num_envs == 8 and spec.name == "sim" and spec.action_space == gym.spaces.Discrete(2)
    assert spec_from_proto(spec_message(protocol_version=0)).num_envs == 8, "0 (unset) reads as version 1"


@pytest.mark.parametrize(("sent", "read", "subsets"), [(0, 1, False), (1, 1, False), (2, 2, True)])
def test_protocol_version_tells_whether_subsets_are_stepped(sent: int, read: int, subsets: bool) -> None:
    spec = spec_from_proto(spec_message(protocol_version=sent))
    assert spec.protocol_version == read and spec.supports_env_subsets == subsets
    assert spec_to_proto(spec).protocol_version == read, "a server announces the version its spec holds"


@pytest.mark.parametrize(("changes", "field"), [
    ({"num_envs": 0}, "num_envs"),
    ({"num_envs": 5000}, "num_envs"),
    ({"protocol_version": 3}, "protocol_version"),
    ({"observation_space": None}, "observation_space"),
    ({"action_space": pb.Space()}, "action_space"),
    ({"action_space": pb.Space(discrete=pb.DiscreteSpace(n=0))}, "action_space"),
    ({"action_space": pb.Space(multi_discrete=pb.MultiDiscreteSpace(nvec=[2, 0]))}, "action_space"),
    ({"observation_space": pb.Space(box=pb.BoxSpace(shape=[3], low=[0, 0], high=[1]))}, "observation_space"),
    ({"observation_space": pb.Space(box=pb.BoxSpace(shape=[0], low=[0], high=[1]))}, "observation_space"),
    ({"observation_space": pb.Space(box=pb.BoxSpace(shape=[2], dtype="complex64", low=[0], high=[1]))},
     "observation_space"),
    ({"observation_space": pb.Space(box=pb.BoxSpace(shape=[2], low=[2], high=[1]))}, "observation_space"),
    ({"observation_space": pb.Space(box=pb.BoxSpace(shape=[2], low=[float("nan")], high=[1]))}, "observation_space"),
    ({"observation_space": pb.Space(box=pb.BoxSpace(shape=[2], dtype="int32", low=[float("-inf")], high=[1]))},
     "observation_space"),
    ({"observation_space": pb.Space(box=pb.BoxSpace(shape=[100_000, 1000], low=[0], high=[1]))},
     "observation_space"),
    ({"observation_space": pb.Space(multi_binary=pb.MultiBinarySpace())}, "observation_space"),
    # 2**62 * 4 wraps to 0 in numpy's int64 product; Python's ints count it
    ({"observation_space": pb.Space(box=pb.BoxSpace(shape=[2**62, 4], low=[0], high=[1]))}, "observation_space"),
    ({"observation_space": pb.Space(box=pb.BoxSpace(shape=[2] * 100_000, low=[0], high=[1]))}, "observation_space"),
])
def test_malformed_specs_are_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(MalformedData) as info:
        spec_from_proto(spec_message(**changes))
    assert info.value.field == field
    assert str(info.value).startswith(field) and len(str(info.value)) < 400, "a short message, even for a long shape"


def test_spaces_the_protocol_cannot_carry() -> None:
    for space in (gym.spaces.Dict({"a": gym.spaces.Discrete(2)}), gym.spaces.Discrete(3, start=1),
                  gym.spaces.Box(0, 1, (2,), dtype=np.float16)):
        with pytest.raises(ValueError):
            space_to_proto(space)



def test_typed_only_decoding_refuses_other_payloads() -> None:
    codec = BatchCodec(gym.spaces.Discrete(3))
    assert codec.decode(codec.encode(np.array([0, 2])), 2, "actions", typed_only=True).tolist() == [0, 2]
    as_floats = pb.Tensor(float32=pb.Float32Array(values=[0.0, 2.0]))
    as_raw = codec.encode(np.array([0, 2]), raw=True)
    for other in (as_floats, as_raw):
        assert codec.decode(other, 2, "observations").tolist() == [0, 2]  # observations may use any payload
        with pytest.raises(MalformedData, match=r"actions: .* payload; Discrete\(3\) values travel as the int64"):
            codec.decode(other, 2, "actions", typed_only=True)
    with pytest.raises(MalformedData, match="actions: no payload"):
        codec.decode(pb.Tensor(), 2, "actions", typed_only=True)


# ----------------------------------------------------------------------------------------------- action masks


def test_action_masks_round_trip_env_major() -> None:
    masks = np.array([[True, False, False], [False, True, True]])
    message = encode_action_masks(masks)
    assert message is not None and list(message.legal) == [True, False, False, False, True, True]
    decoded = decode_action_masks(message, gym.spaces.Discrete(3), 2)
    assert decoded is not None and decoded.dtype == bool
    np.testing.assert_array_equal(decoded, masks)


@pytest.mark.parametrize("space", SPACES, ids=str)
def test_no_action_masks_mean_every_action_is_legal(space: gym.Space[Any]) -> None:
    assert encode_action_masks(None) is None
    assert decode_action_masks(pb.ActionMasks(), space, 4) is None  # empty: accepted for every space
    assert decode_action_masks(pb.StepResponse().action_masks, space, 4) is None  # the field left unset


@pytest.mark.parametrize(("legal", "message"), [
    ([True] * 5, "action_masks: 5 flags; expected 6 (2 envs x 3 actions, env-major) or none"),
    ([True] * 7, "action_masks: 7 flags; expected 6"),
    ([True, False, True, False, False, False], "action_masks: env 1 has no legal action (all 3 flags false)"),
])
def test_malformed_action_masks_name_the_field(legal: list[bool], message: str) -> None:
    with pytest.raises(MalformedData, match=re.escape(message)) as info:
        decode_action_masks(pb.ActionMasks(legal=legal), gym.spaces.Discrete(3), 2)
    assert info.value.field == "action_masks"


@pytest.mark.parametrize("space", [s for s in SPACES if not isinstance(s, gym.spaces.Discrete)], ids=str)
def test_action_masks_are_refused_for_other_action_spaces(space: gym.Space[Any]) -> None:
    with pytest.raises(MalformedData, match="defined for Discrete action spaces only") as info:
        decode_action_masks(pb.ActionMasks(legal=[True] * 8), space, 2)
    assert info.value.field == "action_masks"
