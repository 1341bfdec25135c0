"""Trained policies exported for use outside the service: the stable-baselines3 zip, TorchScript and ONNX.

A plain registry of formats (name -> ExportFormat); a lookup miss lists the valid names. TorchScript and ONNX are
the run's CompiledActor itself, the module Act and ActBatch run (normalisation and masks included): TorchScript
scripts it around its traced core (the very program Act runs, checked against the module when it is compiled),
and ONNX exports the same module, so an export and Act compute the same function. (An ONNX file is not run
before it leaves: onnxruntime is not a server dependency; the tests check ONNX exports against Act.)

Masks: the TorchScript program of a Discrete policy takes `action_mask: Optional[Tensor]` (bool [batch, n], true =
legal) as a second argument. ONNX graphs have no optional inputs, so an ONNX export takes `action_mask` as a
second, required input only for policies trained with masks (MaskablePPO; pass all true for "no mask"); every other
ONNX export keeps the single `obs` input.
"""

from __future__ import annotations

import importlib.util
import io
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from torch import Tensor

from rl_service.core.errors import ExportUnavailable, UnknownExportFormat, quoted
from rl_service.core.models import actor_program
from rl_service.core.models.compiled_actor import CompiledActor
from rl_service.core.models.served_policy import ServedPolicy

METADATA_NAME = "rl_service.json"  # TorchScript extra file / ONNX metadata key holding what was exported
# Tracing and exporting are CPU-heavy and torch.export keeps global state: one export at a time.
_EXPORT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ExportSource:
    """What to export: a run's model file and the compiled policy Act serves from it."""

    run_id: str
    algorithm: str
    env_id: str
    path: Path
    timesteps: int
    served: ServedPolicy


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


def check_equivalent(program: Callable[..., Tensor], served: ServedPolicy, what: str) -> None:
    """ExportUnavailable unless `program` gives the actions the served actor gives (as Act), masked and not."""
    try:
        actor_program.check_equivalent(program, served.actor, _inputs(served), what)
    except actor_program.ProgramMismatch as exc:
        raise ExportUnavailable(f"format: {exc}; export format sb3", field="format") from None


def _inputs(served: ServedPolicy, count: int = actor_program.CHECK_OBSERVATIONS) -> tuple[Tensor, Tensor | None]:
    return actor_program.check_inputs(served.observation_space, served.action_space, served.maskable, count)


def _signature(served: ServedPolicy, mask_input: str, optional_mask: bool) -> str:
    """The program's call in words; an optional mask is described after the plain call, which stays the first
    words (clients read the signature of an unmasked policy as before)."""
    obs_space, action_space = served.observation_space, served.action_space
    obs = ", ".join(["batch", *(str(d) for d in obs_space.shape or ())])
    act = ", ".join(["batch", *(str(d) for d in action_space.shape or ())])
    kind = "int64" if isinstance(action_space, gym.spaces.Discrete | gym.spaces.MultiDiscrete) else "float32"
    required = "" if optional_mask else mask_input
    text = (f"forward(obs: float32[{obs}]{required}) -> {kind}[{act}]: deterministic actions in "
            f"{describe_space(action_space)} for raw observations in {describe_space(obs_space)}")
    if mask_input and optional_mask:
        text += f"; optional second argument{mask_input.lstrip(',')} (true = legal, a masked action is never chosen)"
    elif mask_input:
        text += "; action_mask: true = legal, a masked action is never chosen (all true: no mask)"
    if served.normalized:
        text += "; normalises observations with the run's VecNormalize statistics first (built in)"
    return text


def describe_space(space: gym.Space[Any]) -> str:
    """A short name for a space: 'Discrete(2)', 'Box(4,) float32', 'MultiDiscrete([3, 3])', 'MultiBinary(4)'."""
    if isinstance(space, gym.spaces.Box):
        return f"Box{tuple(space.shape)} {space.dtype}"
    if isinstance(space, gym.spaces.MultiDiscrete):
        return f"MultiDiscrete({space.nvec.tolist()})"
    if isinstance(space, gym.spaces.MultiBinary):
        return f"MultiBinary({space.n})"
    return repr(space)


