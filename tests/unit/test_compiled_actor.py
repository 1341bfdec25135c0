"""The compiled actor Act serves and export writes: rebuilt from a model file without unpickling, it acts exactly as
stable-baselines3's predict(deterministic=True), for every algorithm and kind of space, masked and normalised."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from sb3_contrib import QRDQN, TQC, TRPO, MaskablePPO
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3

from rl_service.core.algorithms.reinforce import Reinforce
from rl_service.core.models.normalization import NormalizeStats, save_stats, stats_path
from rl_service.core.models.policy_weights import DamagedModel, IncompatibleModel, PolicyBuild
from rl_service.core.models.run_exporters import ExportSource, export_model, get_export_format
from rl_service.core.models.served_policy import ServedPolicy, compile_policy, load_served_policy
from tests.support.envs import MASKED_ENV_ID, SpacesEnv

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

OFF = {"buffer_size": 64, "learning_starts": 0}  # off-policy: a tiny replay buffer, never filled here
BOX4 = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
WIDE_2D = gym.spaces.Box(-2.0, 3.0, (2, 2), np.float32)  # asymmetric bounds, 2-D: unscaling and reshaping show
# (id, class, env id or env, constructor kwargs)
CASES: list[tuple[str, type[Any], Any, dict[str, Any]]] = [
    ("ppo-discrete", PPO, "CartPole-v1", {}),
    ("ppo-box", PPO, "Pendulum-v1", {}),
    ("ppo-box-sde", PPO, "Pendulum-v1", {"use_sde": True}),
    ("ppo-box-sde-squashed", PPO, "Pendulum-v1", {"use_sde": True, "policy_kwargs": {"squash_output": True}}),
    ("ppo-multidiscrete", PPO, SpacesEnv(BOX4, gym.spaces.MultiDiscrete([3, 2, 4])), {}),
    ("a2c-multibinary", A2C, SpacesEnv(gym.spaces.MultiBinary(3), gym.spaces.MultiBinary(4)), {}),
    ("a2c-discrete-observations", A2C, "FrozenLake-v1", {}),
    ("dqn", DQN, "CartPole-v1", OFF),
    ("qrdqn", QRDQN, "CartPole-v1", {**OFF, "policy_kwargs": {"n_quantiles": 7}}),
    ("sac", SAC, "Pendulum-v1", OFF),
    ("sac-sde", SAC, "Pendulum-v1", {**OFF, "use_sde": True}),
    ("sac-2d-actions", SAC, SpacesEnv(BOX4, WIDE_2D), OFF),
    ("td3", TD3, "Pendulum-v1", OFF),
    ("td3-2d-actions", TD3, SpacesEnv(BOX4, WIDE_2D), OFF),
    ("ddpg", DDPG, "Pendulum-v1", OFF),
    ("tqc", TQC, "Pendulum-v1", {**OFF, "policy_kwargs": {"n_quantiles": 5, "n_critics": 2}}),
    ("trpo-discrete", TRPO, "CartPole-v1", {}),
    ("trpo-box", TRPO, "Pendulum-v1", {}),
    ("maskable-ppo", MaskablePPO, MASKED_ENV_ID, {}),
    ("reinforce-discrete", Reinforce, "CartPole-v1", {}),
    ("reinforce-box", Reinforce, "Pendulum-v1", {}),
]
IDS = [c[0] for c in CASES]


def _case(case_id: str) -> tuple[type[Any], Any, dict[str, Any]]:
    _, cls, env, kwargs = next(c for c in CASES if c[0] == case_id)
    return cls, env, kwargs


SQUASHED = (SAC, TD3, DDPG, TQC)


def saved(tmp_path: Path, cls: type[Any], env: Any, kwargs: dict[str, Any], name: str = "checkpoint_64_steps.zip",
          noise: float | None = None) -> tuple[Any, Path, PolicyBuild]:
    """A model with weights pushed off their initial values (so actions differ), saved as the service saves it.

    The push is gentler for tanh-squashed actors, whose actions would otherwise all saturate at a bound."""
    model = cls("MlpPolicy", env if not isinstance(env, str) else gym.make(env), seed=3, device="cpu", **kwargs)
    scale = noise if noise is not None else (0.1 if cls in SQUASHED else 0.5)
    with torch.no_grad():
        for parameter in model.policy.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)
    path = tmp_path / name
    model.save(path)
    return model, path, PolicyBuild(cls, kwargs, model.observation_space, model.action_space)


def observations(space: gym.Space[Any], count: int, seed: int = 11) -> np.ndarray:
    space.seed(seed)
    return np.stack([space.sample() for _ in range(count)])


def program_of(served: ServedPolicy) -> torch.jit.ScriptModule:
    """The TorchScript program Act runs and the torchscript export holds (every policy here compiles)."""
    assert served.program is not None, served.program_error
    return served.program


def act(served: ServedPolicy, obs: np.ndarray, mask: np.ndarray | None = None, deterministic: bool = True
        ) -> np.ndarray:
    return served.act(obs, mask, deterministic)


@pytest.mark.parametrize("case_id", IDS)
def test_served_and_exported_actions_equal_predict(tmp_path: Path, case_id: str) -> None:
    cls, env, kwargs = _case(case_id)
    model, path, build = saved(tmp_path, cls, env, kwargs)
    served = load_served_policy(path, build, require_stats=False)
    program = program_of(served)
    for count in (1, 9):
        obs = observations(model.observation_space, count)
        expected, _ = model.predict(obs, deterministic=True)
        actions = act(served, obs)  # the TorchScript program, as Act runs it
        assert actions.shape == expected.shape
        np.testing.assert_array_equal(actions, expected)
        with torch.no_grad():
            np.testing.assert_array_equal(program(torch.as_tensor(obs, dtype=torch.float32)).numpy(), expected)
            np.testing.assert_array_equal(served.actor(torch.as_tensor(obs, dtype=torch.float32)).numpy(), expected)
    if isinstance(model.action_space, gym.spaces.Box):
        many = act(served, observations(model.observation_space, 64))
        assert np.all(many >= model.action_space.low) and np.all(many <= model.action_space.high)
        if case_id != "sac-sde":  # gSDE's clip_mean (Hardtanh at 2) saturates under the random weights
            assert len({tuple(a.reshape(-1)) for a in many}) > 1, "not a constant policy"


def test_the_data_entry_is_never_read(tmp_path: Path) -> None:
    """SB3's `data` entry holds cloudpickled objects; serving reads policy.pth alone, so even garbage there loads."""
    model, path, build = saved(tmp_path, PPO, "CartPole-v1", {})
    rewritten = tmp_path / "rewritten.zip"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(rewritten, "w") as target:
        for item in source.infolist():
            target.writestr(item, b"\x80\x04 not JSON, not a pickle" if item.filename == "data" else source.read(item))
    obs = observations(model.observation_space, 5)
    np.testing.assert_array_equal(act(load_served_policy(rewritten, build, False), obs),
                                  model.predict(obs, deterministic=True)[0])


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_policy_pth_carrying_code_is_refused_without_running_it(tmp_path: Path) -> None:
    _, path, build = saved(tmp_path, PPO, "CartPole-v1", {})
    marker = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save({"weights": _Payload(marker)}, buffer)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(evil, "w") as target:
        for item in source.infolist():
            target.writestr(item, buffer.getvalue() if item.filename == "policy.pth" else source.read(item))
    with pytest.raises(IncompatibleModel, match="not a plain state dict"):
        load_served_policy(evil, build, False)
    assert not marker.exists()


