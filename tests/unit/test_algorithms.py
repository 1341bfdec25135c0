"""rl_service.core.algorithms.registry: the registry against stable-baselines3, kwargs building and space checks.

Tests parametrised over ALGORITHMS cover any entry added to the registry without changes here.
"""

from __future__ import annotations

import inspect
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from rl_service.core.algorithms.hyperparams import LinearSchedule, format_value
from rl_service.core.algorithms.registry import (
    ACTIVATIONS,
    ALGORITHMS,
    SERVICE_KEYS,
    AlgorithmSpec,
    get_algorithm,
    to_sb3_value,
)
from rl_service.core.errors import InvalidHyperparameter, UnknownAlgorithm, UnsupportedSpace

KEYS = sorted(ALGORITHMS)
# Defaults the service deliberately sets differently from stable-baselines3 (documented in algorithms.py).
DOCUMENTED_OVERRIDES = {("dqn", "buffer_size"): 50_000}

CARTPOLE_SPACE = gym.spaces.Discrete(2)
BOX_ACTIONS = gym.spaces.Box(-2.0, 2.0, shape=(1,), dtype=np.float32)


@pytest.fixture(scope="module")
def cartpole() -> gym.Env[Any, Any]:
    env = gym.make("CartPole-v1")
    yield env
    env.close()


