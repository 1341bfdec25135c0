"""A live progress bar for one run, fed by the TrainingStatus messages of WatchTraining.

On a terminal it is a rich progress bar (timesteps done/total, steps per second, ETA, mean reward); elsewhere
(a pipe, a CI log) it prints one plain line every few seconds, so logs stay readable.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from rl_service.cli.formatting import STATE_STYLES, format_duration, state_name
from rl_service_proto.v1 import training_pb2 as pb

PLAIN_INTERVAL_SECONDS = 10.0


def eta_seconds(status: pb.TrainingStatus) -> float | None:
    """Seconds left at the run's average speed so far; None when unknown (not running yet, no speed)."""
    speed = status.metrics.steps_per_second
    if status.is_done:
        return 0.0
    if status.state != pb.RUNNING or speed <= 0:
        return None
    return float(max(status.total_timesteps - status.timesteps_done, 0) / speed)


def steps_text(status: pb.TrainingStatus) -> str:
    """'1,024/100,000 steps' (done can pass the total: on-policy algorithms finish their last rollout)."""
    return f"{status.timesteps_done:,}/{status.total_timesteps:,} steps"


def speed_text(status: pb.TrainingStatus) -> str:
    """'2,345 steps/s' or '- steps/s'."""
    speed = status.metrics.steps_per_second
    return f"{speed:,.0f} steps/s" if speed > 0 else "- steps/s"


def eta_text(status: pb.TrainingStatus) -> str:
    """'ETA 0:01:05' or 'ETA -:--:--'."""
    eta = eta_seconds(status)
    return f"ETA {format_duration(eta)}" if eta is not None else "ETA -:--:--"


def reward_field(status: pb.TrainingStatus) -> str:
    """'reward 23.40' (mean over the last 100 episodes) or 'reward -'."""
    metrics = status.metrics
    return f"reward {metrics.mean_episode_reward:.2f}" if metrics.episodes_completed else "reward -"


def plain_line(status: pb.TrainingStatus) -> str:
    """The progress bar's content as one line of text."""
    return (f"{state_name(status.state):<9} {steps_text(status)}  {speed_text(status)}  {eta_text(status)}  "
            f"{reward_field(status)}")


class RunProgress:
    """Shows one run's progress on `console` while used as a context manager; `update` with each status."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._live = console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last_plain = 0.0

    def __enter__(self) -> RunProgress:
        if self._live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=30, complete_style="cyan", finished_style="green"),
                TextColumn("{task.fields[steps]}"),
                TextColumn("{task.fields[speed]}"),
                TextColumn("{task.fields[eta]}"),
                TextColumn("{task.fields[reward]}"),
                # Redrawn on each status (at most a few a second): no refresh thread needed.
                console=self._console, transient=False, auto_refresh=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("[yellow]PENDING  [/]", total=1, steps="0/- steps",
                                                 speed="- steps/s", eta="ETA -:--:--", reward="reward -")
        return self

    def update(self, status: pb.TrainingStatus) -> None:
        """Show this status."""
        if self._progress is not None and self._task is not None:
            name = state_name(status.state)
            self._progress.update(
                self._task, description=f"[{STATE_STYLES.get(name, 'white')}]{name:<9}[/]",
                completed=min(status.timesteps_done, status.total_timesteps) if status.total_timesteps else 0,
                total=max(status.total_timesteps, 1), steps=steps_text(status), speed=speed_text(status),
                eta=eta_text(status), reward=reward_field(status), refresh=True)
            return
        now = time.monotonic()
        if status.is_done or now - self._last_plain >= PLAIN_INTERVAL_SECONDS:
            self._last_plain = now
            self._console.print(plain_line(status), markup=False, highlight=False, soft_wrap=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.refresh()
            self._progress.stop()
