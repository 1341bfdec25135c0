"""rl_service.core.models.normalization: the statistics file round-trips and matches VecNormalize's arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rl_service.core.models.normalization import NormalizeStats, is_stats_file, load_stats, save_stats, stats_path


def _stats() -> NormalizeStats:
    return NormalizeStats(obs_mean=np.array([0.5, -1.0, 2.0]), obs_var=np.array([4.0, 0.25, 1.0]), obs_count=1234.0,
                          ret_mean=0.0, ret_var=9.5, ret_count=1234.0, norm_obs=True, norm_reward=True,
                          clip_obs=10.0, clip_reward=10.0, epsilon=1e-8, gamma=0.99)


def test_round_trip(tmp_path: Path) -> None:
    path = stats_path(tmp_path / "checkpoint_100_steps.zip")
    assert path.name == "checkpoint_100_steps.normalize.safetensors" and is_stats_file(path)
    save_stats(path, _stats())
    back = load_stats(path)
    np.testing.assert_array_equal(back.obs_mean, _stats().obs_mean)
    np.testing.assert_array_equal(back.obs_var, _stats().obs_var)
    assert (back.obs_count, back.ret_var, back.norm_obs, back.clip_obs, back.gamma) == (1234.0, 9.5, True, 10.0, 0.99)


def test_normalize_matches_vecnormalize_formula() -> None:
    obs = np.array([[2.5, -1.5, 100.0]])
    expected = np.clip((obs - [0.5, -1.0, 2.0]) / np.sqrt(np.array([4.0, 0.25, 1.0]) + 1e-8), -10, 10)
    np.testing.assert_allclose(_stats().normalize_observations(obs), expected.astype(np.float32), rtol=1e-6)


def test_a_file_that_is_not_statistics_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x.normalize.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match=r"x\.normalize\.safetensors"):
        load_stats(bad)
