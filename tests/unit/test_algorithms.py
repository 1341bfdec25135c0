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
from rl_service.core.algorithms.normalize import NormalizeOptions
from rl_service.core.algorithms.registry import (
    ACTIVATIONS,
    ALGORITHMS,
    POLICY_KEYS,
    SERVICE_KEYS,
    AlgorithmSpec,
    get_algorithm,
    to_sb3_value,
)
from rl_service.core.algorithms.schemas import DEFAULT_BUFFER_SIZE, MAX_BUFFER_SIZE
from rl_service.core.errors import InvalidHyperparameter, UnknownAlgorithm, UnsupportedSpace

KEYS = sorted(ALGORITHMS)
# Defaults the service deliberately sets differently from its libraries (documented in schemas.py): every replay
# buffer holds 50k transitions by default, not 1M.
DOCUMENTED_OVERRIDES = {(key, "buffer_size"): DEFAULT_BUFFER_SIZE for key in KEYS
                        if "buffer_size" in ALGORITHMS[key].schema.names}
# Actions on Box spaces only (continuous control), checked on Pendulum-v1 rather than CartPole-v1.
CONTINUOUS = {"sac", "td3", "ddpg", "tqc"}

CARTPOLE_SPACE = gym.spaces.Discrete(2)
BOX_ACTIONS = gym.spaces.Box(-2.0, 2.0, shape=(1,), dtype=np.float32)


@pytest.fixture(scope="module")
def cartpole() -> gym.Env[Any, Any]:
    env = gym.make("CartPole-v1")
    yield env
    env.close()


@pytest.fixture(scope="module")
def pendulum() -> gym.Env[Any, Any]:
    env = gym.make("Pendulum-v1")
    yield env
    env.close()


@pytest.fixture
def env_for(cartpole: gym.Env[Any, Any], pendulum: gym.Env[Any, Any]) -> Any:
    """An environment the algorithm can act in: Pendulum-v1 (Box actions) or CartPole-v1 (Discrete)."""
    return lambda key: pendulum if key in CONTINUOUS else cartpole


def _space_for(key: str) -> gym.Space[Any]:
    return BOX_ACTIONS if key in CONTINUOUS else CARTPOLE_SPACE


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
    assert {"ppo", "a2c", "dqn", "sac", "td3", "ddpg", "tqc", "qrdqn", "trpo", "maskableppo"} <= set(ALGORITHMS)
    for key, spec in ALGORITHMS.items():
        assert key == key.lower() == spec.name.lower()
        assert isinstance(spec, AlgorithmSpec)


@pytest.mark.parametrize("key", KEYS)
def test_schema_defaults_match_sb3_signature(key: str) -> None:
    spec = ALGORITHMS[key]
    sb3 = _init_defaults(spec.cls)
    policy = _init_defaults(spec.cls.policy_aliases["MlpPolicy"]) if key != "reinforce" else {}
    for name, default in spec.schema.defaults().items():
        if name in SERVICE_KEYS:
            continue
        if name in POLICY_KEYS:  # the policy class's keyword, passed in policy_kwargs
            assert default == policy[name], f"{key}.{name}: schema default {default!r}, policy's {policy[name]!r}"
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
    assert set(kwargs) == (set(spec.schema.names) - SERVICE_KEYS - POLICY_KEYS) | {"policy_kwargs"}
    assert set(kwargs["policy_kwargs"]) == {"net_arch", "activation_fn"} | (POLICY_KEYS & set(spec.schema.names))


def test_top_quantiles_must_leave_some_quantiles() -> None:
    spec = ALGORITHMS["tqc"]
    values = {**spec.schema.defaults(), **spec.schema.parse({"n_quantiles": "3", "top_quantiles_to_drop_per_net": "3"})}
    with pytest.raises(InvalidHyperparameter) as info:
        spec.validate(values)
    assert info.value.field == "hyperparameters.top_quantiles_to_drop_per_net"
    assert "n_quantiles = 3" in str(info.value)


