"""rl_service.core.envs: id validation (no client-chosen imports), spaces, observation/action flattening."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from rl_service.core import envs
from rl_service.core.envs import (
    actions_to_flat,
    check_env_id,
    check_observation_space,
    env_spaces,
    flat_size,
    make_vec_env,
    observations_from_flat,
)
from rl_service.core.errors import (
    InvalidObservation,
    InvalidRequest,
    PermissionDenied,
    UnknownEnvironment,
    UnsupportedSpace,
)
from tests.support.envs import CRASH_ENV_ID

BOX4 = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)


# ------------------------------------------------------------------ check_env_id


@pytest.mark.parametrize("env_id", ["", "   ", "\t"])
def test_empty_env_id_refused(env_id: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_env_id(env_id)
    assert info.value.field == "env_id"
    assert "required" in info.value.message


def test_registered_ids_accepted() -> None:
    check_env_id("CartPole-v1")
    check_env_id("Pendulum-v1")
    check_env_id(CRASH_ENV_ID)


def test_unknown_id_suggests_close_matches() -> None:
    with pytest.raises(UnknownEnvironment) as info:
        check_env_id("CartPol-v1")
    assert info.value.field == "env_id"
    assert "'CartPol-v1'" in info.value.message
    assert "did you mean" in info.value.message
    assert "CartPole-v1" in info.value.message
    assert "CartPole-v0" in info.value.message


def test_unknown_id_without_close_match_has_no_hint() -> None:
    with pytest.raises(UnknownEnvironment) as info:
        check_env_id("Zzqxj-v9")
    assert "did you mean" not in info.value.message


def test_ids_are_case_sensitive() -> None:
    with pytest.raises(UnknownEnvironment):
        check_env_id("cartpole-v1")


@pytest.fixture
def trap_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """An importable module that leaves a marker file if anything imports it."""
    name = f"rl_service_trap_{uuid.uuid4().hex}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, marker


@pytest.mark.parametrize("template", ["{m}:Trap-v0", "{m}:CartPole-v1", "{m}:", ":{m}"])
def test_module_ids_refused_before_any_import(template: str, trap_module: tuple[str, Path]) -> None:
    name, marker = trap_module
    env_id = template.format(m=name)
    with pytest.raises(UnknownEnvironment) as info:
        check_env_id(env_id)
    assert info.value.field == "env_id"
    assert "module" in info.value.message
    assert not marker.exists()
    assert name not in sys.modules


def test_env_spaces_refuses_module_ids_without_calling_make(
    trap_module: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, marker = trap_module

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("gym.make must not be called for a module id")

    monkeypatch.setattr(envs.gym, "make", boom)
    with pytest.raises(UnknownEnvironment):
        env_spaces(f"{name}:Trap-v0")
    with pytest.raises(UnknownEnvironment):
        make_vec_env(f"{name}:Trap-v0", 1, 0)
    assert not marker.exists()
    assert name not in sys.modules


class _RecordingExternal:
    """An ExternalEnvironments that records the addresses it is asked about."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def spaces(self, address: str) -> envs.EnvSpaces:
        self.asked.append(address)
        return envs.EnvSpaces(BOX4, gym.spaces.Discrete(2), num_envs=3)

    def make_vec_env(self, address: str, n_envs: int, seed: int) -> Any:
        raise AssertionError("not used")


@pytest.mark.parametrize("env_id", ["grpc://127.0.0.1:50061", "unix:cartpole.sock", " UNIX:///run/sim.sock"])
def test_simulation_addresses_go_to_the_external_environments(env_id: str) -> None:
    # They hold ':' but are addresses, not module paths: routed before check_env_id could refuse them.
    assert envs.is_external_env(env_id)
    external = _RecordingExternal()
    assert env_spaces(env_id, external).num_envs == 3 and external.asked == [env_id]
    with pytest.raises(PermissionDenied, match="has none configured"):
        env_spaces(env_id)


