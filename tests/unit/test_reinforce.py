"""REINFORCE: returns by hand, the loss by hand, episode splitting, and the SB3-compatible algorithm."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from rl_service.core.algorithms.networks import CategoricalPolicyNet, GaussianPolicyNet, build_policy_net
from rl_service.core.algorithms.reinforce import Reinforce
from rl_service.core.algorithms.reinforce_update import (
    Episode,
    discounted_returns,
    normalized_returns,
    reinforce_update,
)
from rl_service.core.errors import InvalidRequest, NonFiniteUpdate
from rl_service.core.policies.experience import SpaceShape, Transitions, split_episodes, validate_batch


def test_discounted_returns_by_hand() -> None:
    np.testing.assert_allclose(discounted_returns(np.array([1.0, 1.0, 1.0]), 0.5), [1.75, 1.5, 1.0])
    np.testing.assert_allclose(discounted_returns(np.array([0.0, 0.0, 2.0]), 0.9), [1.62, 1.8, 2.0])
    np.testing.assert_allclose(discounted_returns(np.array([3.0, -1.0]), 0.0), [3.0, -1.0])


def test_returns_are_normalised_within_each_episode() -> None:
    normalized = normalized_returns(np.array([1.75, 1.5, 1.0]))
    assert normalized.mean() == pytest.approx(0.0, abs=1e-12)
    assert normalized.std() == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_array_equal(normalized_returns(np.array([5.0])), [0.0])


def _net(seed: int = 0) -> CategoricalPolicyNet:
    torch.manual_seed(seed)
    net = build_policy_net(3, gym.spaces.Discrete(2), [8])
    assert isinstance(net, CategoricalPolicyNet)
    return net


def _episodes() -> list[Episode]:
    rng = np.random.default_rng(0)
    return [Episode(rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 2, size=n),
                    rng.uniform(size=n)) for n in (4, 2)]


def test_loss_matches_a_hand_computation() -> None:
    net, episodes, gamma, beta = _net(), _episodes(), 0.9, 0.1
    with torch.no_grad():
        logp_rows, advantages, entropies = [], [], []
        for ep in episodes:
            logits = net.logits(torch.as_tensor(ep.observations))
            log_softmax = torch.log_softmax(logits, dim=-1)
            logp_rows.append(log_softmax[torch.arange(len(ep)), torch.as_tensor(ep.actions)])
            entropies.append(-(log_softmax.exp() * log_softmax).sum(-1))
            returns = [sum(gamma ** k * r for k, r in enumerate(ep.rewards[t:])) for t in range(len(ep))]
            advantages.append(torch.as_tensor(normalized_returns(np.array(returns)), dtype=torch.float32))
        logp, adv, ent = torch.cat(logp_rows), torch.cat(advantages), torch.cat(entropies)
        expected_policy_loss = float(-(logp * adv).mean())
        expected = expected_policy_loss - beta * float(ent.mean())
    before = [p.detach().clone() for p in net.parameters()]
    stats = reinforce_update(net, torch.optim.Adam(net.parameters(), lr=0.01), episodes, gamma, beta)
    assert stats.loss == pytest.approx(expected, rel=1e-5)
    assert stats.policy_loss == pytest.approx(expected_policy_loss, rel=1e-5)
    assert stats.episodes == 2 and stats.steps == 6
    assert stats.mean_return == pytest.approx(np.mean([ep.rewards.sum() for ep in episodes]))
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True)), "one Adam step"


def test_non_finite_loss_changes_nothing() -> None:
    torch.manual_seed(0)
    net = build_policy_net(2, gym.spaces.Box(-np.inf, np.inf, (1,)), [4])
    assert isinstance(net, GaussianPolicyNet)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bad = Episode(np.zeros((2, 2), dtype=np.float32), np.array([[1e30], [0.0]], dtype=np.float32), np.ones(2))
    with pytest.raises(NonFiniteUpdate, match="loss"):
        reinforce_update(net, optimizer, [bad], 0.99, 0.1)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])
    assert not optimizer.state, "the optimizer took no step"


SHAPE = SpaceShape(observation_size=2, discrete_actions=3, action_size=1)


def test_split_into_episodes_with_a_tail() -> None:
    n = 6
    batch = validate_batch(SHAPE, np.arange(2 * n, dtype=np.float32), np.array([0, 1, 2, 0, 1, 2.0]),
                           np.arange(n, dtype=np.float64), np.array([0, 1, 0, 0, 1, 0], dtype=bool))
    episodes, tail = split_episodes(batch)
    assert [len(e) for e in episodes] == [2, 3] and len(tail) == 1
    np.testing.assert_array_equal(episodes[1].rewards, [2.0, 3.0, 4.0])
    np.testing.assert_array_equal(episodes[1].observations, [[4, 5], [6, 7], [8, 9]])
    np.testing.assert_array_equal(tail.states, [[10, 11]])
    joined = tail.concat(validate_batch(SHAPE, np.zeros(2, dtype=np.float32), np.array([1.0]), np.array([7.0]),
                                        np.array([True])))
    again, rest = split_episodes(joined)
    assert len(again) == 1 and len(rest) == 0
    np.testing.assert_array_equal(again[0].rewards, [5.0, 7.0])


def test_empty_transitions_split_to_nothing_and_join_neutrally() -> None:
    empty = Transitions.empty(SHAPE)
    episodes, tail = split_episodes(empty)
    assert len(empty) == 0 and episodes == [] and len(tail) == 0
    one = validate_batch(SHAPE, np.ones(2, dtype=np.float32), np.array([2.0]), np.array([1.0]), np.array([True]))
    joined = empty.concat(one)
    np.testing.assert_array_equal(joined.states, one.states)
    assert joined.actions.dtype == np.int64 and len(joined) == 1


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"rewards": np.zeros(0)}, "rewards"),
    ({"dones": np.zeros(3, dtype=bool)}, "dones"),
    ({"states": np.zeros(3, dtype=np.float32)}, "states"),
    ({"actions": np.array([0.0, 3.0])}, "actions"),
    ({"actions": np.array([0.0, 1.5])}, "actions"),
    ({"rewards": np.array([1.0, np.nan])}, "rewards"),
    ({"states": np.array([0, 0, np.inf, 0], dtype=np.float32)}, "states"),
])
def test_validate_batch_names_the_field(kwargs: dict[str, np.ndarray], field: str) -> None:
    args = {"states": np.zeros(4, dtype=np.float32), "actions": np.array([0.0, 1.0]), "rewards": np.ones(2),
            "dones": np.array([False, True])}
    args.update(kwargs)
    with pytest.raises(InvalidRequest) as info:
        validate_batch(SHAPE, args["states"], args["actions"], args["rewards"], args["dones"])
    assert info.value.field == field and field in info.value.message


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "FrozenLake-v1"])
def test_algorithm_learns_saves_and_loads_on_discrete_box_and_discrete_observation_envs(
        env_id: str, tmp_path: Path) -> None:
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env(env_id, n_envs=2, seed=0)
    model = Reinforce("MlpPolicy", env, seed=0, device="cpu", policy_kwargs={"net_arch": [16]})
    model.learn(600)
    assert model.num_timesteps >= 600 and model._n_updates > 0
    observations = np.stack([env.observation_space.sample() for _ in range(8)])
    expected, _ = model.predict(observations, deterministic=True)
    model.save(tmp_path / "model.zip")
    loaded = Reinforce.load(tmp_path / "model.zip", device="cpu")
    actual, _ = loaded.predict(observations, deterministic=True)
    np.testing.assert_array_equal(actual, expected)
    if isinstance(env.action_space, gym.spaces.Box):
        assert np.all(actual <= env.action_space.high) and np.all(actual >= env.action_space.low)
