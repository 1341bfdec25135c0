"""The CompiledActor as a TorchScript program: its core traced (the policy's own layers), the rest scripted. Act,
ActBatch and the TorchScript export all run this one program; each is checked against the eager module first."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from rl_service.core.models.compiled_actor import CompiledActor

CHECK_OBSERVATIONS = 16  # sampled observations each program is checked on before it is used


class ProgramMismatch(ValueError):
    """A compiled program that does not give the eager actor's actions."""


def check_inputs(observation_space: gym.Space[Any], action_space: gym.Space[Any], maskable: bool,
                 count: int = CHECK_OBSERVATIONS) -> tuple[Tensor, Tensor | None]:
    """Sampled observations (seeded: programs are reproducible) and, for Discrete policies, random legal masks."""
    space = copy.deepcopy(observation_space)
    space.seed(0)
    obs = torch.as_tensor(np.stack([space.sample() for _ in range(count)]), dtype=torch.float32)
    if not maskable:
        return obs, None
    n = int(action_space.n)  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(count, n, generator=generator) < 0.5
    mask[torch.arange(count), torch.randint(0, n, (count,), generator=generator)] = True  # one legal at least
    return obs, mask


def check_equivalent(program: Callable[..., Tensor], actor: CompiledActor, inputs: tuple[Tensor, Tensor | None],
                     what: str) -> None:
    """ProgramMismatch unless `program` gives the actions the eager actor gives, masked and not."""
    obs, mask = inputs
    cases: list[tuple[Tensor, ...]] = [(obs,)] if mask is None else [(obs,), (obs, mask)]
    with torch.no_grad():
        for args in cases:
            expected = actor(*args).numpy()
            actions = program(*args).numpy()
            if actions.shape != expected.shape or not np.allclose(actions, expected, rtol=1e-5, atol=1e-6):
                raise ProgramMismatch(f"{what} does not reproduce the policy's actions")


def script_actor(actor: CompiledActor, inputs: tuple[Tensor, Tensor | None]) -> torch.jit.ScriptModule:
    """The actor as TorchScript (sharing its weights), checked against it on `inputs`."""
    with quiet(), torch.no_grad():
        traced_core = torch.jit.trace(actor.core, actor.normalizer(inputs[0][:2]))  # type: ignore[no-untyped-call]
        program: torch.jit.ScriptModule = torch.jit.script(CompiledActor(actor.normalizer, traced_core, actor.head))
    check_equivalent(program, actor, inputs, "the TorchScript program")
    return program


@contextlib.contextmanager
def quiet() -> Iterator[None]:
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