def test_module_id_refused_even_when_module_already_registered_an_env() -> None:
    # "gymnasium.envs.classic_control:CartPole-v1" would be importable; it is refused all the same.
    with pytest.raises(UnknownEnvironment):
        check_env_id("gymnasium.envs.classic_control:CartPole-v1")


# ------------------------------------------------------------------ env_spaces


def test_env_spaces_of_cartpole() -> None:
    spaces = env_spaces("CartPole-v1")
    assert isinstance(spaces.observation_space, gym.spaces.Box)
    assert spaces.observation_space.shape == (4,)
    assert spaces.observation_space.dtype == np.float32
    assert spaces.action_space == gym.spaces.Discrete(2)
    assert env_spaces("CartPole-v1") is spaces  # cached


def test_env_spaces_of_crash_env() -> None:
    spaces = env_spaces(CRASH_ENV_ID)
    assert spaces.observation_space.shape == (2,)
    assert spaces.action_space == gym.spaces.Discrete(2)


def test_env_spaces_unknown_id() -> None:
    with pytest.raises(UnknownEnvironment):
        env_spaces("NoSuchEnvironment-v0")


def test_env_spaces_wraps_creation_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    env_id = f"rl_service/Broken{uuid.uuid4().hex[:8]}-v0"

    def broken(**kwargs: Any) -> gym.Env[Any, Any]:
        raise ImportError("box2d is not installed")

    gym.register(id=env_id, entry_point=broken)
    try:
        with pytest.raises(UnknownEnvironment) as info:
            env_spaces(env_id)
        assert "cannot be created" in info.value.message
        assert "box2d is not installed" in info.value.message
        assert info.value.field == "env_id"
    finally:
        del gym.registry[env_id]


@pytest.mark.parametrize("space", [
    gym.spaces.Dict({"a": gym.spaces.Discrete(2)}), gym.spaces.Tuple((gym.spaces.Discrete(2),)),
])
def test_unsupported_observation_spaces(space: gym.Space[Any]) -> None:
    with pytest.raises(UnsupportedSpace) as info:
        check_observation_space(space)
    assert info.value.field == "env_id"
    with pytest.raises(UnsupportedSpace):
        flat_size(space)


@pytest.mark.parametrize(("space", "size"), [
    (gym.spaces.Discrete(5), 1), (BOX4, 4), (gym.spaces.Box(0, 1, shape=(2, 3)), 6),
    (gym.spaces.MultiDiscrete([2, 3, 4]), 3), (gym.spaces.MultiBinary(5), 5), (gym.spaces.MultiBinary([2, 2]), 4),
])
def test_flat_size(space: gym.Space[Any], size: int) -> None:
    check_observation_space(space)
    assert flat_size(space) == size


# ------------------------------------------------------------------ observations_from_flat


def test_box_observations_are_batched() -> None:
    batch = observations_from_flat([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], BOX4, "observations")
    assert batch.shape == (2, 4)
    assert batch.dtype == np.float32
    np.testing.assert_allclose(batch[1], [0.5, 0.6, 0.7, 0.8], rtol=1e-6)


def test_box_observation_with_2d_shape() -> None:
    space = gym.spaces.Box(0, 1, shape=(2, 3), dtype=np.float64)
    batch = observations_from_flat(list(range(6)), space, "observation")
    assert batch.shape == (1, 2, 3)
    assert batch.dtype == np.float64
    assert batch[0, 1, 0] == 3.0


@pytest.mark.parametrize("values", [[], [1.0, 2.0, 3.0], [1.0] * 5, [1.0] * 7])
def test_wrong_size_refused(values: list[float]) -> None:
    with pytest.raises(InvalidObservation) as info:
        observations_from_flat(values, BOX4, "observation")
    assert info.value.field == "observation"
    assert info.value.message.startswith("observation:")
    assert f"got {len(values)} values" in info.value.message
    assert "4 per observation" in info.value.message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_refused(bad: float) -> None:
    with pytest.raises(InvalidObservation) as info:
        observations_from_flat([0.0, 0.0, 0.0, 0.0, 0.0, bad, 0.0, 0.0], BOX4, "observations")
    assert info.value.field == "observations"
    assert "index 5" in info.value.message
    assert "NaN and Inf are refused" in info.value.message


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_values_overflowing_the_box_dtype_refused() -> None:
    with pytest.raises(InvalidObservation):
        observations_from_flat([1e39, 0.0, 0.0, 0.0], BOX4, "observation")


