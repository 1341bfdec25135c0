"""Serving a run's policy: the newest model that loads, the best one, masks, recorded spaces, and what is refused."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from rl_service.core.errors import InvalidRequest, ModelNotReady
from rl_service.core.models.checkpoints import BEST_MODEL_NAME
from rl_service.core.models.normalization import NormalizeStats, save_stats, stats_path
from rl_service.core.models.serving import RunServing
from rl_service.core.models.space_json import spaces_to_json
from rl_service.core.runs.records import Evaluation, RunRecord, RunState
from rl_service.infra.model_store import FileModelStore


def record(last_checkpoint: str, **changes: Any) -> RunRecord:
    base = RunRecord(run_id="run-s", experiment_id="e", algorithm="PPO", env_id="CartPole-v1",
                     state=RunState.INTERRUPTED, total_timesteps=1000, seed=1, hyperparameters={},
                     checkpoint_interval=100, model_path="/nowhere/model.zip", timesteps_done=300,
                     last_checkpoint_path=last_checkpoint)
    return base.evolve(**changes)


def ppo(env_id: str = "CartPole-v1", seed: int = 0, **kwargs: Any) -> PPO:
    """An untrained PPO with weights pushed apart (seed decides), so two models act differently."""
    model = PPO("MlpPolicy", gym.make(env_id), n_steps=64, batch_size=32, device="cpu", seed=seed, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


def store_at(tmp_path: Path) -> FileModelStore:
    return FileModelStore(tmp_path / "models", tmp_path / "checkpoints", keep_checkpoints=5)


OBS = np.array([[0.1, -0.2, 0.03, 0.4], [-0.3, 0.5, -0.05, -0.6], [0.2, 0.1, 0.1, -0.1], [0.0, 1.0, -0.2, 0.3]])


def test_act_falls_back_to_the_newest_checkpoint_that_loads(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    model = PPO("MlpPolicy", gym.make("CartPole-v1"), n_steps=64, batch_size=32, device="cpu")
    good = store.save_checkpoint("run-s", model, 200)
    broken = store.save_checkpoint("run-s", model, 300)
    broken.write_bytes(b"cut short by a crash")
    serving = RunServing(max_act_batch=16, store=store)
    for named in (str(broken), str(tmp_path / "checkpoints" / "run-s" / "checkpoint_400_steps.zip"), ""):
        result = serving.act(record(named), [0.0, 0.0, 0.0, 0.0], deterministic=True, single=True)
        assert result.model_timesteps == 200 and result.count == 1
    exported = serving.export(record(str(broken)), "sb3")
    assert exported.model_timesteps == 200 and exported.data[:2] == b"PK"
    good.unlink()
    serving.forget("run-s")
    with pytest.raises(ModelNotReady, match="no checkpoint or model yet"):
        serving.act(record(str(broken)), [0.0] * 4, deterministic=True, single=True)


def test_actions_equal_the_saved_models_predict_and_follow_a_newer_checkpoint(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    serving = RunServing(max_act_batch=16, store=store)
    first, second = ppo(seed=1), ppo(seed=2)
    path = store.save_checkpoint("run-s", first, 200)
    result = serving.act(record(str(path)), OBS.ravel(), deterministic=True, single=False)
    assert result.actions == first.predict(OBS, deterministic=True)[0].tolist() and result.model_timesteps == 200
    newer = store.save_checkpoint("run-s", second, 300)
    result = serving.act(record(str(newer)), OBS.ravel(), deterministic=True, single=False)
    assert result.actions == second.predict(OBS, deterministic=True)[0].tolist() and result.model_timesteps == 300
    assert first.predict(OBS, deterministic=True)[0].tolist() != second.predict(OBS, deterministic=True)[0].tolist()


def test_model_best_serves_the_best_evaluated_model_and_follows_a_new_best(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    serving = RunServing(max_act_batch=16, store=store)
    latest, best, better = ppo(seed=1), ppo(seed=2), ppo(seed=3)
    checkpoint = store.save_checkpoint("run-s", latest, 300)
    run = record(str(checkpoint))
    with pytest.raises(ModelNotReady, match="model: run run-s has no evaluated model yet") as info:
        serving.act(run, OBS.ravel(), True, single=False, model="best")
    assert info.value.field == "model"
    with pytest.raises(InvalidRequest, match="model: 'newest' is not a model choice") as bad:
        serving.act(run, OBS.ravel(), True, single=False, model="newest")
    assert bad.value.field == "model"
    evaluated = run.evolve(best_evaluation=Evaluation(mean_reward=50.0, std_reward=1.0, timesteps=150, episodes=5))
    with pytest.raises(ModelNotReady, match="best model file is missing"):
        serving.act(evaluated, OBS.ravel(), True, single=False, model="best")
    store.save_model(best, store.run_dir("run-s") / BEST_MODEL_NAME)
    answer = serving.act(evaluated, OBS.ravel(), True, single=False, model=" Best ")
    assert answer.actions == best.predict(OBS, deterministic=True)[0].tolist() and answer.model_timesteps == 150
    for choice in ("", "latest"):
        assert serving.act(evaluated, OBS.ravel(), True, single=False, model=choice).model_timesteps == 300
    # The best model is replaced in place; the record's new evaluation makes serving reload it.
    store.save_model(better, store.run_dir("run-s") / BEST_MODEL_NAME)
    newer = run.evolve(best_evaluation=Evaluation(mean_reward=80.0, std_reward=1.0, timesteps=250, episodes=5))
    answer = serving.act(newer, OBS.ravel(), True, single=False, model="best")
    assert answer.actions == better.predict(OBS, deterministic=True)[0].tolist() and answer.model_timesteps == 250
    exported = serving.export(newer, "sb3", model="best")
    assert exported.model_timesteps == 250
    assert exported.data == (store.run_dir("run-s") / BEST_MODEL_NAME).read_bytes()


def test_masks_are_honoured_and_checked(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    serving = RunServing(max_act_batch=16, store=store)
    run = record(str(store.save_checkpoint("run-s", ppo(seed=1), 200)))
    forced = np.array([[True, False], [False, True], [True, False], [False, True]])
    result = serving.act(run, OBS.ravel(), True, single=False, action_mask=forced.ravel())
    assert result.actions == [0.0, 1.0, 0.0, 1.0]
    one = serving.act(run, OBS[0], False, single=True, action_mask=np.array([False, True]))
    assert one.actions == [1.0]
    cases = [
        (True, np.array([True, False, True]), "action_mask", "got 3 flags; the action space has 2 actions, so 2"),
        (False, np.ones(6, dtype=bool), "action_masks", "got 6 flags; the action space has 2 actions, so 8"),
        (False, np.array([True, True, False, False, True, False, True, True]), "action_masks",
         "observation 1 has no legal action"),
    ]
    for single, mask, field, message in cases:
        observations = OBS[0] if single else OBS.ravel()
        with pytest.raises(InvalidRequest, match=message) as info:
            serving.act(run, observations, True, single=single, action_mask=mask)
        assert info.value.field == field and str(info.value).startswith(field + ":")


def test_a_mask_for_a_box_policy_is_invalid(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    serving = RunServing(max_act_batch=16, store=store)
    run = record(str(store.save_checkpoint("run-s", ppo("Pendulum-v1"), 200)), env_id="Pendulum-v1")
    with pytest.raises(InvalidRequest, match=r"action_mask: action masks apply to Discrete action spaces only; "
                                             r"this run acts in Box\(1,\) float32") as info:
        serving.act(run, [0.0, 1.0, 0.5], True, single=True, action_mask=np.array([True]))
    assert info.value.field == "action_mask"


def test_recorded_spaces_serve_runs_gymnasium_does_not_know(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    serving = RunServing(max_act_batch=16, store=store)
    model = ppo(seed=4)
    run = record(str(store.save_checkpoint("run-s", model, 200)), env_id="grpc://sim.example:50061")
    with pytest.raises(ModelNotReady, match="trained on an external environment before this server recorded spaces"):
        serving.act(run, OBS[0], True, single=True)
    store.write_json(store.run_dir("run-s") / "metadata.json",
                     {"run_id": "run-s", "spaces": spaces_to_json(model.observation_space, model.action_space)})
    answer = serving.act(run, OBS.ravel(), True, single=False)
    assert answer.actions == model.predict(OBS, deterministic=True)[0].tolist()


def test_weights_that_do_not_fit_the_run_fall_back_then_fail_clearly(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    serving = RunServing(max_act_batch=16, store=store)
    fits = store.save_checkpoint("run-s", ppo(seed=1, policy_kwargs={"net_arch": [32]}), 200)
    foreign = store.save_checkpoint("run-s", ppo(seed=1), 300)  # 64x64: not what the record says
    run = record(str(foreign), hyperparameters={"net_arch": "32"})
    assert serving.act(run, OBS[0], True, single=True).model_timesteps == 200
    fits.unlink()
    serving.forget("run-s")
    with pytest.raises(ModelNotReady, match=r"checkpoint_300_steps\.zip: its weights do not match the policy rebuilt"):
        serving.act(run, OBS[0], True, single=True)


def test_statistics_beside_a_checkpoint_normalise_raw_observations(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    serving = RunServing(max_act_batch=16, store=store)
    model = ppo(seed=5)
    path = store.save_checkpoint("run-s", model, 200)
    stats = NormalizeStats(obs_mean=np.array([1.0, -1.0, 0.5, 0.0]), obs_var=np.array([0.5, 2.0, 0.1, 3.0]),
                           obs_count=10.0, ret_mean=0.0, ret_var=1.0, ret_count=10.0, norm_obs=True,
                           norm_reward=False, clip_obs=5.0, clip_reward=10.0, epsilon=1e-8, gamma=0.99)
    save_stats(stats_path(path), stats)
    raw = OBS * 3
    answer = serving.act(record(str(path)), raw.ravel(), True, single=False)
    assert answer.actions == model.predict(stats.normalize_observations(raw), deterministic=True)[0].tolist()
    exported = serving.export(record(str(path)), "torchscript")
    assert "normalises observations with the run's VecNormalize statistics" in exported.signature
    meta = {"rl_service.json": ""}
    torch.jit.load(io.BytesIO(exported.data), _extra_files=meta)
    assert json.loads(meta["rl_service.json"])["normalized"] is True
