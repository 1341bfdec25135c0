"""Network sizes are counted from spaces and net_arch before anything is built, and the count is exact: it
matches what stable-baselines3 and the service's own networks build; past MAX_NETWORK_PARAMETERS a run or a
named policy is refused naming the field and the cap, and past MAX_POLICIES CreatePolicy is."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import pytest
import structlog
import torch

from rl_service.core.algorithms.network_size import check_run_network, run_network_parameters
from rl_service.core.algorithms.registry import get_algorithm
from rl_service.core.errors import CapacityExceeded, InvalidHyperparameter, InvalidRequest, UnsupportedSpace
from rl_service.core.policies.manager import PolicyManager
from rl_service.core.policies.records import PolicyConfig
from rl_service.core.policies.spec import PolicySpecRequest, build_spec, network_sizes, new_critic, new_net
from rl_service.core.runs.records import TrainingRequest
from rl_service.core.runs.requests import RequestLimits, validate_request
from tests.unit.test_named_policies import MemoryStore


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _built(algorithm: str, env_id: str, net_arch: tuple[int, ...]) -> tuple[int, gym.Env[Any, Any]]:
    spec = get_algorithm(algorithm)
    env = gym.make(env_id)
    values = {**spec.schema.defaults(), "net_arch": net_arch}
    if algorithm == "DQN":
        values["buffer_size"] = 10
    model = spec.cls("MlpPolicy", env, device="cpu", **spec.constructor_kwargs(values))
    network = model.q_net if algorithm == "DQN" else model.policy  # DQN's target network is a copy
    return _numel(network), env


@pytest.mark.parametrize(("algorithm", "env_id"), [
    ("PPO", "CartPole-v1"), ("PPO", "Pendulum-v1"), ("A2C", "FrozenLake-v1"), ("A2C", "MountainCarContinuous-v0"),
    ("DQN", "CartPole-v1"), ("DQN", "FrozenLake-v1"), ("REINFORCE", "CartPole-v1"), ("REINFORCE", "Pendulum-v1"),
])
def test_run_counts_match_what_stable_baselines3_builds(algorithm: str, env_id: str) -> None:
    built, env = _built(algorithm, env_id, (32, 16))
    assert run_network_parameters(algorithm, env.observation_space, env.action_space, (32, 16)) == built


@pytest.mark.parametrize("algorithm", ["reinforce", "ppo"])
@pytest.mark.parametrize("actions", [{"discrete_actions": 3}, {"box_shape": (2,)}])
def test_policy_counts_match_the_networks_built(algorithm: str, actions: dict[str, Any]) -> None:
    spec = build_spec(PolicySpecRequest(observation_shape=(3, 2), hyperparameters={"net_arch": "8,4"},
                                        algorithm=algorithm, seed=0, **actions))
    sizes = network_sizes(spec)
    assert sizes["actor"] == _numel(new_net(spec))
    critic = new_critic(spec)
    assert sizes.get("critic") == (None if critic is None else _numel(critic))


def test_a_run_over_the_cap_names_net_arch_and_the_cap() -> None:
    env = gym.make("CartPole-v1")
    with pytest.raises(InvalidHyperparameter) as info:
        check_run_network("PPO", env.observation_space, env.action_space, (4096, 4096), 10_000_000)
    assert info.value.field == "hyperparameters.net_arch"
    assert "10,000,000 (MAX_NETWORK_PARAMETERS)" in info.value.message


def test_a_run_whose_spaces_alone_pass_the_cap_names_env_id() -> None:
    space = gym.spaces.Box(-1, 1, shape=(1_000_000,))
    with pytest.raises(UnsupportedSpace) as info:
        check_run_network("PPO", space, gym.spaces.Discrete(2), (64,), 1_000_000)
    assert info.value.field == "env_id" and "MAX_NETWORK_PARAMETERS" in info.value.message


def test_start_training_validation_applies_the_cap() -> None:
    request = TrainingRequest(algorithm="PPO", env_id="CartPole-v1", total_timesteps=1000,
                              hyperparameters={"net_arch": "256,256"})
    validate_request(request, RequestLimits(max_network_parameters=200_000), None)
    with pytest.raises(InvalidHyperparameter) as info:
        validate_request(request, RequestLimits(max_network_parameters=100_000), None)
    assert info.value.field == "hyperparameters.net_arch"


def _manager(**config: Any) -> PolicyManager:
    return PolicyManager(MemoryStore(), PolicyConfig(**config), structlog.get_logger())


def test_create_policy_over_the_parameter_cap_is_refused_naming_net_arch() -> None:
    manager = _manager(max_network_parameters=100_000)
    request = PolicySpecRequest(observation_shape=(1000,), discrete_actions=2, hyperparameters={"net_arch": "64"})
    manager.create("fits", request)
    with pytest.raises(InvalidHyperparameter) as info:
        manager.create("wide", PolicySpecRequest(observation_shape=(1000,), discrete_actions=2,
                                                 hyperparameters={"net_arch": "512"}))
    assert info.value.field == "spec.hyperparameters.net_arch" and "100,000" in info.value.message
    with pytest.raises(InvalidRequest) as info:
        manager.create("huge", PolicySpecRequest(observation_shape=(1000, 1000), discrete_actions=2))
    assert info.value.field == "spec.observation_shape"
    assert [s.policy_id for s in manager.list_policies()] == ["fits"]


def test_the_refusal_names_the_network_over_the_cap() -> None:
    # Actor 11,220 parameters (10 outputs), critic 11,121 (one): only the actor passes the cap.
    manager = _manager(max_network_parameters=11_200)
    with pytest.raises(InvalidHyperparameter, match="actor"):
        manager.create("p", PolicySpecRequest(observation_shape=(100,), discrete_actions=10, algorithm="ppo",
                                              hyperparameters={"net_arch": "100,10"}))


def test_create_policy_past_max_policies_is_resource_exhausted() -> None:
    manager = _manager(max_policies=2)
    request = PolicySpecRequest(observation_shape=(2,), discrete_actions=2, seed=1)
    manager.create("a", request)
    manager.create("b", request)
    with pytest.raises(CapacityExceeded, match=r"MAX_POLICIES=2"):
        manager.create("c", request)
    assert not manager.create("a", request).created  # the same spec again stays a no-op at the cap
    manager.delete("a")
    assert manager.create("c", request).created


@pytest.mark.parametrize("shape", [(2,) * 64, (2**32, 2**32), (3,) * 41])
def test_shapes_whose_product_overflows_int64_are_refused(shape: tuple[int, ...]) -> None:
    # numpy's int64 product wraps around: [2] * 64 once counted as 0 observation values and was accepted.
    with pytest.raises(InvalidRequest) as info:
        build_spec(PolicySpecRequest(observation_shape=shape, discrete_actions=2))
    assert info.value.field == "spec.observation_shape"
    with pytest.raises(InvalidRequest) as info:
        build_spec(PolicySpecRequest(observation_shape=(2,), box_shape=shape))
    assert info.value.field == "spec.box.shape"


@pytest.mark.parametrize("algorithm", ["SAC", "TD3", "DDPG", "TQC", "QRDQN"])
def test_new_algorithms_count_what_the_library_builds(algorithm: str) -> None:
    spec = get_algorithm(algorithm)
    env = gym.make("CartPole-v1" if algorithm == "QRDQN" else "Pendulum-v1")
    values = {**spec.schema.defaults(), "net_arch": (32, 16), "buffer_size": 10}
    model = spec.cls("MlpPolicy", env, device="cpu", **spec.constructor_kwargs(values, env.action_space))
    if algorithm == "QRDQN":
        live = _numel(model.quantile_net)  # its target is a copy
    else:  # the live actor and critics, not their target copies
        live = _numel(model.policy.actor) + _numel(model.policy.critic)
    assert run_network_parameters(algorithm, env.observation_space, env.action_space, (32, 16)) == live


@pytest.mark.parametrize(("algorithm", "options"), [
    ("QRDQN", {"n_quantiles": 10}),
    ("TQC", {"n_quantiles": 5, "n_critics": 3}),
])
def test_quantile_options_are_counted_as_built(algorithm: str, options: dict[str, int]) -> None:
    # rl-baselines3-zoo trains QR-DQN on CartPole with 10 quantiles, not sb3-contrib's 200.
    spec = get_algorithm(algorithm)
    env = gym.make("CartPole-v1" if algorithm == "QRDQN" else "Pendulum-v1")
    values = {**spec.schema.defaults(), **spec.schema.parse({k: str(v) for k, v in options.items()}),
              "net_arch": (32, 16), "buffer_size": 10}
    model = spec.cls("MlpPolicy", env, device="cpu", **spec.constructor_kwargs(values, env.action_space))
    if algorithm == "QRDQN":
        live = _numel(model.quantile_net)
        assert model.policy.n_quantiles == 10
    else:
        live = _numel(model.policy.actor) + _numel(model.policy.critic)
        assert model.policy.critic.n_critics == 3
    assert run_network_parameters(algorithm, env.observation_space, env.action_space, (32, 16), values) == live
    assert live != run_network_parameters(algorithm, env.observation_space, env.action_space, (32, 16))
