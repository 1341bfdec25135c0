"""Policy networks out of the service: TorchScript modules and safetensors state dicts; weights in, safely."""

from __future__ import annotations

import io
import warnings

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from rl_service.core.algorithms.networks import CategoricalPolicyNet, GaussianPolicyNet, PolicyNet
from rl_service.core.errors import InvalidRequest, quoted

# Magic numbers of formats that can run code when loaded: refused by name so the client learns why.
_CODE_CARRYING = ((b"PK\x03\x04", "a zip archive (TorchScript or an SB3 model)"), (b"\x80", "a pickle"))


class _ExportedCategorical(nn.Module):
    """obs (batch, *observation_shape) -> action probabilities (batch, n)."""

    def __init__(self, net: CategoricalPolicyNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        probs: torch.Tensor = self.net(obs.reshape(obs.shape[0], -1))
        return probs


class _ExportedGaussian(nn.Module):
    """obs (batch, *observation_shape) -> (mean, std), each (batch, action_size)."""

    def __init__(self, net: GaussianPolicyNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean_std: tuple[torch.Tensor, torch.Tensor] = self.net(obs.reshape(obs.shape[0], -1))
        return mean_std


def torchscript_bytes(net: PolicyNet) -> bytes:
    """The network as a TorchScript archive that torch.jit.load reads without rl_service installed."""
    wrapper: nn.Module = _ExportedCategorical(net) if isinstance(net, CategoricalPolicyNet) else _ExportedGaussian(net)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch marks TorchScript deprecated in favour of torch.export; TorchScript is the format clients
        # (C++ libtorch, other Python processes) load today, so it stays the export.
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(wrapper.eval())
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def state_dict_bytes(net: PolicyNet) -> bytes:
    """The network's state dict as safetensors."""
    return save_safetensors({k: v.detach().contiguous().clone() for k, v in net.state_dict().items()})


def weights_from_safetensors(data: bytes, net: PolicyNet, field: str) -> dict[str, torch.Tensor]:
    """Parse uploaded weights; they must be safetensors with exactly the network's keys, shapes and finite floats."""
    for magic, what in _CODE_CARRYING:
        if data.startswith(magic):
            raise InvalidRequest(
                f"{field}: looks like {what}; only a safetensors state dict is accepted, because TorchScript, "
                "pickle and SB3 zip files can run code when loaded", field=field)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise InvalidRequest(f"{field}: not a readable safetensors file ({quoted(str(exc))})", field=field) from None
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InvalidRequest(
            f"{field}: keys do not match the policy's architecture (missing: {missing or 'none'}; "
            f"unexpected: {quoted(str(unexpected)) if unexpected else 'none'})", field=field)
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise InvalidRequest(f"{field}: {key} has shape {quoted(str(tuple(tensor.shape)))}, the policy needs "
                                 f"{tuple(expected[key].shape)}", field=field)
        if not tensor.dtype.is_floating_point:
            raise InvalidRequest(f"{field}: {key} has dtype {tensor.dtype}; floating point expected", field=field)
        if not torch.isfinite(tensor).all():
            raise InvalidRequest(f"{field}: {key} holds NaN or Inf", field=field)
    return {key: tensor.to(expected[key].dtype) for key, tensor in tensors.items()}
