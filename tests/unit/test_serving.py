"""Serving a run's policy when the checkpoint its record names is gone or unloadable: the newest that loads."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest
from stable_baselines3 import PPO

from rl_service.core.errors import ModelNotReady
from rl_service.core.models.serving import RunServing
from rl_service.core.runs.records import RunRecord, RunState
from rl_service.infra.model_store import FileModelStore


def record(last_checkpoint: str) -> RunRecord:
    return RunRecord(run_id="run-s", experiment_id="e", algorithm="PPO", env_id="CartPole-v1",
                     state=RunState.INTERRUPTED, total_timesteps=1000, seed=1, hyperparameters={},
                     checkpoint_interval=100, model_path="/nowhere/model.zip", timesteps_done=300,
                     last_checkpoint_path=last_checkpoint)


def test_act_falls_back_to_the_newest_checkpoint_that_loads(tmp_path: Path) -> None:
    store = FileModelStore(tmp_path / "models", tmp_path / "checkpoints", keep_checkpoints=5)
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