def _init_defaults(cls: type[Any]) -> dict[str, Any]:
    return {
        name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _tiny_values(key: str, **raw: str) -> dict[str, Any]:
    """Parsed values small enough to build a model quickly (small buffers, small rollouts)."""
    spec = ALGORITHMS[key]
    names = set(spec.schema.names)
    sizes = {"n_steps": "16", "batch_size": "8", "buffer_size": "100", "learning_starts": "0"}
    merged = {k: v for k, v in sizes.items() if k in names}
    merged.update(raw)
    return spec.schema.parse(merged)


# ------------------------------------------------------------------ registry vs stable-baselines3


def test_registry_is_not_empty_and_keys_are_lower_case() -> None:
    assert {"ppo", "a2c", "dqn"} <= set(ALGORITHMS)
    for key, spec in ALGORITHMS.items():
        assert key == key.lower() == spec.name.lower()
        assert isinstance(spec, AlgorithmSpec)


@pytest.mark.parametrize("key", KEYS)
def test_schema_defaults_match_sb3_signature(key: str) -> None:
    spec = ALGORITHMS[key]
    sb3 = _init_defaults(spec.cls)
    for name, default in spec.schema.defaults().items():
        if name in SERVICE_KEYS:
            continue
        assert name in sb3, f"{key}: {name} is not a keyword argument of {spec.cls.__name__}"
        expected = DOCUMENTED_OVERRIDES.get((key, name), sb3[name])
        assert default == expected, f"{key}.{name}: schema default {default!r}, expected {expected!r}"


def test_documented_overrides_really_differ_from_sb3() -> None:
    # If stable-baselines3 changes its default, the override list above needs a second look.
    for (key, name), value in DOCUMENTED_OVERRIDES.items():
        assert _init_defaults(ALGORITHMS[key].cls)[name] != value


@pytest.mark.parametrize("key", KEYS)
def test_service_keys_are_not_constructor_kwargs(key: str) -> None:
    spec = ALGORITHMS[key]
    kwargs = spec.constructor_kwargs(spec.schema.defaults())
    assert not (set(kwargs) & SERVICE_KEYS)
    assert set(kwargs) == (set(spec.schema.names) - SERVICE_KEYS) | {"policy_kwargs"}


@pytest.mark.parametrize("key", KEYS)
def test_every_default_parses_back_from_its_canonical_text(key: str) -> None:
    schema = ALGORITHMS[key].schema
    text = {name: format_value(value) for name, value in schema.defaults().items()}
    assert schema.parse(text) == schema.defaults()


@pytest.mark.parametrize("key", KEYS)
def test_defaults_pass_validation(key: str) -> None:
    spec = ALGORITHMS[key]
    spec.validate(spec.schema.defaults())
    spec.check_spaces(CARTPOLE_SPACE, spec.schema.defaults())


# ------------------------------------------------------------------ constructor_kwargs


@pytest.mark.parametrize("key", KEYS)
def test_constructor_kwargs_build_a_model_on_cartpole(key: str, cartpole: gym.Env[Any, Any]) -> None:
    spec = ALGORITHMS[key]
    values = _tiny_values(key, net_arch="16,8", activation_fn="relu", gamma="0.9")
    kwargs = spec.constructor_kwargs(values)
    assert kwargs["policy_kwargs"] == {"net_arch": [16, 8], "activation_fn": torch.nn.ReLU}
    model = spec.cls("MlpPolicy", cartpole, device="cpu", seed=0, verbose=0, **kwargs)
    assert model.gamma == 0.9
    assert model.device.type == "cpu"
    linears = [m for m in model.policy.modules() if isinstance(m, torch.nn.Linear)]
    assert any(m.out_features == 16 for m in linears)
    assert any(m.out_features == 8 for m in linears)
    assert any(isinstance(m, torch.nn.ReLU) for m in model.policy.modules())
    assert not any(isinstance(m, torch.nn.Tanh) for m in model.policy.modules())
    action, _ = model.predict(np.zeros(4, dtype=np.float32), deterministic=True)
    assert CARTPOLE_SPACE.contains(int(action))


@pytest.mark.parametrize("key", KEYS)
def test_constructor_kwargs_with_schema_defaults_build_a_model(key: str, cartpole: gym.Env[Any, Any]) -> None:
    spec = ALGORITHMS[key]
    kwargs = spec.constructor_kwargs(spec.schema.defaults())
    # stable-baselines3's own defaults: Tanh for actor-critic policies, ReLU for DQN's QNetwork.
    activation = torch.nn.ReLU if key == "dqn" else torch.nn.Tanh
    assert kwargs["policy_kwargs"] == {"net_arch": [64, 64], "activation_fn": activation}
    model = spec.cls("MlpPolicy", cartpole, device="cpu", verbose=0, **kwargs)
    assert model.learning_rate == spec.schema.defaults()["learning_rate"]


@pytest.mark.parametrize("key", KEYS)
def test_linear_schedule_becomes_a_callable(key: str, cartpole: gym.Env[Any, Any]) -> None:
    spec = ALGORITHMS[key]
    values = _tiny_values(key, learning_rate="lin_0.001")
    assert values["learning_rate"] == LinearSchedule(0.001)
    schedule = spec.constructor_kwargs(values)["learning_rate"]
    assert callable(schedule)
    assert schedule(1.0) == pytest.approx(0.001)
    assert schedule(0.5) == pytest.approx(0.0005)
    assert schedule(0.0) == pytest.approx(0.0)
    model = spec.cls("MlpPolicy", cartpole, device="cpu", verbose=0, **spec.constructor_kwargs(values))
    assert model.lr_schedule(1.0) == pytest.approx(0.001)
    assert model.lr_schedule(0.0) == pytest.approx(0.0)


def test_ppo_clip_range_schedule(cartpole: gym.Env[Any, Any]) -> None:
    spec = ALGORITHMS["ppo"]
    values = _tiny_values("ppo", clip_range="lin_0.3", clip_range_vf="lin_0.5")
    model = spec.cls("MlpPolicy", cartpole, device="cpu", verbose=0, **spec.constructor_kwargs(values))
    assert model.clip_range(1.0) == pytest.approx(0.3)
    assert model.clip_range(0.0) == pytest.approx(0.0)
    assert model.clip_range_vf(1.0) == pytest.approx(0.5)


def test_to_sb3_value() -> None:
    assert to_sb3_value((64, 32)) == [64, 32]
    assert to_sb3_value(None) is None
    assert to_sb3_value(0.5) == 0.5
    assert to_sb3_value(True) is True
    assert to_sb3_value("tanh") == "tanh"
    schedule = to_sb3_value(LinearSchedule(2.0))
    assert schedule(1.0) == pytest.approx(2.0)
    assert schedule(0.25) == pytest.approx(0.5)


def test_activations_match_choices() -> None:
    for spec in ALGORITHMS.values():
        param = next(p for p in spec.schema.params if p.name == "activation_fn")
        assert set(param.choices) == set(ACTIVATIONS)


# ------------------------------------------------------------------ get_algorithm


@pytest.mark.parametrize("key", KEYS)
def test_get_algorithm_is_case_insensitive(key: str) -> None:
    spec = ALGORITHMS[key]
    assert get_algorithm(key) is spec
    assert get_algorithm(key.upper()) is spec
    assert get_algorithm(f"  {spec.name.capitalize()} ") is spec


@pytest.mark.parametrize("name", ["SAC", "", "pp0", "ppo2"])
def test_get_algorithm_miss_lists_valid_names(name: str) -> None:
    with pytest.raises(UnknownAlgorithm) as info:
        get_algorithm(name)
    assert info.value.field == "algorithm"
    assert repr(name) in info.value.message
    for spec in ALGORITHMS.values():
        assert spec.name in info.value.message


# ------------------------------------------------------------------ spaces


def test_dqn_refuses_box_actions_of_pendulum() -> None:
    from rl_service.core.envs import env_spaces

    spaces = env_spaces("Pendulum-v1")
    assert isinstance(spaces.action_space, gym.spaces.Box)
    spec = get_algorithm("DQN")
    with pytest.raises(UnsupportedSpace) as info:
        spec.check_spaces(spaces.action_space, spec.schema.defaults())
    assert info.value.field == "env_id"
    assert info.value.message.startswith("env_id:")
    assert "Box" in info.value.message
    assert "Discrete" in info.value.message


@pytest.mark.parametrize("space", [
    gym.spaces.MultiDiscrete([2, 3]), gym.spaces.MultiBinary(3), BOX_ACTIONS,
])
def test_dqn_accepts_only_discrete(space: gym.Space[Any]) -> None:
    spec = ALGORITHMS["dqn"]
    spec.check_spaces(CARTPOLE_SPACE, spec.schema.defaults())
    with pytest.raises(UnsupportedSpace):
        spec.check_spaces(space, spec.schema.defaults())


@pytest.mark.parametrize("key", [k for k in KEYS if "use_sde" in ALGORITHMS[k].schema.names])
def test_use_sde_needs_box_actions(key: str) -> None:
    spec = ALGORITHMS[key]
    values = spec.schema.parse({"use_sde": "true"})
    with pytest.raises(InvalidHyperparameter) as info:
        spec.check_spaces(CARTPOLE_SPACE, values)
    assert info.value.field == "hyperparameters.use_sde"
    assert "Discrete" in info.value.message
    spec.check_spaces(BOX_ACTIONS, values)  # fine with a Box action space
    spec.check_spaces(CARTPOLE_SPACE, spec.schema.parse({"use_sde": "false"}))


@pytest.mark.parametrize("key", ["ppo", "a2c"])
def test_actor_critics_accept_every_action_space(key: str) -> None:
    spec = ALGORITHMS[key]
    for space in (CARTPOLE_SPACE, BOX_ACTIONS, gym.spaces.MultiDiscrete([2, 3]), gym.spaces.MultiBinary(2)):
        spec.check_spaces(space, spec.schema.defaults())


def test_reinforce_takes_categorical_and_gaussian_actions_only() -> None:
    spec = ALGORITHMS["reinforce"]
    for space in (CARTPOLE_SPACE, BOX_ACTIONS):
        spec.check_spaces(space, spec.schema.defaults())
    for space in (gym.spaces.MultiDiscrete([2, 3]), gym.spaces.MultiBinary(2)):
        with pytest.raises(UnsupportedSpace, match="REINFORCE"):
            spec.check_spaces(space, spec.schema.defaults())


# ------------------------------------------------------------------ cross-field validation


def test_ppo_batch_size_larger_than_rollout_refused() -> None:
    spec = ALGORITHMS["ppo"]
    with pytest.raises(InvalidHyperparameter) as info:
        spec.validate(spec.schema.parse({"n_steps": "64", "batch_size": "65"}))
    assert info.value.field == "hyperparameters.batch_size"
    assert "64" in info.value.message
    with pytest.raises(InvalidHyperparameter):
        spec.validate(spec.schema.parse({"n_steps": "32", "n_envs": "2", "batch_size": "65"}))


def test_ppo_batch_size_up_to_rollout_accepted() -> None:
    spec = ALGORITHMS["ppo"]
    spec.validate(spec.schema.parse({"n_steps": "64", "batch_size": "64"}))
    spec.validate(spec.schema.parse({"n_steps": "32", "n_envs": "2", "batch_size": "64"}))


@pytest.mark.parametrize("key", ["ppo", "a2c"])
def test_on_policy_needs_two_samples_per_rollout(key: str) -> None:
    spec = ALGORITHMS[key]
    raw = {"n_steps": "1", "batch_size": "2"} if key == "ppo" else {"n_steps": "1"}
    with pytest.raises(InvalidHyperparameter) as info:
        spec.validate(spec.schema.parse(raw))
    assert info.value.field == "hyperparameters.n_steps"
    spec.validate(spec.schema.parse({**raw, "n_envs": "2"}))


def test_dqn_validate_accepts_anything_parsed() -> None:
    spec = ALGORITHMS["dqn"]
    spec.validate(spec.schema.parse({"batch_size": "100000", "buffer_size": "10"}))
