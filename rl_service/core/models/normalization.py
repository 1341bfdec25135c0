"""Observation and reward normalisation statistics (VecNormalize's running means) in a file that cannot carry code.

Written beside every checkpoint and final model of a run trained with `normalize` (`X.zip` ->
`X.normalize.safetensors`), read back by resume (the statistics continue) and by serving and export (a client
feeds raw observations; the served program normalises them exactly as training did). stable-baselines3's own
`VecNormalize.save` pickles the wrapper, which this server never loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = "1"
_SUFFIX = ".normalize.safetensors"


@dataclass(frozen=True)
class NormalizeStats:
    """VecNormalize's running statistics and options."""

    obs_mean: np.ndarray  # float64, the observation's shape
    obs_var: np.ndarray
    obs_count: float
    ret_mean: float
    ret_var: float
    ret_count: float
    norm_obs: bool
    norm_reward: bool
    clip_obs: float
    clip_reward: float
    epsilon: float
    gamma: float

    def normalize_observations(self, observations: np.ndarray) -> np.ndarray:
        """What VecNormalize.normalize_obs gives for raw observations (float32), or them unchanged."""
        if not self.norm_obs:
            return observations.astype(np.float32, copy=False)
        scaled = (observations - self.obs_mean) / np.sqrt(self.obs_var + self.epsilon)
        clipped: np.ndarray = np.clip(scaled, -self.clip_obs, self.clip_obs)
        return clipped.astype(np.float32)


def stats_path(model_path: Path) -> Path:
    """Where the statistics of the model or checkpoint at `model_path` (a .zip) live."""
    return model_path.with_name(model_path.stem + _SUFFIX)


def is_stats_file(path: Path) -> bool:
    """True for a statistics file (pruned and deleted with its checkpoint)."""
    return path.name.endswith(_SUFFIX)


def stats_bytes(stats: NormalizeStats) -> bytes:
    """`stats` as the bytes of a statistics file (the model store writes them atomically, confined to its root)."""
    from safetensors.numpy import save

    tensors, metadata = _tensors_and_metadata(stats)
    return save(tensors, metadata=metadata)


def save_stats(path: Path, stats: NormalizeStats) -> None:
    """Write `stats` to `path` directly (tests and tools; the server writes through the model store)."""
    path.write_bytes(stats_bytes(stats))


def _tensors_and_metadata(stats: NormalizeStats) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    tensors = {"obs_mean": np.ascontiguousarray(stats.obs_mean, dtype=np.float64),
               "obs_var": np.ascontiguousarray(stats.obs_var, dtype=np.float64)}
    metadata = {"format": FORMAT_VERSION, "obs_count": repr(float(stats.obs_count)),
                "ret_mean": repr(float(stats.ret_mean)), "ret_var": repr(float(stats.ret_var)),
                "ret_count": repr(float(stats.ret_count)), "norm_obs": str(bool(stats.norm_obs)).lower(),
                "norm_reward": str(bool(stats.norm_reward)).lower(), "clip_obs": repr(float(stats.clip_obs)),
                "clip_reward": repr(float(stats.clip_reward)), "epsilon": repr(float(stats.epsilon)),
                "gamma": repr(float(stats.gamma))}
    return tensors, metadata


def load_stats(path: Path) -> NormalizeStats:
    """Read statistics written by save_stats (ValueError when the file is not one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT_VERSION:
                raise ValueError(f"{path.name}: not a normalisation statistics file of format {FORMAT_VERSION}")
            obs_mean = handle.get_tensor("obs_mean")
            obs_var = handle.get_tensor("obs_var")
        return NormalizeStats(
            obs_mean=obs_mean, obs_var=obs_var, obs_count=float(metadata["obs_count"]),
            ret_mean=float(metadata["ret_mean"]), ret_var=float(metadata["ret_var"]),
            ret_count=float(metadata["ret_count"]), norm_obs=metadata["norm_obs"] == "true",
            norm_reward=metadata["norm_reward"] == "true", clip_obs=float(metadata["clip_obs"]),
            clip_reward=float(metadata["clip_reward"]), epsilon=float(metadata["epsilon"]),
            gamma=float(metadata["gamma"]))
    except (KeyError, OSError) as exc:
        raise ValueError(f"{path.name}: unreadable normalisation statistics ({exc})") from None
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged header
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"{path.name}: unreadable normalisation statistics ({type(exc).__name__})") from None