@pytest.mark.parametrize("key", KEYS)
def test_every_default_parses_back_from_its_canonical_text(key: str) -> None:
    schema = ALGORITHMS[key].schema
    text = {name: format_value(value) for name, value in schema.defaults().items()}
    assert schema.parse(text) == schema.defaults()


@pytest.mark.parametrize("key", KEYS)
def test_defaults_pass_validation(key: str) -> None:
    spec = ALGORITHMS[key]
    spec.validate(spec.schema.defaults())
    spec.check_spaces(_space_for(key), spec.schema.defaults())


# ------------------------------------------------------------------ constructor_kwargs


@pytest.mark.parametrize("key", KEYS)
def test_constructor_kwargs_build_a_model(key: str, env_for: Any) -> None:
    spec = ALGORITHMS[key]
    env = env_for(key)
    values = _tiny_values(key, net_arch="16,8", activation_fn="relu", gamma="0.9")
    kwargs = spec.constructor_kwargs(values)
    policy_options = {name: values[name] for name in POLICY_KEYS & set(values)}  # at their defaults here
    assert kwargs["policy_kwargs"] == {"net_arch": [16, 8], "activation_fn": torch.nn.ReLU, **policy_options}
    model = spec.cls("MlpPolicy", env, device="cpu", seed=0, verbose=0, **kwargs)
    assert model.gamma == 0.9
    assert model.device.type == "cpu"
    linears = [m for m in model.policy.modules() if isinstance(m, torch.nn.Linear)]
    assert any(m.out_features == 16 for m in linears)
    assert any(m.out_features == 8 for m in linears)
    assert any(isinstance(m, torch.nn.ReLU) for m in model.policy.modules())
    # TD3's and DDPG's actors (and their target copies) end in a Tanh squashing the output into the bounds; no
    # hidden layer is Tanh.
    squashes = 2 if key in ("td3", "ddpg") else 0
    assert sum(isinstance(m, torch.nn.Tanh) for m in model.policy.modules()) == squashes
    action, _ = model.predict(env.observation_space.sample() * 0, deterministic=True)
    assert env.action_space.contains(action if key in CONTINUOUS else int(action))


# The libraries' own networks: shape and activation where the service's schema leaves them at their default.
LIBRARY_NETWORKS = {"dqn": ([64, 64], torch.nn.ReLU), "qrdqn": ([64, 64], torch.nn.ReLU),
                    "sac": ([256, 256], torch.nn.ReLU), "tqc": ([256, 256], torch.nn.ReLU),
                    "td3": ([400, 300], torch.nn.ReLU), "ddpg": ([400, 300], torch.nn.ReLU)}


@pytest.mark.parametrize("key", KEYS)
def test_constructor_kwargs_with_schema_defaults_build_a_model(key: str, env_for: Any) -> None:
    spec = ALGORITHMS[key]
    kwargs = spec.constructor_kwargs(spec.schema.defaults())
    # Tanh and 64,64 for the actor-critic policies, as in stable-baselines3; the off-policy ones as above.
    layers, activation = LIBRARY_NETWORKS.get(key, ([64, 64], torch.nn.Tanh))
    defaults = spec.schema.defaults()
    policy_options = {name: defaults[name] for name in POLICY_KEYS & set(defaults)}
    assert kwargs["policy_kwargs"] == {"net_arch": layers, "activation_fn": activation, **policy_options}
    model = spec.cls("MlpPolicy", env_for(key), device="cpu", verbose=0, **kwargs)
    assert model.learning_rate == spec.schema.defaults()["learning_rate"]


@pytest.mark.parametrize("key", KEYS)
def test_linear_schedule_becomes_a_callable(key: str, env_for: Any) -> None:
    spec = ALGORITHMS[key]
    values = _tiny_values(key, learning_rate="lin_0.001")
    assert values["learning_rate"] == LinearSchedule(0.001)
    schedule = spec.constructor_kwargs(values)["learning_rate"]
    assert callable(schedule)
    assert schedule(1.0) == pytest.approx(0.001)
    assert schedule(0.5) == pytest.approx(0.0005)
    assert schedule(0.0) == pytest.approx(0.0)
    model = spec.cls("MlpPolicy", env_for(key), device="cpu", verbose=0, **spec.constructor_kwargs(values))
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


