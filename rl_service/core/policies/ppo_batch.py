"""What a batch adds for PPO policies: truncated flags, behaviour log-probabilities or version, checked; settings.

Checked before the policy's lock is taken, like the rest of the batch, so a refused batch changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rl_service.core.algorithms.hyperparams import HyperValue
from rl_service.core.algorithms.ppo_update import PpoSettings
from rl_service.core.errors import InvalidRequest, ModelNotReady
from rl_service.core.policies.experience import SpaceShape, Transitions


class BehaviourVersionNotKept(ModelNotReady):
    """behaviour_version names a version whose weights the server no longer keeps (FAILED_PRECONDITION)."""


def check_truncated(truncated: np.ndarray, batch: Transitions) -> np.ndarray:
    """n flags (none sent: all false); a truncated transition must also be done."""
    n = len(batch)
    if truncated.size == 0:
        return np.zeros(n, dtype=bool)
    if truncated.size != n:
        raise InvalidRequest(f"truncated: {truncated.size} values for {n} transitions; one flag per transition, or "
                             "none", field="truncated")
    flags = truncated.astype(bool)
    cut_not_done = flags & ~batch.dones
    if cut_not_done.any():
        index = int(np.flatnonzero(cut_not_done)[0])
        raise InvalidRequest(f"truncated: transition {index} is truncated but not done; a truncated transition "
                             "ends its episode, so set its done flag too", field="truncated")
    return flags


def check_log_probs(shape: SpaceShape, log_probs: np.ndarray, n: int) -> np.ndarray:
    """The client's behaviour log-probabilities: n finite values, none positive for a discrete action."""
    if log_probs.size != n:
        raise InvalidRequest(f"log_probs: {log_probs.size} values for {n} transitions; one per transition",
                             field="log_probs")
    finite = np.isfinite(log_probs)
    if not finite.all():
        index = int(np.flatnonzero(~finite)[0])
        raise InvalidRequest(f"log_probs: value at index {index} is {log_probs[index]}; NaN and Inf are refused",
                             field="log_probs")
    # A probability is at most 1; a density (Box actions) may exceed it, so only discrete ones are bounded.
    if shape.discrete_actions is not None and (log_probs > 0).any():
        index = int(np.flatnonzero(log_probs > 0)[0])
        raise InvalidRequest(f"log_probs: value at index {index} is {log_probs[index]}; the log-probability of a "
                             "discrete action is at most 0", field="log_probs")
    return log_probs.astype(np.float32)


def check_behaviour_version(behaviour_version: int, current: int, kept: list[int]) -> None:
    """INVALID_ARGUMENT for a version the policy never had (or a later one), FAILED_PRECONDITION for one dropped."""
    if behaviour_version < 0 or behaviour_version > current:
        raise InvalidRequest(f"behaviour_version: the policy is at version {current}; {behaviour_version} is not "
                             "one of its versions", field="behaviour_version")
    if behaviour_version != current and behaviour_version not in kept:
        raise BehaviourVersionNotKept(
            f"behaviour_version: version {behaviour_version} is no longer kept (kept: {sorted(kept)}); act with a "
            "newer model, or send the behaviour log-probabilities in log_probs", field="behaviour_version")


def ppo_settings(values: Mapping[str, HyperValue]) -> PpoSettings:
    """A PPO policy's effective hyperparameters, typed."""
    def optional(key: str) -> float | None:
        value = values[key]
        return None if value is None else float(value)  # type: ignore[arg-type]

    return PpoSettings(
        n_epochs=int(values["n_epochs"]),  # type: ignore[arg-type]
        batch_size=int(values["batch_size"]),  # type: ignore[arg-type]
        clip_range=float(values["clip_range"]),  # type: ignore[arg-type]
        gamma=float(values["gamma"]),  # type: ignore[arg-type]
        gae_lambda=float(values["gae_lambda"]),  # type: ignore[arg-type]
        ent_coef=float(values["ent_coef"]),  # type: ignore[arg-type]
        vf_coef=float(values["vf_coef"]),  # type: ignore[arg-type]
        max_grad_norm=optional("max_grad_norm"),
        target_kl=optional("target_kl"),
        normalize_advantage=bool(values["normalize_advantage"]),
    )