def test_weights_that_do_not_fit_the_rebuilt_policy_are_refused(tmp_path: Path) -> None:
    model, path, _ = saved(tmp_path, PPO, "CartPole-v1", {"policy_kwargs": {"net_arch": [32]}})
    other = PolicyBuild(PPO, {"policy_kwargs": {"net_arch": [64, 64]}}, model.observation_space, model.action_space)
    with pytest.raises(IncompatibleModel, match="do not match the policy rebuilt"):
        load_served_policy(path, other, False)
    wider = PolicyBuild(PPO, {"policy_kwargs": {"net_arch": [48]}}, model.observation_space, model.action_space)
    with pytest.raises(IncompatibleModel, match=r"needs torch.float32 \(48, 4\)"):
        load_served_policy(path, wider, False)
    cut = tmp_path / "cut.zip"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DamagedModel):
        load_served_policy(cut, other, False)
    with pytest.raises(FileNotFoundError):
        load_served_policy(tmp_path / "gone.zip", other, False)


@pytest.mark.parametrize("case_id", ["maskable-ppo", "ppo-discrete", "dqn", "qrdqn", "reinforce-discrete"])
def test_masked_actions_are_legal_and_the_best_legal_one(tmp_path: Path, case_id: str) -> None:
    cls, env, kwargs = _case(case_id)
    model, path, build = saved(tmp_path, cls, env, kwargs)
    served = load_served_policy(path, build, False)
    program = program_of(served)
    obs = observations(model.observation_space, 32)
    n = int(model.action_space.n)
    rng = np.random.default_rng(5)
    mask = rng.random((32, n)) < 0.4
    mask[np.arange(32), rng.integers(0, n, 32)] = True
    actions = act(served, obs, mask)
    assert mask[np.arange(32), actions].all()
    with torch.no_grad():
        exported = program(torch.as_tensor(obs, dtype=torch.float32), torch.as_tensor(mask))
    np.testing.assert_array_equal(exported.numpy(), actions)
    if cls is MaskablePPO:
        np.testing.assert_array_equal(actions, model.predict(obs, deterministic=True, action_masks=mask)[0])
    # Unmasked, the policy picks an action the masks forbid somewhere: masking changed answers.
    assert not mask[np.arange(32), act(served, obs)].all()
    torch.manual_seed(0)
    sampled = act(served, obs, mask, deterministic=False)
    assert mask[np.arange(32), sampled].all()