@pytest.mark.parametrize(("name", "key"), [("QR-DQN", "qrdqn"), ("qr_dqn", "qrdqn"), ("Maskable-PPO", "maskableppo"),
                                         ("MaskablePPO", "maskableppo"), ("tqc", "tqc")])
def test_get_algorithm_takes_hyphenated_names(name: str, key: str) -> None:
    assert get_algorithm(name) is ALGORITHMS[key]


@pytest.mark.parametrize("name", ["SAC2", "", "pp0", "ppo2", "her"])
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
    if key in CONTINUOUS:  # Box actions only anyway: the space itself is refused first
        with pytest.raises(UnsupportedSpace):
            spec.check_spaces(CARTPOLE_SPACE, values)
        spec.check_spaces(BOX_ACTIONS, values)
        return
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


# ------------------------------------------------------------------ the algorithms of the learning-breadth issue

# Each algorithm's action spaces, from its library's supported_action_spaces.
EXPECTED_SPACES: dict[str, set[type]] = {
    "sac": {gym.spaces.Box}, "td3": {gym.spaces.Box}, "ddpg": {gym.spaces.Box}, "tqc": {gym.spaces.Box},
    "qrdqn": {gym.spaces.Discrete},
    "trpo": {gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary},
    "maskableppo": {gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary},
}
ALL_SPACES: dict[type, gym.Space[Any]] = {gym.spaces.Box: BOX_ACTIONS, gym.spaces.Discrete: CARTPOLE_SPACE,
                                          gym.spaces.MultiDiscrete: gym.spaces.MultiDiscrete([2, 3]),
                                          gym.spaces.MultiBinary: gym.spaces.MultiBinary(3)}


@pytest.mark.parametrize("key", sorted(EXPECTED_SPACES))
def test_action_spaces_match_the_library(key: str) -> None:
    spec = ALGORITHMS[key]
    assert set(spec.action_spaces) == EXPECTED_SPACES[key]
    model_spaces = getattr(spec.cls, "supported_action_spaces", None)  # not a class attribute in SB3: see __init__
    assert model_spaces is None or set(model_spaces) == EXPECTED_SPACES[key]
    for space_type, space in ALL_SPACES.items():
        if space_type in EXPECTED_SPACES[key]:
            spec.check_spaces(space, spec.schema.defaults())
        else:
            with pytest.raises(UnsupportedSpace) as info:
                spec.check_spaces(space, spec.schema.defaults())
            assert info.value.field == "env_id" and spec.name in info.value.message


def test_every_replay_buffer_is_capped_and_defaults_small() -> None:
    off_policy = [k for k in KEYS if "buffer_size" in ALGORITHMS[k].schema.names]
    assert set(off_policy) == {"dqn", "qrdqn", "sac", "td3", "ddpg", "tqc"}
    for key in off_policy:
        param = next(p for p in ALGORITHMS[key].schema.params if p.name == "buffer_size")
        assert param.default == DEFAULT_BUFFER_SIZE and param.high == MAX_BUFFER_SIZE
        with pytest.raises(InvalidHyperparameter) as info:
            ALGORITHMS[key].schema.parse({"buffer_size": str(MAX_BUFFER_SIZE + 1)})
        assert info.value.field == "hyperparameters.buffer_size"


@pytest.mark.parametrize("key", [k for k in KEYS if "gradient_steps" in ALGORITHMS[k].schema.names])
def test_off_policy_refuses_zero_gradient_steps(key: str) -> None:
    spec = ALGORITHMS[key]
    with pytest.raises(InvalidHyperparameter) as info:
        spec.validate(spec.schema.parse({"gradient_steps": "0"}))
    assert info.value.field == "hyperparameters.gradient_steps"
    spec.validate(spec.schema.parse({"gradient_steps": "-1"}))