def _metadata(source: ExportSource, signature: str) -> str:
    served = source.served
    return json.dumps({
        "run_id": source.run_id, "algorithm": source.algorithm, "env_id": source.env_id,
        "model_timesteps": source.timesteps, "observation_space": describe_space(served.observation_space),
        "action_space": describe_space(served.action_space), "normalized": served.normalized,
        "signature": signature,
    })


def _build_sb3(source: ExportSource) -> tuple[bytes, str]:
    signature = (f"stable-baselines3 zip: {source.algorithm}.load(path) then model.predict(obs, "
                 "deterministic=True)")
    if source.served.normalized:
        signature += ("; the run trained with normalize: observations must be normalised with its statistics, "
                      "which this zip does not hold (the torchscript and onnx exports include them)")
    return source.path.read_bytes(), signature


def _build_torchscript(source: ExportSource) -> tuple[bytes, str]:
    served = source.served
    mask = f", action_mask: Optional[bool[batch, {served.action_space.n}]] = None" if served.maskable else ""  # type: ignore[attr-defined]
    signature = _signature(served, mask, optional_mask=True)
    program = served.program  # the very program Act runs
    if program is None:
        raise ExportUnavailable(f"format: TorchScript cannot compile this policy ({served.program_error}); export "
                                "format onnx or sb3", field="format")
    with _EXPORT_LOCK, actor_program.quiet():
        buffer = io.BytesIO()
        torch.jit.save(program, buffer, _extra_files={METADATA_NAME: _metadata(source, signature)})
    return buffer.getvalue(), signature


class _ObsProgram(torch.nn.Module):
    """ONNX's view of the actor: observations only."""

    def __init__(self, actor: CompiledActor) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, obs: Tensor) -> Tensor:
        out: Tensor = self.actor(obs, None)
        return out


class _MaskedProgram(torch.nn.Module):
    """ONNX's view of a masked policy's actor: observations and a required mask."""

    def __init__(self, actor: CompiledActor) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, obs: Tensor, action_mask: Tensor) -> Tensor:
        out: Tensor = self.actor(obs, action_mask)
        return out


def _build_onnx(source: ExportSource) -> tuple[bytes, str]:
    import onnx

    served = source.served
    masked = served.trained_with_masks and served.maskable
    actor = served.fresh_actor()
    obs, mask = _inputs(served, 2)
    batch = torch.export.Dim("batch")
    if masked:
        module: torch.nn.Module = _MaskedProgram(actor)
        args: tuple[Tensor, ...] = (obs, mask)  # type: ignore[assignment]
        names, shapes = ["obs", "action_mask"], {"obs": {0: batch}, "action_mask": {0: batch}}
        signature = _signature(served, f", action_mask: bool[batch, {served.action_space.n}]",  # type: ignore[attr-defined]
                               optional_mask=False)
    else:
        module, args, names, shapes = _ObsProgram(actor), (obs,), ["obs"], {"obs": {0: batch}}
        signature = _signature(served, "", optional_mask=False)
    with _EXPORT_LOCK, actor_program.quiet(), torch.no_grad():
        try:
            program = torch.onnx.export(module.eval(), args, dynamo=True, input_names=names,
                                        output_names=["action"], verbose=False, dynamic_shapes=shapes)
        except Exception as exc:  # an old torch, or an operation its exporter does not cover
            reason = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ExportUnavailable(f"format: torch's ONNX exporter failed on this policy: {type(exc).__name__}: "
                                    f"{reason}; export format torchscript or sb3", field="format") from None
        if program is None:
            raise ExportUnavailable("format: torch's ONNX exporter returned nothing", field="format")
        proto = program.model_proto
        onnx.helper.set_model_props(proto, {METADATA_NAME: _metadata(source, signature)})
    return proto.SerializeToString(), signature


EXPORT_FORMATS: dict[str, ExportFormat] = {
    "torchscript": ExportFormat("torchscript", ".pt", _build_torchscript),
    "onnx": ExportFormat("onnx", ".onnx", _build_onnx, requires=("onnx", "onnxscript")),
    "sb3": ExportFormat("sb3", ".zip", _build_sb3),
}
