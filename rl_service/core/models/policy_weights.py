"""A run's policy rebuilt from what the server knows, with tensors read from a model file: nothing is unpickled.

stable-baselines3's `load` unpickles the `data` entry of its zip (spaces, policy_kwargs, schedules): safe only
while this server is the only writer of its directories. Here the policy is built from the algorithm's class and
the run's effective hyperparameters (the registry's constructor_kwargs, as the worker builds it) and the spaces
the worker recorded, and only `policy.pth` (a state dict) is read, with torch.load(weights_only=True).
"""

from __future__ import annotations

import inspect
import io
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from rl_service.core.errors import ModelNotReady

POLICY_MEMBER = "policy.pth"
# policy.pth holds the policy's weights (and its target networks): a network-size cap keeps them far below this.
MAX_POLICY_BYTES = 1 << 30


class IncompatibleModel(ModelNotReady):
    """A model file whose weights do not fit the policy rebuilt from the run's record (FAILED_PRECONDITION)."""


class DamagedModel(ValueError):
    """A model file that is not a readable zip: cut short by a crash, like a missing one (serving falls back)."""


@dataclass(frozen=True)
class PolicyBuild:
    """How to rebuild one run's policy: the algorithm's class and keyword arguments, and the spaces."""

    algorithm_cls: type[Any]
    constructor_kwargs: dict[str, Any]
    observation_space: gym.Space[Any]
    action_space: gym.Space[Any]


def rebuild_policy(build: PolicyBuild) -> tuple[Any, Any]:
    """(policy, algorithm) freshly built with untrained weights, as the algorithm's _setup_model builds it.

    The algorithm object is created without an environment and without _setup_model (no buffers are allocated):
    its constructor settles the policy class and the policy_kwargs it adds itself (DDPG's single critic, SAC's
    use_sde), exactly as training did.
    """
    algorithm = build.algorithm_cls("MlpPolicy", None, device="cpu", _init_setup_model=False,
                                    **build.constructor_kwargs)
    kwargs = dict(algorithm.policy_kwargs)
    accepts = inspect.signature(algorithm.policy_class.__init__).parameters
    # On-policy algorithms hand use_sde to the policy as an argument of its own, not in policy_kwargs.
    if isinstance(algorithm, OnPolicyAlgorithm) and "use_sde" in accepts and "use_sde" not in kwargs:
        kwargs["use_sde"] = bool(algorithm.use_sde)
    policy = algorithm.policy_class(build.observation_space, build.action_space, lambda _: 0.0, **kwargs)
    policy = policy.to("cpu")
    policy.set_training_mode(False)
    return policy, algorithm


def read_policy_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a stable-baselines3 zip's policy.pth, read in memory with weights_only=True.

    FileNotFoundError when the file is gone, DamagedModel when it is not a zip, IncompatibleModel when it is not
    a stable-baselines3 model's.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            try:
                info = archive.getinfo(POLICY_MEMBER)
            except KeyError:
                raise IncompatibleModel(f"{path.name} holds no {POLICY_MEMBER}", field="run_id") from None
            if info.file_size > MAX_POLICY_BYTES:
                raise IncompatibleModel(f"{path.name}: {POLICY_MEMBER} is {info.file_size} bytes, over the "
                                        f"{MAX_POLICY_BYTES}-byte limit", field="run_id")
            data = archive.read(info)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:  # cut short by a crash, or not a zip
        raise DamagedModel(f"{path.name} is not a readable model zip ({exc})") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise IncompatibleModel(f"{path.name}: {POLICY_MEMBER} is not a plain state dict "
                                f"({type(exc).__name__}: {reason})", field="run_id") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise IncompatibleModel(f"{path.name}: {POLICY_MEMBER} is not a mapping of names to tensors",
                                field="run_id")
    return state


def load_weights(policy: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Load `state` into `policy`; IncompatibleModel naming the first differences when it does not fit."""
    expected = policy.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise IncompatibleModel(
            f"{name}: its weights do not match the policy rebuilt from the run's algorithm, hyperparameters and "
            f"spaces (missing: {', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})",
            field="run_id")
    for key, tensor in state.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype.is_floating_point != want.dtype.is_floating_point:
            raise IncompatibleModel(
                f"{name}: {key} is {tensor.dtype} {tuple(tensor.shape)}, the policy rebuilt from the run's record "
                f"needs {want.dtype} {tuple(want.shape)}", field="run_id")
    policy.load_state_dict(state, strict=True)
