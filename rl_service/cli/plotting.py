"""Learning curves from a run's episode history (GetRunHistory), drawn with matplotlib into a PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rl_service.cli.client import Client
from rl_service.infra.atomic import atomic_write_bytes
from rl_service_proto.v1 import training_pb2 as pb

WIDTH_INCHES, HEIGHT_INCHES, DPI = 10.0, 6.0, 100  # a 1000 x 600 PNG


def fetch_history(client: Client, run_id: str) -> list[pb.EpisodeRecord]:
    """Every recorded episode of the run, page by page."""
    episodes: list[pb.EpisodeRecord] = []
    while True:
        page = client.call(client.training.GetRunHistory, pb.RunHistoryRequest(run_id=run_id, offset=len(episodes)))
        episodes.extend(page.episodes)
        if not page.episodes or len(episodes) >= page.total_episodes:
            return episodes


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """The mean of the last `window` values at each point (fewer at the start), as SB3's ep_rew_mean."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return data
    sums = np.cumsum(np.insert(data, 0, 0.0))
    ends = np.arange(1, data.size + 1)
    starts = np.maximum(ends - max(window, 1), 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_learning_curve(episodes: Sequence[pb.EpisodeRecord], title: str, path: Path, window: int) -> None:
    """Episode reward, its moving average and episode length over timesteps, written as a PNG (atomically)."""
    from matplotlib.figure import Figure  # imported here: matplotlib takes a moment to load

    steps = np.asarray([e.timesteps for e in episodes], dtype=np.int64)
    rewards = [e.reward for e in episodes]
    lengths = np.asarray([e.length for e in episodes], dtype=np.int64)
    figure = Figure(figsize=(WIDTH_INCHES, HEIGHT_INCHES), dpi=DPI, layout="constrained")
    reward_axes, length_axes = figure.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    reward_axes.plot(steps, rewards, color="tab:blue", alpha=0.3, linewidth=0.8, marker=".", markersize=2,
                     label="episode reward")
    reward_axes.plot(steps, moving_average(rewards, window), color="tab:blue", linewidth=2,
                     label=f"moving average ({window} episodes)")
    reward_axes.set_ylabel("episode reward")
    reward_axes.legend(loc="upper left")
    reward_axes.grid(alpha=0.3)
    length_axes.plot(steps, lengths, color="tab:orange", linewidth=1)
    length_axes.set_ylabel("episode length")
    length_axes.set_xlabel("timesteps")
    length_axes.grid(alpha=0.3)
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())
