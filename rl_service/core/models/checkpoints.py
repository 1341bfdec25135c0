"""Checkpoint file names, in one place: checkpoint_<timesteps>_steps.zip (stable-baselines3's CheckpointCallback
naming), and beside it checkpoint_<timesteps>_steps.replay_buffer.pkl for off-policy algorithms and
checkpoint_<timesteps>_steps.normalize.safetensors for normalised runs (normalization.stats_path); written by the
model store, read back by resume, serving and export."""

from __future__ import annotations

import re
from pathlib import Path

_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)_steps\.zip$")
_REPLAY_BUFFER_NAME = re.compile(r"^checkpoint_(\d+)_steps\.replay_buffer\.pkl$")
_STATS_NAME = re.compile(r"^checkpoint_(\d+)_steps\.normalize\.safetensors$")


def checkpoint_name(timesteps: int) -> str:
    """The file name of the checkpoint taken at `timesteps`."""
    return f"checkpoint_{timesteps}_steps.zip"


def checkpoint_timesteps(path: str | Path) -> int | None:
    """The timesteps a checkpoint file was taken at, or None when `path` is not a checkpoint."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def replay_buffer_name(timesteps: int) -> str:
    """The file name of the replay buffer saved with the checkpoint taken at `timesteps`."""
    return f"checkpoint_{timesteps}_steps.replay_buffer.pkl"


def replay_buffer_timesteps(path: str | Path) -> int | None:
    """The timesteps of the checkpoint a replay-buffer file belongs to, or None for any other file."""
    match = _REPLAY_BUFFER_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def stats_timesteps(path: str | Path) -> int | None:
    """The timesteps of the checkpoint a normalisation statistics file belongs to, or None for any other file."""
    match = _STATS_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


# The best evaluated model of a run (hyperparameter eval_freq), in the run's directory under MODELS_DIR beside
# metadata.json; replaced whenever an evaluation beats the best so far. Served and exported as model "best".
BEST_MODEL_NAME = "best_model.zip"
