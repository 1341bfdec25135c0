"""PPO named policies in core: spec, GAE, the update, behaviour policies, bad input, state round trips."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import structlog
import torch

from rl_service.core.algorithms.ppo_update import PpoBatch, PpoSettings, ValueNet, gae, ppo_update
from rl_service.core.errors import InvalidHyperparameter, InvalidRequest, ModelNotReady, NonFiniteUpdate
from rl_service.core.policies.manager import PolicyManager
from rl_service.core.policies.records import PolicyConfig
from rl_service.core.policies.spec import PolicySpec, PolicySpecRequest, build_spec, new_critic, new_net
from rl_service.core.policies.state_codec import STATE_FORMAT, STATE_FORMAT_V2
from tests.unit.test_named_policies import MemoryStore


def _manager(store: MemoryStore, versions_kept: int = 4) -> PolicyManager:
    return PolicyManager(store, PolicyConfig(versions_kept=versions_kept), structlog.get_logger())


def _ppo(manager: PolicyManager, policy_id: str = "p", **hp: str) -> None:
    manager.create(policy_id, PolicySpecRequest((4,), discrete_actions=2, seed=0, algorithm="ppo",
                                                hyperparameters={"n_epochs": "2", "batch_size": "4", **hp}))


def _arrays(seed: int, n: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    dones = np.zeros(n, dtype=bool)
    dones[n // 2] = True
    return (rng.normal(size=n * 4).astype(np.float32), rng.integers(0, 2, size=n).astype(np.float64),
            np.ones(n), dones)


def _weights(manager: PolicyManager, policy_id: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(manager.model(policy_id, torchscript=False)[1])


def test_the_spec_defaults_are_stable_baselines3_ones_and_reinforce_specs_keep_their_identity() -> None:
    spec = build_spec(PolicySpecRequest((4,), discrete_actions=2, seed=0, algorithm="PPO"))
    assert spec.algorithm == "ppo" and spec.is_ppo
    assert dict(spec.hyperparameters) == {
        "activation_fn": "tanh", "batch_size": "64", "clip_range": "0.2", "ent_coef": "0.0", "gae_lambda": "0.95",
        "gamma": "0.99", "learning_rate": "0.0003", "log_std_init": "0.0", "max_grad_norm": "0.5",
        "n_epochs": "10", "net_arch": "64,64", "normalize_advantage": "true", "target_kl": "none",
        "vf_coef": "0.5"}
    assert PolicySpec.from_json(spec.to_json()) == spec
    reinforce = build_spec(PolicySpecRequest((4,), discrete_actions=2, seed=0))
    assert reinforce.algorithm == "reinforce" and "algorithm" not in reinforce.to_json()
    assert new_critic(reinforce) is None


def test_an_unknown_algorithm_or_a_reinforce_only_key_is_refused_by_field() -> None:
    with pytest.raises(InvalidRequest) as caught:
        build_spec(PolicySpecRequest((4,), discrete_actions=2, algorithm="sac"))
    assert caught.value.field == "spec.algorithm"
    with pytest.raises(InvalidHyperparameter) as hp:
        build_spec(PolicySpecRequest((4,), discrete_actions=2, algorithm="ppo", hyperparameters={"beta": "0.1"}))
    assert hp.value.field == "spec.hyperparameters.beta"


def test_gae_bootstraps_cut_and_truncated_ends_and_not_terminated_ones() -> None:
    rewards = np.array([1.0, 1.0, 1.0, 1.0])
    values = np.array([0.5, 0.5, 0.5, 0.5])
    dones = np.array([False, True, True, False])
    truncated = np.array([False, False, True, False])
    advantages = gae(rewards, values, dones, truncated, gamma=0.9, lam=1.0)
    # t=1 terminated: delta = 1 - 0.5; t=0 continues into it.
    assert advantages[1] == pytest.approx(0.5)
    assert advantages[0] == pytest.approx((1 + 0.9 * 0.5 - 0.5) + 0.9 * 0.5)
    # t=2 truncated and t=3 cut by the batch's end: bootstrapped with their own state's value.
    assert advantages[2] == pytest.approx(1 + 0.9 * 0.5 - 0.5)
    assert advantages[3] == pytest.approx(1 + 0.9 * 0.5 - 0.5)


def test_the_update_corrects_for_an_older_behaviour_policy_and_reports_its_metrics() -> None:
    spec = build_spec(PolicySpecRequest((4,), discrete_actions=2, seed=0, algorithm="ppo"))
    actor, critic = new_net(spec), new_critic(spec)
    assert isinstance(critic, ValueNet)
    optimizer = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=1e-2)
    states, actions, rewards, dones = _arrays(0, n=32)
    # Behaviour log-probs far from the current policy: the ratio is clipped for many of them.
    batch = PpoBatch(states.reshape(32, 4), actions.astype(np.int64), rewards, dones, np.zeros(32, dtype=bool),
                     np.full(32, np.log(0.2), dtype=np.float32))
    stats = ppo_update(actor, critic, optimizer, batch, PpoSettings(n_epochs=3, batch_size=8),
                       torch.Generator().manual_seed(0))
    assert stats.steps == 32 and stats.episodes == 1 and stats.mean_return == 17.0
    assert stats.clip_fraction is not None and stats.clip_fraction > 0.5
    for value in (stats.value_loss, stats.approx_kl, stats.explained_variance, stats.policy_loss, stats.entropy):
        assert value is not None and np.isfinite(value)


def test_a_non_finite_step_late_in_the_update_leaves_every_tensor_as_it_was() -> None:
    spec = build_spec(PolicySpecRequest((4,), discrete_actions=2, seed=0, algorithm="ppo"))
    actor, critic = new_net(spec), new_critic(spec)
    assert critic is not None
    optimizer = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=1e-2)
    states, actions, rewards, dones = _arrays(0, n=16)
    rewards[-1] = 1e39  # float32 overflow: the minibatch holding it has an Inf value loss
    before = ({k: v.clone() for k, v in actor.state_dict().items()},
              {k: v.clone() for k, v in critic.state_dict().items()})
    batch = PpoBatch(states.reshape(16, 4), actions.astype(np.int64), rewards, dones, np.zeros(16, dtype=bool),
                     np.full(16, np.log(0.5), dtype=np.float32))
    with pytest.raises(NonFiniteUpdate):
        ppo_update(actor, critic, optimizer, batch, PpoSettings(n_epochs=2, batch_size=4),
                   torch.Generator().manual_seed(0))
    for key, value in actor.state_dict().items():
        assert torch.equal(value, before[0][key])
    for key, value in critic.state_dict().items():
        assert torch.equal(value, before[1][key])
    assert not optimizer.state


def test_a_ppo_batch_trains_on_every_transition_and_holds_none() -> None:
    manager = _manager(MemoryStore())
    _ppo(manager)
    states, actions, rewards, dones = _arrays(1)
    dones[:] = False  # no episode ends: still one update (the cut end is bootstrapped)
    outcome = manager.send_batch("p", states, actions, rewards, dones)
    assert outcome.updated and outcome.version == 1 and outcome.pending_steps == 0
    assert outcome.metrics is not None and outcome.metrics.steps == 8 and outcome.metrics.episodes == 0
    log_probs, entropies, values, version = manager.log_prob("p", states, actions)
    assert version == 1 and values.shape == (8,) and log_probs.shape == entropies.shape == (8,)


def test_behaviour_versions_kept_are_used_others_refused_and_the_policy_unchanged() -> None:
    manager = _manager(MemoryStore(), versions_kept=2)
    _ppo(manager)
    for seed in range(3):
        manager.send_batch("p", *_arrays(seed))
    # Kept: versions 2 and 3. Version 2's log-probs equal what ComputeLogProb says for it.
    states, actions, rewards, dones = _arrays(9)
    kept = manager.log_prob("p", states, actions, version=2)[0]
    outcome = manager.send_batch("p", states, actions, rewards, dones, behaviour_version=2)
    assert outcome.version == 4
    same = _manager(MemoryStore(), versions_kept=2)
    _ppo(same)
    for seed in range(3):
        same.send_batch("p", *_arrays(seed))
    assert same.send_batch("p", states, actions, rewards, dones, log_probs=kept).version == 4
    for key, value in _weights(manager, "p").items():
        assert torch.allclose(value, _weights(same, "p")[key])
    before = _weights(manager, "p")
    with pytest.raises(ModelNotReady) as dropped:  # FAILED_PRECONDITION
        manager.send_batch("p", states, actions, rewards, dones, behaviour_version=1)
    assert dropped.value.field == "behaviour_version"
    for bad in (-1, 99):
        with pytest.raises(InvalidRequest) as unknown:
            manager.send_batch("p", states, actions, rewards, dones, behaviour_version=bad)
        assert unknown.value.field == "behaviour_version"
    assert manager.get("p").version == 4
    for key, value in _weights(manager, "p").items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize(("field", "kwargs"), [
    ("log_probs", {"log_probs": np.full(7, -0.5, dtype=np.float32)}),
    ("log_probs", {"log_probs": np.array([-0.5] * 7 + [np.nan], dtype=np.float32)}),
    ("log_probs", {"log_probs": np.array([-0.5] * 7 + [np.inf], dtype=np.float32)}),
    ("log_probs", {"log_probs": np.array([-0.5] * 7 + [0.1], dtype=np.float32)}),
    ("log_probs", {"log_probs": np.full(8, -0.5, dtype=np.float32), "behaviour_version": 0}),
    ("truncated", {"truncated": np.zeros(3, dtype=bool)}),
    ("truncated", {"truncated": np.array([True] + [False] * 7)}),
])
def test_bad_ppo_input_is_refused_by_field_and_changes_nothing(field: str, kwargs: dict[str, Any]) -> None:
    manager = _manager(MemoryStore())
    _ppo(manager)
    before = _weights(manager, "p")
    with pytest.raises(InvalidRequest) as caught:
        manager.send_batch("p", *_arrays(0), **kwargs)
    assert caught.value.field == field
    assert manager.get("p").version == 0
    for key, value in _weights(manager, "p").items():
        assert torch.equal(value, before[key])


def test_reinforce_refuses_behaviour_fields_and_accepts_truncated() -> None:
    manager = _manager(MemoryStore())
    manager.create("r", PolicySpecRequest((4,), discrete_actions=2, seed=0))
    with pytest.raises(InvalidRequest) as caught:
        manager.send_batch("r", *_arrays(0), behaviour_version=0)
    assert caught.value.field == "behaviour_version"
    states, actions, rewards, dones = _arrays(0)
    dones[-1] = True
    truncated = np.zeros(8, dtype=bool)
    truncated[-1] = True
    assert manager.send_batch("r", states, actions, rewards, dones, truncated=truncated).updated
    assert manager.log_prob("r", states, actions)[2].size == 0


def test_a_restart_restores_the_critic_and_optimizer_and_training_goes_on_identically() -> None:
    store = MemoryStore()
    manager = _manager(store)
    _ppo(manager)
    manager.send_batch("p", *_arrays(0))
    assert store.states["p"][1]["format"] == STATE_FORMAT_V2
    assert any(key.startswith("critic.") for key in store.states["p"][0])
    restarted = _manager(store)
    states, actions, _, _ = _arrays(5)
    assert np.array_equal(restarted.log_prob("p", states, actions)[2], manager.log_prob("p", states, actions)[2])
    manager.send_batch("p", *_arrays(1))
    restarted.send_batch("p", *_arrays(1))
    for key, value in _weights(restarted, "p").items():
        assert torch.equal(value, _weights(manager, "p")[key])
    assert np.array_equal(restarted.log_prob("p", states, actions)[2], manager.log_prob("p", states, actions)[2])


def test_reinforce_states_stay_format_v1() -> None:
    store = MemoryStore()
    manager = _manager(store)
    manager.create("r", PolicySpecRequest((4,), discrete_actions=2, seed=0))
    assert store.states["r"][1]["format"] == STATE_FORMAT
    assert not any(key.startswith("critic.") for key in store.states["r"][0])


def test_set_weights_replaces_the_actor_only() -> None:
    from safetensors.torch import save

    manager = _manager(MemoryStore())
    _ppo(manager)
    states, actions, _, _ = _arrays(3)
    values = manager.log_prob("p", states, actions)[2]
    new = {k: torch.zeros_like(v) for k, v in _weights(manager, "p").items()}
    manager.set_weights("p", save(new))
    log_probs, _, after, version = manager.log_prob("p", states, actions)
    assert version == 1 and np.allclose(log_probs, np.log(0.5)) and np.array_equal(after, values)
