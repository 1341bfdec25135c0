"""Where a resumed run picks up: the newest checkpoint that loads (with its replay buffer and normalisation
statistics), and the episode history up to it, so counters, schedules, optimizer state, replay memory, running
means and learning curves continue as if never stopped."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stable_baselines3.common.vec_env import VecNormalize

from rl_service.core.models.ports import ModelStore
from rl_service.core.runs.history import load_entries
from rl_service.core.runs.normalizing import restore_stats
from rl_service.core.seeds import MAX_SEED


@dataclass
class Restored:
    """A model loaded from a checkpoint, and the episodes recorded up to it."""

    model: Any
    checkpoint: Path
    episodes: list[dict[str, Any]]


def restore(algorithm_cls: Any, store: ModelStore, run_id: str, env: Any, log: Any) -> Restored | None:
    """The newest checkpoint of the run that loads, or None when none does (the run then starts over).

    A checkpoint that fails to load (cut short by a crash, corrupted on disk) is skipped with a log line; so is
    one without readable statistics when `env` normalises (its running means would start over).
    """
    for checkpoint in reversed(store.checkpoints(run_id)):
        try:
            # stable-baselines3 restores the optimizer state and num_timesteps, and with them the schedules.
            model = algorithm_cls.load(checkpoint, env=env, device="cpu")
            if isinstance(env, VecNormalize):
                restore_stats(env, checkpoint)
        except Exception as exc:
            log.warning("skipping a checkpoint that does not load", path=str(checkpoint),
                        error=f"{type(exc).__name__}: {exc}"[:300])
            continue
        buffer = store.replay_buffer(checkpoint)
        if buffer is not None and hasattr(model, "load_replay_buffer"):
            model.load_replay_buffer(buffer)
        timesteps = int(model.num_timesteps)
        episodes = [e for e in load_entries(store.run_dir(run_id) / "history.json")
                    if isinstance(e, dict) and int(e.get("timesteps", 0)) <= timesteps]
        log.info("resuming from a checkpoint", path=str(checkpoint), timesteps=timesteps,
                 replay_buffer=buffer is not None, normalized=isinstance(env, VecNormalize), episodes=len(episodes))
        return Restored(model, checkpoint, episodes)
    return None


def attempt_seed(seed: int, start_timesteps: int) -> int:
    """The seed of an attempt that starts at `start_timesteps`: the run's own for the first, a fresh stream after,
    so a resumed run does not replay the episodes it already saw."""
    return (seed + start_timesteps) % (MAX_SEED + 1)


def has_replay_buffer(model: Any) -> bool:
    """True for off-policy models (DQN, SAC, ...), whose replay buffer a checkpoint should carry."""
    return getattr(model, "replay_buffer", None) is not None and hasattr(model, "save_replay_buffer")
