"""Trained policies exported for use outside the service: the stable-baselines3 zip, TorchScript and ONNX.

A plain registry of formats (name -> ExportFormat); a lookup miss lists the valid names. TorchScript and ONNX
hold a module that maps a batch of observations to the deterministic actions `Act` answers with (the same
preprocessing, network, distribution mode and clipping as stable-baselines3's `predict(deterministic=True)`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common import distributions
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.dqn.policies import DQNPolicy

from rl_service.core.errors import ExportUnavailable, UnknownExportFormat, quoted

METADATA_NAME = "rl_service.json"  # TorchScript extra file / ONNX metadata key holding what was exported
# Tracing and exporting are CPU-heavy and torch.export keeps global state: one export at a time.
_EXPORT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ExportSource:
    """What to export: a run's final model or newest checkpoint, and how to load it."""

    run_id: str
    algorithm: str
    algorithm_cls: type[Any]
    env_id: str
    path: Path
    timesteps: int


@dataclass(frozen=True)
class ExportedModel:
    """An export's bytes, a suggested file name, and what the exported program takes and returns."""

    data: bytes
    filename: str
    format: str
    model_timesteps: int
    signature: str


@dataclass(frozen=True)
class ExportFormat:
    """One registry entry: how to build the bytes, and which packages the server needs for it."""

    name: str
    suffix: str
    build: Callable[[ExportSource], tuple[bytes, str]]
    requires: tuple[str, ...] = ()


def get_export_format(name: str) -> ExportFormat:
    """Look a format up case-insensitively; a miss lists the valid names."""
    fmt = EXPORT_FORMATS.get(name.strip().lower())
    if fmt is None:
        valid = ", ".join(EXPORT_FORMATS)
        shown = quoted(name) if name else "(empty)"
        raise UnknownExportFormat(f"format: unknown export format {shown}; choose one of {valid}", field="format")
    return fmt


def export_model(fmt: ExportFormat, source: ExportSource) -> ExportedModel:
    """Build one export; ExportUnavailable when this server lacks the format's packages or the policy's kind."""
    missing = [module for module in fmt.requires if importlib.util.find_spec(module) is None]
    if missing:
        raise ExportUnavailable(
            f"format: {fmt.name} export needs {' and '.join(missing)} on the server, which a default install "
            "includes; reinstall the server (pip install rl-service)", field="format")
    data, signature = fmt.build(source)
    return ExportedModel(data=data, filename=f"{source.run_id}{fmt.suffix}", format=fmt.name,
                         model_timesteps=source.timesteps, signature=signature)


