"""Exported programs act exactly as stable-baselines3's predict(deterministic=True), for every kind of space."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, DQN, PPO

from rl_service.core.algorithms.reinforce import Reinforce
from rl_service.core.errors import ExportUnavailable, UnknownExportFormat
from rl_service.core.models import run_exporters as exporters
from rl_service.core.models.checkpoints import checkpoint_name, checkpoint_timesteps
from rl_service.core.models.policy_weights import IncompatibleModel, PolicyBuild
from rl_service.core.models.run_exporters import (
    ExportFormat,
    ExportSource,
    export_model,
    get_export_format,
)
from rl_service.core.models.served_policy import compile_policy, load_served_policy
from tests.support.envs import SpacesEnv

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

BOX4 = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
# (id, algorithm class, env or env id, constructor kwargs)
CASES: list[tuple[str, type[Any], Any, dict[str, Any]]] = [
    ("ppo-discrete", PPO, "CartPole-v1", {}),
    ("dqn-discrete", DQN, "CartPole-v1", {"learning_starts": 0}),
    ("a2c-discrete-observations", A2C, "FrozenLake-v1", {}),
    ("ppo-box", PPO, "Pendulum-v1", {}),
    ("ppo-box-sde", PPO, "Pendulum-v1", {"use_sde": True}),
    ("ppo-multidiscrete", PPO, SpacesEnv(BOX4, gym.spaces.MultiDiscrete([3, 2, 4])), {}),
    ("a2c-multibinary", A2C, SpacesEnv(gym.spaces.MultiBinary(3), gym.spaces.MultiBinary(4)), {}),
    ("reinforce-discrete", Reinforce, "CartPole-v1", {}),
    ("reinforce-box", Reinforce, "Pendulum-v1", {}),
    ("ppo-box-2d-actions", PPO, SpacesEnv(gym.spaces.MultiDiscrete([2, 5]),
                                           gym.spaces.Box(-2.0, 3.0, (2, 2), np.float32)), {}),
]


def _saved_model(tmp_path: Path, cls: type[Any], env: Any, kwargs: dict[str, Any]) -> tuple[Any, ExportSource]:
    model = cls("MlpPolicy", env, seed=3, device="cpu", **kwargs)
    # Push the weights away from their initial values, so the actions are not all the same.
    with torch.no_grad():
        for parameter in model.policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    path = tmp_path / "checkpoint_640_steps.zip"
    model.save(path)
    # Served as the service serves it: rebuilt from the class, its arguments and the spaces; only tensors read.
    served = load_served_policy(path, PolicyBuild(cls, kwargs, model.observation_space, model.action_space),
                                require_stats=False)
    source = ExportSource(run_id="run-0123456789ab", algorithm=cls.__name__, env_id=str(env), path=path,
                          timesteps=checkpoint_timesteps(path) or 0, served=served)
    return model, source


def _observations(space: gym.Space[Any], count: int) -> np.ndarray:
    space.seed(11)
    return np.stack([space.sample() for _ in range(count)])


@pytest.mark.parametrize(("cls", "env", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_torchscript_export_acts_as_predict(tmp_path: Path, cls: type[Any], env: Any, kwargs: dict[str, Any]) -> None:
    model, source = _saved_model(tmp_path, cls, env, kwargs)
    exported = export_model(get_export_format("TorchScript"), source)
    assert exported.filename == "run-0123456789ab.pt" and exported.format == "torchscript"
    assert exported.model_timesteps == 640 and exported.signature.startswith("forward(obs: float32[batch")
    extra = {exporters.METADATA_NAME: ""}
    program = torch.jit.load(io.BytesIO(exported.data), _extra_files=extra)
    assert json.loads(extra[exporters.METADATA_NAME])["run_id"] == "run-0123456789ab"
    for count in (1, 7):
        obs = _observations(model.observation_space, count)
        expected, _ = model.predict(obs, deterministic=True)
        actions = program(torch.as_tensor(obs, dtype=torch.float32)).numpy()  # no autograd history: .numpy() works
        assert actions.shape == expected.shape
        np.testing.assert_array_equal(actions, expected)
    if isinstance(model.action_space, gym.spaces.Discrete):
        assert len(set(program(torch.as_tensor(_observations(model.observation_space, 64),
                                               dtype=torch.float32)).tolist())) > 1, "not a constant policy"


@pytest.mark.parametrize("case", ["ppo-discrete", "ppo-box"])
def test_onnx_export_acts_as_predict(tmp_path: Path, case: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, cls, env, kwargs = next(c for c in CASES if c[0] == case)
    model, source = _saved_model(tmp_path, cls, env, kwargs)
    exported = export_model(get_export_format("onnx"), source)
    assert exported.filename.endswith(".onnx")
    session = ort.InferenceSession(exported.data, providers=["CPUExecutionProvider"])
    obs = _observations(model.observation_space, 9).astype(np.float32)
    expected, _ = model.predict(obs, deterministic=True)
    actions = session.run(None, {"obs": obs})[0]
    if isinstance(model.action_space, gym.spaces.Discrete):
        np.testing.assert_array_equal(actions, expected)
    else:  # a different runtime's float arithmetic: equal to within rounding
        np.testing.assert_allclose(actions, expected, rtol=1e-5, atol=1e-6)


def test_sb3_export_is_the_file_itself(tmp_path: Path) -> None:
    _, source = _saved_model(tmp_path, PPO, "CartPole-v1", {})
    exported = export_model(get_export_format(" sb3 "), source)
    assert exported.data == source.path.read_bytes() and exported.filename == "run-0123456789ab.zip"


def test_unknown_format_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownExportFormat) as info:
        get_export_format("tflite")
    assert info.value.field == "format"
    assert all(name in str(info.value) for name in ("tflite", "torchscript", "onnx", "sb3"))


def test_missing_packages_and_unsupported_policies_are_unavailable(tmp_path: Path) -> None:
    _, source = _saved_model(tmp_path, PPO, "CartPole-v1", {})
    needs = ExportFormat("future", ".x", lambda s: (b"", ""), requires=("no_such_module_for_rl_service",))
    with pytest.raises(ExportUnavailable, match=r"no_such_module_for_rl_service on the server"):
        export_model(needs, source)
    with pytest.raises(IncompatibleModel, match="cannot be served"):
        compile_policy(torch.nn.Linear(2, 2), BOX4, gym.spaces.Discrete(2), None)


def test_a_program_that_does_not_act_as_the_policy_is_refused(tmp_path: Path) -> None:
    _, source = _saved_model(tmp_path, PPO, "CartPole-v1", {})
    with pytest.raises(ExportUnavailable, match="does not reproduce the policy's actions"):
        exporters.check_equivalent(lambda obs, mask=None: torch.zeros(len(obs), dtype=torch.int64) + 7,
                                   source.served, "a constant")


def test_checkpoint_names_round_trip() -> None:
    assert checkpoint_timesteps(Path("/x") / checkpoint_name(1024)) == 1024
    assert checkpoint_timesteps("/x/checkpoint_1024_steps.zip") == 1024
    assert checkpoint_timesteps(Path("/x/model.zip")) is None
    assert checkpoint_timesteps("/x/checkpoint_12_steps.zip.tmp") is None


def test_an_onnx_export_compiles_no_torchscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each TorchScript program stays in torch.jit's global compilation unit for good: a repeated export must not
    # make one (it grew the server by about 1.8 MiB per ONNX export before fresh_actor built the eager actor only).
    pytest.importorskip("onnxscript")
    model, source = _saved_model(tmp_path, PPO, "CartPole-v1", {})
    scripted: list[str] = []
    real_script = torch.jit.script

    def counting_script(obj: Any, *args: Any, **kwargs: Any) -> Any:
        scripted.append(type(obj).__name__)
        return real_script(obj, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "script", counting_script)
    fresh = source.served.fresh_actor()
    assert fresh is not source.served.actor and not isinstance(fresh, torch.jit.ScriptModule)
    export_model(get_export_format("onnx"), source)
    assert scripted == [], f"scripted during an ONNX export: {scripted}"
    obs = torch.as_tensor(_observations(model.observation_space, 5), dtype=torch.float32)
    np.testing.assert_array_equal(fresh(obs).numpy(), source.served.actor(obs).numpy())
