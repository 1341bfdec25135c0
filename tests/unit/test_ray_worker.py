"""The Ray executor's pieces that need no Ray: the actor class run in-process, its JSON configuration, the
shared-storage markers, and EXECUTOR=ray refused without the ray package."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from rl_service.core.runs.events import Failed, Finished, event_from_dict
from rl_service.core.runs.jobs import RunJob
from rl_service.infra import settings as settings_module
from rl_service.infra.ray_worker import WORKER_SETTINGS, RunActor, actor_config
from rl_service.infra.settings import Settings
from rl_service.infra.shared_storage import MARKER_FILE, shared_roots, storage_problem, write_markers


def _settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", **values)  # type: ignore[call-arg]


def _job(tmp_path: Path, **changes: object) -> RunJob:
    model_path = tmp_path / "data" / "models" / "run-1" / "m.zip"  # inside MODELS_DIR: writes are confined to it
    job = RunJob(run_id="run-1", experiment_id="e", algorithm="ppo", env_id="CartPole-v1", total_timesteps=64,
                 seed=1, hyperparameters={}, checkpoint_interval=1000, model_path=str(model_path))
    return RunJob.from_dict({**job.to_dict(), **changes})


def test_markers_match_on_the_server_s_filesystem_and_name_the_setting_otherwise(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    roots = shared_roots(settings.data_dir, settings.models_root, settings.checkpoint_root)
    token = write_markers(roots)
    assert storage_problem(roots, token, "node-a") is None
    (settings.models_root / MARKER_FILE).unlink()
    missing = storage_problem(roots, token, "node-a")
    assert missing is not None and missing.startswith(f"MODELS_DIR {settings.models_root.resolve()} ")
    assert "no marker file" in missing and "node-a" in missing
    newer = write_markers(roots)
    assert newer != token, "a new token each start"
    foreign = storage_problem(roots, token, "node-a")
    assert foreign is not None and foreign.startswith(f"DATA_DIR {settings.data_dir.resolve()} ")
    assert "another server's marker file" in foreign and "shared by every node" in foreign


def test_the_actor_configuration_is_json_holding_only_worker_settings(tmp_path: Path) -> None:
    settings = _settings(tmp_path, auth_tokens_file=tmp_path / "tokens", keep_checkpoints=7)
    config = json.loads(actor_config(settings, {"DATA_DIR": "/d"}, "tok"))
    assert config["version"] == 1 and config["token"] == "tok" and config["roots"] == {"DATA_DIR": "/d"}
    assert set(config["settings"]) <= set(WORKER_SETTINGS) and config["settings"]["keep_checkpoints"] == 7
    assert "auth_tokens_file" not in config["settings"], "a worker gets no security settings"


def test_the_actor_fails_a_run_on_a_node_without_the_shared_directories(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    roots = shared_roots(settings.data_dir, settings.models_root, settings.checkpoint_root)
    actor = RunActor(actor_config(settings, roots, "not-the-token"))  # no marker written: a node that sees none
    assert actor.events(0) == ([], False)
    actor.train(json.dumps(_job(tmp_path).to_dict()))
    batch, finished = actor.events(0)
    assert finished and len(batch) == 1
    event = event_from_dict(json.loads(batch[0]))
    assert isinstance(event, Failed) and event.run_id == "run-1" and event.error.startswith("DATA_DIR ")
    assert "no marker file" in event.error


def test_the_actor_trains_in_process_and_stops_on_its_flag(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    roots = shared_roots(settings.data_dir, settings.models_root, settings.checkpoint_root)
    actor = RunActor(actor_config(settings, roots, write_markers(roots)))
    job = _job(tmp_path, total_timesteps=10_000_000, progress_interval=0.05,
               hyperparameters={"n_steps": "64", "batch_size": "64", "n_epochs": "1"})
    trainer = threading.Thread(target=actor.train, args=(json.dumps(job.to_dict()),))
    trainer.start()
    kinds: list[str] = []
    while "progress" not in kinds:
        batch, finished = actor.events(5)
        assert not finished, kinds
        kinds += [json.loads(text)["kind"] for text in batch]
    actor.stop()
    trainer.join(timeout=120)
    batch, finished = actor.events(0)
    kinds += [json.loads(text)["kind"] for text in batch]
    assert finished and kinds[0] == "started" and kinds[-1] == "finished", kinds
    final = event_from_dict(json.loads(batch[-1]))
    assert isinstance(final, Finished) and final.stopped_early and 0 < final.timesteps < 10_000_000


def test_a_bad_actor_configuration_version_is_refused() -> None:
    with pytest.raises(ValueError, match="configuration version 9"):
        RunActor(json.dumps({"version": 9}))


def test_executor_ray_without_the_ray_package_is_refused_with_the_install_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = settings_module.importlib.util.find_spec
    monkeypatch.setattr(settings_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ValidationError) as raised:
        _settings(tmp_path, executor="ray")
    line = settings_module.describe_validation_error(raised.value)
    assert "\n" not in line and line.startswith("invalid configuration: EXECUTOR:")
    assert "pip install 'rl-service[ray]'" in line
    assert _settings(tmp_path, executor="local").executor == "local"