class DeterministicPolicy(torch.nn.Module):
    """Observations (float32, batch first) -> the actions stable-baselines3's predict(deterministic=True) returns.

    Built from the policy's own submodules, without torch.distributions objects, so that it traces and exports.
    """

    low: torch.Tensor
    high: torch.Tensor

    def __init__(self, policy: Any, action_space: gym.Space[Any]) -> None:
        super().__init__()
        self.policy = policy
        self.head = _head_kind(policy)
        self.action_shape: tuple[int, ...] = tuple(action_space.shape or ())
        self.split: list[int] = []
        if self.head == "multi_categorical":
            self.split = [int(n) for n in policy.action_dist.action_dims]
        self.box = isinstance(action_space, gym.spaces.Box)
        self.squash = bool(getattr(policy, "squash_output", False))
        if isinstance(action_space, gym.spaces.Box):
            self.register_buffer("low", torch.as_tensor(np.asarray(action_space.low), dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(np.asarray(action_space.high), dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """A batch of observations in, a batch of actions out."""
        policy = self.policy
        actions: torch.Tensor
        if self.head == "q_argmax":
            actions = policy.q_net(obs).argmax(dim=1)
        elif self.head == "predict":
            actions = policy._predict(obs, deterministic=True)
        else:
            features = policy.extract_features(obs, policy.pi_features_extractor)
            out = policy.action_net(policy.mlp_extractor.forward_actor(features))
            actions = self._mode(out)
        actions = actions.reshape((-1, *self.action_shape))
        if self.box:
            if self.squash:
                actions = self.low + 0.5 * (actions + 1.0) * (self.high - self.low)
            else:
                actions = torch.clamp(actions, self.low, self.high)
        return actions

    def _mode(self, out: torch.Tensor) -> torch.Tensor:
        # The same operations as the distributions' mode(): Categorical normalises its logits first.
        if self.head == "categorical":
            return _argmax_probs(out)
        if self.head == "multi_categorical":
            return torch.stack([_argmax_probs(part) for part in torch.split(out, self.split, dim=1)], dim=1)
        if self.head == "bernoulli":
            return torch.round(torch.sigmoid(out))
        if self.head == "tanh_mean":
            return torch.tanh(out)
        return out  # a Gaussian's mean


def _argmax_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits - logits.logsumexp(dim=-1, keepdim=True), dim=-1).argmax(dim=1)


def _head_kind(policy: Any) -> str:
    if isinstance(policy, DQNPolicy):
        return "q_argmax"
    if not isinstance(policy, ActorCriticPolicy):
        if isinstance(policy, BasePolicy):
            return "predict"  # the policy's own _predict (REINFORCE's); the result is checked against predict()
        raise ExportUnavailable(
            f"format: {type(policy).__name__} policies cannot be exported as a program yet; export format sb3",
            field="format")
    dist = policy.action_dist
    if isinstance(dist, distributions.MultiCategoricalDistribution):
        return "multi_categorical"
    if isinstance(dist, distributions.CategoricalDistribution):
        return "categorical"
    if isinstance(dist, distributions.BernoulliDistribution):
        return "bernoulli"
    if isinstance(dist, distributions.StateDependentNoiseDistribution):
        return "tanh_mean" if dist.bijector is not None else "mean"
    if isinstance(dist, distributions.DiagGaussianDistribution):
        return "mean"
    raise ExportUnavailable(f"format: action distribution {type(dist).__name__} cannot be exported yet; "
                            "export format sb3", field="format")


def _load_module(source: ExportSource) -> tuple[DeterministicPolicy, torch.Tensor, dict[str, Any], Any]:
    """A fresh copy of the model (never the one Act is using), wrapped, with example input and metadata."""
    model = source.algorithm_cls.load(source.path, device="cpu")
    policy = model.policy
    policy.set_training_mode(False)
    policy.requires_grad_(False)  # outputs then carry no autograd history: .numpy() works on them
    module = DeterministicPolicy(policy, model.action_space).eval()
    space = model.observation_space
    example = torch.as_tensor(np.stack([space.sample() for _ in range(2)]), dtype=torch.float32)
    check_equivalent(module, model, "the exported module")
    signature = _signature(space, model.action_space)
    metadata = {
        "run_id": source.run_id, "algorithm": source.algorithm, "env_id": source.env_id,
        "model_timesteps": source.timesteps, "observation_space": describe_space(space),
        "action_space": describe_space(model.action_space), "signature": signature,
    }
    return module, example, metadata, model


def check_equivalent(program: Callable[[torch.Tensor], torch.Tensor], model: Any, what: str) -> None:
    """ExportUnavailable unless `program` gives the actions model.predict(deterministic=True) gives (as Act)."""
    space = model.observation_space
    observations = np.stack([space.sample() for _ in range(8)])
    expected, _ = model.predict(observations, deterministic=True)
    with torch.no_grad():
        actions = program(torch.as_tensor(observations, dtype=torch.float32)).numpy()
    if actions.shape != expected.shape or not np.allclose(actions, expected, rtol=1e-5, atol=1e-6):
        raise ExportUnavailable(f"format: {what} does not reproduce the policy's actions; export format sb3",
                                field="format")


def _signature(observation_space: gym.Space[Any], action_space: gym.Space[Any]) -> str:
    obs = ", ".join(["batch", *(str(d) for d in observation_space.shape or ())])
    act = ", ".join(["batch", *(str(d) for d in action_space.shape or ())])
    kind = "int64" if isinstance(action_space, gym.spaces.Discrete | gym.spaces.MultiDiscrete) else "float32"
    return (f"forward(obs: float32[{obs}]) -> {kind}[{act}]: deterministic actions in {describe_space(action_space)} "
            f"for observations in {describe_space(observation_space)}")


def describe_space(space: gym.Space[Any]) -> str:
    """A short name for a space: 'Discrete(2)', 'Box(4,) float32', 'MultiDiscrete([3, 3])', 'MultiBinary(4)'."""
    if isinstance(space, gym.spaces.Box):
        return f"Box{tuple(space.shape)} {space.dtype}"
    if isinstance(space, gym.spaces.MultiDiscrete):
        return f"MultiDiscrete({space.nvec.tolist()})"
    if isinstance(space, gym.spaces.MultiBinary):
        return f"MultiBinary({space.n})"
    return repr(space)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the deprecation warnings and log lines torch prints while tracing and exporting."""
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_log.setLevel(level)


def _build_sb3(source: ExportSource) -> tuple[bytes, str]:
    return source.path.read_bytes(), (f"stable-baselines3 zip: {source.algorithm}.load(path) then "
                                      "model.predict(obs, deterministic=True)")


def _build_torchscript(source: ExportSource) -> tuple[bytes, str]:
    with _EXPORT_LOCK, _quiet(), torch.no_grad():
        module, example, metadata, model = _load_module(source)
        traced = torch.jit.trace(module, example)  # type: ignore[no-untyped-call]
        check_equivalent(traced, model, "the traced TorchScript module")
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={METADATA_NAME: json.dumps(metadata)})
    return buffer.getvalue(), str(metadata["signature"])


def _build_onnx(source: ExportSource) -> tuple[bytes, str]:
    import onnx

    with _EXPORT_LOCK, _quiet(), torch.no_grad():
        module, example, metadata, _ = _load_module(source)
        try:
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=["obs"],
                                        output_names=["action"], verbose=False,
                                        dynamic_shapes={"obs": {0: torch.export.Dim("batch")}})
        except Exception as exc:  # an old torch, or an operation its exporter does not cover
            reason = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ExportUnavailable(f"format: torch's ONNX exporter failed on this policy: {type(exc).__name__}: "
                                    f"{reason}; export format torchscript or sb3", field="format") from None
        if program is None:
            raise ExportUnavailable("format: torch's ONNX exporter returned nothing", field="format")
        proto = program.model_proto
        onnx.helper.set_model_props(proto, {METADATA_NAME: json.dumps(metadata)})
    return proto.SerializeToString(), str(metadata["signature"])


EXPORT_FORMATS: dict[str, ExportFormat] = {
    "torchscript": ExportFormat("torchscript", ".pt", _build_torchscript),
    "onnx": ExportFormat("onnx", ".onnx", _build_onnx, requires=("onnx", "onnxscript")),
    "sb3": ExportFormat("sb3", ".zip", _build_sb3),
}