@pytest.mark.parametrize("case_id", ["ppo-discrete", "ppo-multidiscrete", "a2c-multibinary", "ppo-box",
                                     "ppo-box-sde", "sac", "sac-sde", "tqc", "reinforce-box", "trpo-box"])
def test_sampled_actions_vary_and_stay_in_the_space(tmp_path: Path, case_id: str) -> None:
    cls, env, kwargs = _case(case_id)
    model, path, build = saved(tmp_path, cls, env, kwargs, noise=0.02)  # a spread distribution
    served = load_served_policy(path, build, False)
    obs = np.repeat(observations(model.observation_space, 1), 64, axis=0)  # one observation, 64 draws
    torch.manual_seed(0)
    sampled = act(served, obs, deterministic=False)
    assert sampled.shape == model.predict(obs, deterministic=True)[0].shape
    assert all(model.action_space.contains(a.astype(model.action_space.dtype)) for a in sampled)
    assert len({tuple(np.asarray(a).reshape(-1)) for a in sampled}) > 1, "sampling gave one action 64 times"


def test_td3_samples_as_it_predicts(tmp_path: Path) -> None:
    model, path, build = saved(tmp_path, TD3, "Pendulum-v1", OFF)
    served = load_served_policy(path, build, False)
    obs = observations(model.observation_space, 8)
    np.testing.assert_array_equal(act(served, obs, deterministic=False), model.predict(obs, deterministic=False)[0])


