"""A run's VecNormalize: built from the `normalize` options, its statistics read out for the statistics files
(core/models/normalization.py) and written back on resume. Never VecNormalize.save/load: those pickle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecEnv, VecNormalize, sync_envs_normalization

from rl_service.core.algorithms.normalize import NormalizeOptions
from rl_service.core.models.normalization import NormalizeStats, load_stats, stats_path


def wrap(env: VecEnv, options: NormalizeOptions, algorithm_gamma: float | None) -> VecEnv:
    """`env` under a training VecNormalize when `options` normalise anything, else `env` itself."""
    if not options.enabled:
        return env
    gamma = options.gamma if options.gamma is not None else (algorithm_gamma if algorithm_gamma is not None else 0.99)
    return VecNormalize(env, training=True, norm_obs=options.norm_obs, norm_reward=options.norm_reward,
                        clip_obs=options.clip_obs, clip_reward=options.clip_reward, gamma=gamma,
                        epsilon=options.epsilon)


def wrap_for_evaluation(env: VecEnv, training: VecEnv) -> VecEnv:
    """`env` under a frozen copy of the training env's normaliser (raw rewards); `env` itself without one."""
    if not isinstance(training, VecNormalize):
        return env
    return VecNormalize(env, training=False, norm_obs=training.norm_obs, norm_reward=False,
                        clip_obs=training.clip_obs, clip_reward=training.clip_reward, gamma=training.gamma,
                        epsilon=training.epsilon)


def sync_for_evaluation(training: VecEnv, evaluation: VecEnv) -> None:
    """Give the evaluation env the training statistics as they are now (it never updates them)."""
    if isinstance(training, VecNormalize) and isinstance(evaluation, VecNormalize):
        sync_envs_normalization(training, evaluation)


def stats_of(env: VecEnv | None) -> NormalizeStats | None:
    """The statistics of a training env's VecNormalize, or None when it has none."""
    if not isinstance(env, VecNormalize):
        return None
    obs_rms, ret_rms = env.obs_rms, env.ret_rms
    if not isinstance(obs_rms, RunningMeanStd):  # Dict observation spaces are refused before training
        raise TypeError("normalisation statistics of dict observations are not supported")
    return NormalizeStats(
        obs_mean=np.asarray(obs_rms.mean, dtype=np.float64), obs_var=np.asarray(obs_rms.var, dtype=np.float64),
        obs_count=float(obs_rms.count), ret_mean=float(np.asarray(ret_rms.mean).reshape(-1)[0]),
        ret_var=float(np.asarray(ret_rms.var).reshape(-1)[0]), ret_count=float(ret_rms.count),
        norm_obs=bool(env.norm_obs), norm_reward=bool(env.norm_reward), clip_obs=float(env.clip_obs),
        clip_reward=float(env.clip_reward), epsilon=float(env.epsilon), gamma=float(env.gamma))


def restore_stats(env: VecNormalize, model_path: Path) -> None:
    """Load the statistics saved beside a checkpoint or model into `env` (ValueError when missing or unreadable,
    or when they do not fit the env)."""
    path = stats_path(model_path)
    if not path.is_file():
        raise ValueError(f"{path.name}: no normalisation statistics beside {model_path.name}")
    stats = load_stats(path)
    obs_rms = env.obs_rms
    if not isinstance(obs_rms, RunningMeanStd):  # Dict observation spaces are refused before training
        raise ValueError("normalisation statistics of dict observations are not supported")
    expected = tuple(obs_rms.mean.shape)
    if tuple(stats.obs_mean.shape) != expected or tuple(stats.obs_var.shape) != expected:
        raise ValueError(f"{path.name}: statistics of shape {stats.obs_mean.shape}, the env's observations are "
                         f"{expected}")
    obs_rms.mean = stats.obs_mean.copy()
    obs_rms.var = stats.obs_var.copy()
    obs_rms.count = stats.obs_count
    env.ret_rms.mean = np.asarray(stats.ret_mean, dtype=np.float64)
    env.ret_rms.var = np.asarray(stats.ret_var, dtype=np.float64)
    env.ret_rms.count = stats.ret_count


def vec_normalize_of(model: Any) -> VecNormalize | None:
    """The model's training VecNormalize, if it has one."""
    env = model.get_vec_normalize_env()
    return env if isinstance(env, VecNormalize) else None