def test_discrete_observations() -> None:
    space = gym.spaces.Discrete(5)
    batch = observations_from_flat([0, 3.0, 4], space, "observations")
    assert batch.shape == (3,)
    assert batch.dtype == np.int64
    assert batch.tolist() == [0, 3, 4]


@pytest.mark.parametrize("space", [gym.spaces.Discrete(5), gym.spaces.MultiDiscrete([3, 3]), gym.spaces.MultiBinary(2)])
def test_discrete_like_observations_must_be_whole_numbers(space: gym.Space[Any]) -> None:
    values = [0.5] * flat_size(space)
    with pytest.raises(InvalidObservation) as info:
        observations_from_flat(values, space, "observation")
    assert info.value.field == "observation"
    assert "whole numbers" in info.value.message
    assert type(space).__name__ in info.value.message


@pytest.mark.parametrize("value", [7, -1])
def test_discrete_observation_out_of_range_refused(value: int) -> None:
    with pytest.raises(InvalidObservation):
        observations_from_flat([value], gym.spaces.Discrete(5), "observation")


def test_multidiscrete_and_multibinary_shapes() -> None:
    md = observations_from_flat([1, 2, 0, 1], gym.spaces.MultiDiscrete([3, 3]), "observations")
    assert md.shape == (2, 2)
    assert md.tolist() == [[1, 2], [0, 1]]
    mb = observations_from_flat([1, 0, 1, 1, 0, 0], gym.spaces.MultiBinary(3), "observations")
    assert mb.shape == (2, 3)
    assert mb.dtype == np.int64


def test_accepts_numpy_input() -> None:
    batch = observations_from_flat(np.arange(4, dtype=np.float32), BOX4, "observation")
    assert batch.shape == (1, 4)


# ------------------------------------------------------------------ actions_to_flat


def test_actions_to_flat_discrete() -> None:
    flat, size = actions_to_flat(np.array([1, 0, 1]), gym.spaces.Discrete(2), 3)
    assert size == 1
    assert flat == [1.0, 0.0, 1.0]
    assert all(type(v) is float for v in flat)


def test_actions_to_flat_box() -> None:
    space = gym.spaces.Box(-2.0, 2.0, shape=(2,), dtype=np.float32)
    flat, size = actions_to_flat(np.array([[0.5, -0.5], [0.25, 1.0]], dtype=np.float32), space, 2)
    assert size == 2
    assert flat == [0.5, -0.5, 0.25, 1.0]


def test_actions_to_flat_single_pendulum_action() -> None:
    flat, size = actions_to_flat(np.array([[1.5]], dtype=np.float32), gym.spaces.Box(-2, 2, shape=(1,)), 1)
    assert (flat, size) == ([1.5], 1)


def test_actions_to_flat_multidiscrete() -> None:
    flat, size = actions_to_flat(np.array([[1, 2, 0]]), gym.spaces.MultiDiscrete([2, 3, 4]), 1)
    assert (flat, size) == ([1.0, 2.0, 0.0], 3)


def test_actions_to_flat_wrong_count_raises() -> None:
    with pytest.raises(ValueError):
        actions_to_flat(np.array([1, 0, 1]), gym.spaces.Discrete(2), 2)


# ------------------------------------------------------------------ make_vec_env


def test_make_vec_env() -> None:
    venv = make_vec_env("CartPole-v1", 2, seed=3)
    try:
        assert venv.num_envs == 2
        obs = venv.reset()
        assert obs.shape == (2, 4)
    finally:
        venv.close()


def test_make_vec_env_checks_id() -> None:
    with pytest.raises(UnknownEnvironment):
        make_vec_env("CartPol-v1", 1, seed=0)