@pytest.mark.parametrize("key", KEYS)
def test_every_algorithm_takes_the_service_keys(key: str) -> None:
    schema = ALGORITHMS[key].schema
    assert {"normalize", "eval_freq", "n_eval_episodes", "stop_at_reward"} <= set(schema.names)
    defaults = schema.defaults()
    assert defaults["eval_freq"] == 0 and defaults["n_eval_episodes"] == 5 and defaults["stop_at_reward"] is None
    assert defaults["normalize"] == NormalizeOptions()


@pytest.mark.parametrize("key", KEYS)
def test_stop_at_reward_needs_evaluations(key: str) -> None:
    spec = ALGORITHMS[key]
    tiny = {k: v for k, v in {"n_steps": "16", "batch_size": "8"}.items() if k in spec.schema.names}
    with pytest.raises(InvalidHyperparameter) as info:
        spec.validate(spec.schema.parse({**tiny, "stop_at_reward": "100"}))
    assert info.value.field == "hyperparameters.stop_at_reward" and "eval_freq" in info.value.message
    spec.validate(spec.schema.parse({**tiny, "stop_at_reward": "-100.5", "eval_freq": "1000"}))


@pytest.mark.parametrize(("key", "raw"), [("eval_freq", "-1"), ("eval_freq", "1.5"), ("n_eval_episodes", "0"),
                                          ("n_eval_episodes", "101"), ("stop_at_reward", "nan"),
                                          ("stop_at_reward", "inf"), ("normalize", "maybe")])
def test_bad_service_values_name_their_key(key: str, raw: str) -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        ALGORITHMS["ppo"].schema.parse({key: raw})
    assert info.value.field == f"hyperparameters.{key}"


def test_normalized_observations_need_a_box_observation_space() -> None:
    spec = ALGORITHMS["ppo"]
    discrete_obs = gym.spaces.Discrete(16)
    for text in ("true", "obs", '{"norm_reward": false}'):
        with pytest.raises(InvalidHyperparameter) as info:
            spec.check_spaces(CARTPOLE_SPACE, spec.schema.parse({"normalize": text}), discrete_obs)
        assert info.value.field == "hyperparameters.normalize" and "Discrete" in info.value.message
    # Rewards alone normalise in any observation space.
    spec.check_spaces(CARTPOLE_SPACE, spec.schema.parse({"normalize": '{"norm_obs": false}'}), discrete_obs)


@pytest.mark.parametrize(("noise", "cls"), [("normal", "NormalActionNoise"),
                                            ("ornstein-uhlenbeck", "OrnsteinUhlenbeckActionNoise")])
def test_action_noise_is_built_for_the_action_space(noise: str, cls: str, pendulum: gym.Env[Any, Any]) -> None:
    spec = ALGORITHMS["td3"]
    values = spec.schema.parse({"action_noise": noise, "action_noise_std": "0.3", "buffer_size": "100"})
    kwargs = spec.constructor_kwargs(values, pendulum.action_space)
    assert type(kwargs["action_noise"]).__name__ == cls
    assert np.allclose(kwargs["action_noise"]._sigma, [0.3])
    model = spec.cls("MlpPolicy", pendulum, device="cpu", verbose=0, **kwargs)
    assert model.action_noise is kwargs["action_noise"]
    assert "action_noise" not in spec.constructor_kwargs(spec.schema.parse({}), pendulum.action_space)


@pytest.mark.parametrize("key", ["sac", "tqc"])
def test_entropy_keys_take_auto_or_a_number(key: str) -> None:
    schema = ALGORITHMS[key].schema
    assert schema.defaults()["ent_coef"] == "auto" and schema.defaults()["target_entropy"] == "auto"
    assert schema.parse({"ent_coef": "AUTO", "target_entropy": "-2.5"}) | {} == {
        **schema.defaults(), "target_entropy": -2.5}
    assert schema.parse({"ent_coef": "0.05"})["ent_coef"] == 0.05
    with pytest.raises(InvalidHyperparameter, match='"auto"'):
        schema.parse({"ent_coef": "auto_0.1x"})