def test_dqn_samples_epsilon_greedily_among_legal_actions(tmp_path: Path) -> None:
    model, _, _ = saved(tmp_path, DQN, "CartPole-v1", OFF)
    obs = np.repeat(observations(model.observation_space, 1), 200, axis=0)
    greedy = compile_policy(model.policy, model.observation_space, model.action_space, None, epsilon=0.0)
    np.testing.assert_array_equal(act(greedy, obs, deterministic=False), act(greedy, obs))
    explorer = compile_policy(model.policy, model.observation_space, model.action_space, None, epsilon=1.0)
    torch.manual_seed(0)
    assert set(act(explorer, obs, deterministic=False).tolist()) == {0, 1}
    only_one = np.tile([False, True], (200, 1))
    assert set(act(explorer, obs, only_one, deterministic=False).tolist()) == {1}


def _stats(shape: tuple[int, ...], clip: float = 10.0) -> NormalizeStats:
    rng = np.random.default_rng(2)
    return NormalizeStats(obs_mean=rng.normal(size=shape) * 3, obs_var=rng.random(shape) * 5 + 0.1, obs_count=100.0,
                          ret_mean=0.0, ret_var=1.0, ret_count=100.0, norm_obs=True, norm_reward=True,
                          clip_obs=clip, clip_reward=10.0, epsilon=1e-8, gamma=0.99)


@pytest.mark.parametrize("case_id", ["ppo-discrete", "sac", "dqn"])
def test_normalisation_statistics_beside_the_model_are_applied(tmp_path: Path, case_id: str) -> None:
    cls, env, kwargs = _case(case_id)
    model, path, build = saved(tmp_path, cls, env, kwargs)
    stats = _stats(model.observation_space.shape, clip=1.5)  # a tight clip: clipping shows too
    with pytest.raises(IncompatibleModel, match=r"normalize\.safetensors is missing"):
        load_served_policy(path, build, require_stats=True)
    save_stats(stats_path(path), stats)
    served = load_served_policy(path, build, require_stats=True)
    assert served.normalized
    raw = observations(model.observation_space, 16) * 4
    expected, _ = model.predict(stats.normalize_observations(raw), deterministic=True)
    np.testing.assert_array_equal(act(served, raw), expected)
    with torch.no_grad():
        exported = program_of(served)(torch.as_tensor(raw, dtype=torch.float32)).numpy()
    np.testing.assert_array_equal(exported, expected)
    # The statistics matter for these observations: without them the policy answers otherwise.
    assert not np.array_equal(expected, model.predict(raw, deterministic=True)[0])


def test_statistics_of_another_shape_or_format_are_refused(tmp_path: Path) -> None:
    _, path, build = saved(tmp_path, PPO, "CartPole-v1", {})
    save_stats(stats_path(path), _stats((3,)))
    with pytest.raises(IncompatibleModel, match=r"statistics of shape \(3,\)"):
        load_served_policy(path, build, False)
    stats_path(path).write_bytes(b"not safetensors")
    with pytest.raises(IncompatibleModel, match="unreadable normalisation statistics"):
        load_served_policy(path, build, False)


def test_onnx_export_of_a_masked_policy_takes_the_mask_as_a_second_input(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, path, build = saved(tmp_path, MaskablePPO, MASKED_ENV_ID, {})
    served = load_served_policy(path, build, False)
    source = ExportSource(run_id="run-0123456789ab", algorithm="MaskablePPO", env_id=MASKED_ENV_ID, path=path,
                          timesteps=64, served=served)
    exported = export_model(get_export_format("onnx"), source)
    assert exported.signature.startswith("forward(obs: float32[batch, 16], action_mask: bool[batch, 8]) -> int64")
    session = ort.InferenceSession(exported.data, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["obs", "action_mask"]
    obs = observations(model.observation_space, 12).astype(np.float32)
    rng = np.random.default_rng(3)
    mask = rng.random((12, 8)) < 0.3
    mask[np.arange(12), rng.integers(0, 8, 12)] = True
    actions = session.run(None, {"obs": obs, "action_mask": mask})[0]
    np.testing.assert_array_equal(actions, model.predict(obs, deterministic=True, action_masks=mask)[0])
    np.testing.assert_array_equal(actions, act(served, obs, mask))
