"""TENSORBOARD_DIR: each run writes stable-baselines3's TensorBoard logs to TENSORBOARD_DIR/<run_id>."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from rl_service.infra import settings as settings_module
from rl_service.infra.settings import Settings, describe_validation_error
from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import FAST_PPO


def test_runs_log_to_tensorboard(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    handle = server_factory(tensorboard_dir=tmp_path / "tb")
    run_id = handle.start(total_timesteps=1024, hyperparameters=FAST_PPO)
    assert handle.watch_to_end(run_id)[-1].state == pb.SUCCEEDED
    logs = tmp_path / "tb" / run_id
    assert list(logs.glob("events.out.tfevents.*")), "one event file per run, in TENSORBOARD_DIR/<run_id>"
    events = EventAccumulator(str(logs))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"rollout/ep_rew_mean", "time/fps", "train/loss", "train/entropy_loss"} <= tags, tags
    assert events.Scalars("rollout/ep_rew_mean")[-1].step >= 1024 - 128


def test_tensorboard_dir_without_tensorboard_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    monkeypatch.setattr(settings_module, "tensorboard_installed", lambda: False)
    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, tensorboard_dir=tmp_path)  # type: ignore[call-arg]
    line = describe_validation_error(info.value)
    assert "TENSORBOARD_DIR" in line and "pip install 'rl-service[tensorboard]'" in line
    assert Settings(_env_file=None).tensorboard_dir is None  # type: ignore[call-arg]
