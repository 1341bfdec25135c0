"""What the command line prints: run tables and details for people, plain JSON for scripts."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rl_service_proto.v1 import training_pb2 as pb

STATE_STYLES = {
    "PENDING": "yellow", "RUNNING": "cyan", "SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "magenta",
    "INTERRUPTED": "red",
}


@dataclass
class Output:
    """Where a command writes: `out` for results (stdout), `err` for errors and notes (stderr)."""

    out: Console
    err: Console

    def line(self, text: str) -> None:
        """One line of plain text on stdout (no markup, no wrapping)."""
        self.out.print(text, markup=False, highlight=False, soft_wrap=True)

    def table(self, table: Table) -> None:
        """A table on stdout without the trailing spaces rich pads every row with to the widest row."""
        with self.out.capture() as captured:
            self.out.print(table)
        self.out.file.write("".join(_without_trailing_blanks(line) + "\n" for line in captured.get().splitlines()))
        self.out.file.flush()

    def note(self, text: str) -> None:
        """One line of plain text on stderr."""
        self.err.print(text, markup=False, highlight=False, soft_wrap=True)

    @classmethod
    def standard(cls) -> Output:
        """stdout and stderr; off a terminal, lines as wide as they need (tables in a pipe are not cut at 80)."""
        out = Console()
        if not out.is_terminal:
            out = Console(width=200)
        return cls(out, Console(stderr=True))

    def json(self, data: Any, compact: bool = False) -> None:
        """A JSON document on stdout, written raw so that no styling gets in (compact: one line, for streams)."""
        text = json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=2)
        self.out.file.write(text + "\n")
        self.out.file.flush()


_TRAILING_BLANKS = re.compile(r"(?:\s|\x1b\[[0-9;]*m)+$")  # spaces, with the colour codes around them


def _without_trailing_blanks(line: str) -> str:
    """A rendered line without its trailing padding; a colour reset is kept where the line used colour."""
    stripped = _TRAILING_BLANKS.sub("", line)
    return stripped + "\x1b[0m" if "\x1b[" in stripped else stripped


def state_name(state: int) -> str:
    """RunState number -> name (UNKNOWN(n) for a value this client does not know)."""
    try:
        return str(pb.RunState.Name(state))
    except ValueError:
        return f"UNKNOWN({state})"


def status_to_dict(status: pb.TrainingStatus) -> dict[str, Any]:
    """A TrainingStatus as JSON-ready data with natural types (state by name, numbers as numbers)."""
    metrics = status.metrics
    return {
        "run_id": status.run_id,
        "experiment_id": status.experiment_id,
        "owner": status.owner,
        "algorithm": status.algorithm,
        "env_id": status.env_id,
        "state": state_name(status.state),
        "is_done": status.is_done,
        "timesteps_done": status.timesteps_done,
        "total_timesteps": status.total_timesteps,
        "seed": status.seed,
        "hyperparameters": dict(sorted(status.hyperparameters.items())),
        "metrics": {
            "mean_episode_reward": metrics.mean_episode_reward,
            "mean_episode_length": metrics.mean_episode_length,
            "episodes_completed": metrics.episodes_completed,
            "steps_per_second": metrics.steps_per_second,
            "losses": dict(sorted(metrics.losses.items())),
        },
        "last_checkpoint_path": status.last_checkpoint_path,
        "model_path": status.model_path,
        "error": status.error,
        "stop_requested": status.stop_requested,
        "created_at": status.created_at,
        "started_at": status.started_at,
        "finished_at": status.finished_at,
        "attempt": status.attempt,
        "attempts": [{"attempt": a.attempt, "start_timesteps": a.start_timesteps, "end_timesteps": a.end_timesteps,
                      "started_at": a.started_at, "finished_at": a.finished_at, "outcome": a.outcome,
                      "error": a.error} for a in status.attempts],
    }


def styled_state(status: pb.TrainingStatus) -> str:
    """The state name with its colour, as rich markup."""
    name = state_name(status.state)
    return f"[{STATE_STYLES.get(name, 'white')}]{name}[/]"


def format_time(seconds: float, short: bool = False) -> str:
    """Unix seconds as local 'YYYY-MM-DD HH:MM:SS' (short: 'MM-DD HH:MM'), or '-' for 0 (not yet)."""
    if seconds <= 0:
        return "-"
    return time.strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def format_duration(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def progress_text(status: pb.TrainingStatus) -> str:
    """'1,024/100,000 (1%)'."""
    total = max(status.total_timesteps, 1)
    return f"{status.timesteps_done:,}/{status.total_timesteps:,} ({100 * status.timesteps_done / total:.0f}%)"


def reward_text(status: pb.TrainingStatus) -> str:
    """The mean episode reward, or '-' before the first episode ends."""
    return f"{status.metrics.mean_episode_reward:.2f}" if status.metrics.episodes_completed else "-"


def attempt_text(status: pb.TrainingStatus) -> str:
    """'2 (1: 0-3,000 server died)': the attempt, with how the earlier ones ended."""
    earlier = [f"{a.attempt}: {a.start_timesteps:,}-{a.end_timesteps:,} {a.outcome}" for a in status.attempts
               if a.outcome and a.attempt != status.attempt]
    return f"{max(status.attempt, 1)}" + (f" ({'; '.join(earlier)})" if earlier else "")


def runs_table(runs: Iterable[pb.TrainingStatus]) -> Table:
    """ListRuns as a table, newest first as the server sends them; an OWNER column when any run has an owner."""
    runs = list(runs)
    owners = any(status.owner for status in runs)  # a server without tokens records none: no empty column
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns = ("RUN", "EXPERIMENT", *(("OWNER",) if owners else ()), "ALGO", "ENV", "STATE", "TRY", "TIMESTEPS",
               "REWARD", "CREATED")
    for column in columns:
        # Labels fold onto a second line on a narrow terminal; ids, states and numbers never do.
        table.add_column(column, no_wrap=column not in ("EXPERIMENT", "ENV"), overflow="fold",
                         justify="right" if column in ("TRY", "TIMESTEPS", "REWARD") else "left")
    for status in runs:
        owner = (escape(status.owner) or "-",) if owners else ()
        table.add_row(status.run_id, escape(status.experiment_id), *owner, status.algorithm, escape(status.env_id),
                      styled_state(status), str(max(status.attempt, 1)),
                      f"{status.timesteps_done:,}/{status.total_timesteps:,}",
                      reward_text(status), format_time(status.created_at, short=True))
    return table


def status_table(status: pb.TrainingStatus) -> Table:
    """One run's details as a two-column table."""
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    metrics = status.metrics
    rows: list[tuple[str, str]] = [
        ("run", status.run_id),
        ("experiment", escape(status.experiment_id)),
        *((("owner", escape(status.owner)),) if status.owner else ()),
        ("algorithm", status.algorithm),
        ("environment", escape(status.env_id)),
        ("state", styled_state(status) + (" (stop requested)" if status.stop_requested and not status.is_done
                                          else "")),
        ("timesteps", progress_text(status)),
        ("attempt", attempt_text(status)),
        ("seed", str(status.seed)),
        ("mean reward", f"{reward_text(status)} (last 100 episodes)" if metrics.episodes_completed else "-"),
        ("mean length", f"{metrics.mean_episode_length:.1f}" if metrics.episodes_completed else "-"),
        ("episodes", f"{metrics.episodes_completed:,}"),
        ("steps/s", f"{metrics.steps_per_second:,.0f}" if metrics.steps_per_second else "-"),
        ("losses", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.losses.items())) or "-"),
        ("hyperparameters", escape(", ".join(f"{k}={v}" for k, v in sorted(status.hyperparameters.items()))) or "-"),
        ("created", format_time(status.created_at)),
        ("started", format_time(status.started_at)),
        ("finished", format_time(status.finished_at)),
        ("checkpoint", escape(status.last_checkpoint_path) or "-"),
        ("model", escape(status.model_path) or "-"),
    ]
    if status.error:
        rows.append(("error", f"[red]{escape(status.error)}[/]"))
    for key, value in rows:
        table.add_row(key, value)
    return table
