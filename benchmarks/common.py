"""Shared pieces of the benchmark sections: statistics, a server in a subprocess, and the results writer.

Every section returns a `Section` (tables plus raw figures); `write_results` turns the sections of one run into
RESULTS.md and results.json. Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    """The median (nan for no values)."""
    return float(statistics.median(values)) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, nan when the denominator is 0 or either is nan."""
    if denominator == 0 or math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table: significant digits, thousands separated, '-' for None or nan."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def fmt_ratio(value: float) -> str:
    """A ratio as '1.02x' ('-' for nan)."""
    return "-" if math.isnan(value) else f"{value:.2f}x"


def goal_cell(met: bool | None) -> str:
    """The goal column: 'met', 'NOT met', or 'not assessed' (quick mode, or nothing measured)."""
    if met is None:
        return "not assessed"
    return "met" if met else "**NOT met**"


def interleaved(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each variant once per repeat, in a rotating order, so machine noise hits all alike."""
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            samples[name].append(variants[name]())
    return samples


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class Table:
    """One markdown table."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def markdown(self) -> str:
        """The table as GitHub markdown, with its title in bold above it."""
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Section:
    """A section's outcome: prose, tables, raw figures for the JSON file, and images."""

    name: str
    title: str
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)  # paths relative to the output directory
    seconds: float = 0.0


def write_keeping_analysis(md_path: Path, text: str) -> None:
    """Write a report, keeping the hand-written "## Analysis" section a previous version of it ended with."""
    kept = md_path.read_text().split("\n## Analysis", 1) if md_path.exists() else []
    md_path.write_text(text + ("\n## Analysis" + kept[1] if len(kept) == 2 else ""))


def machine_line(facts: dict[str, Any]) -> str:
    """One line of machine facts."""
    versions = ", ".join(f"{k} {v}" for k, v in facts["versions"].items())
    return f"{facts['cpu']}, {facts['cores']} cores ({facts['platform']}); {versions}"


def write_results(output: Path, sections: list[Section], facts: dict[str, Any], quick: bool,
                  command: str) -> tuple[Path, Path]:
    """RESULTS.md in `output` and results.json in `output`/results (merged with sections already there)."""
    output.mkdir(parents=True, exist_ok=True)
    json_path = output / "results" / "results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    previous: dict[str, Any] = {}
    if json_path.exists():
        try:
            previous = json.loads(json_path.read_text()).get("sections", {})
        except (OSError, ValueError):
            previous = {}
    for section in sections:
        previous[section.name] = {
            "title": section.title, "date": date, "quick": quick, "command": command, "machine": facts,
            "seconds": round(section.seconds, 1), "load_average": [round(x, 2) for x in os.getloadavg()],
            "intro": section.intro, "notes": section.notes,
            "tables": [{"title": t.title, "header": t.header, "rows": t.rows} for t in section.tables],
            "images": section.images, "data": section.data,
        }
    json_path.write_text(json.dumps({"sections": previous}, indent=1, default=str) + "\n")
    md_path = output / "RESULTS.md"
    md_path.write_text(render_markdown(previous, output / "results" / "findings"))
    return md_path, json_path


SECTION_ORDER = ["overhead", "external_env", "act", "experience", "learning", "footprint", "chaos", "policy_learning",
                 "learning_breadth", "ray", "fuzz", "http", "simulation_speed"]


def render_markdown(sections: dict[str, Any], findings: Path | None = None) -> str:
    """RESULTS.md from results.json's sections (each keeps the machine facts and date of the run that made it).

    `findings/<section>.md`, where present, is a hand-written reading of that section's figures (why a goal was
    missed, what the profile shows); it is included under the section's tables, and says which run it reads.
    """
    lines = [
        "# Benchmarks: the service against bare libraries and published results",
        "",
        "Written by `python -m benchmarks run` (see `benchmarks/__main__.py`); raw figures in "
        "`results/results.json`. Each section records the run that produced it: date, command and machine. "
        "Compared variants are measured side by side in the same run, interleaved per repeat; the figures are "
        "medians over the repeats and the ratios are ratios of medians. The machine is shared (2 cores, other "
        "users' jobs), so single timings are noisy: read the ratios, not the absolute numbers.",
        "",
        "## Summary",
        "",
        "| section | goal | measured | goal met |",
        "|---|---|---|---|",
    ]
    ordered = sorted(sections, key=lambda n: SECTION_ORDER.index(n) if n in SECTION_ORDER else 99)
    for name in ordered:
        for row in sections[name].get("data", {}).get("summary", []):
            lines.append(f"| {sections[name]['title']} | {row['goal']} | {row['measured']} | "
                         f"{goal_cell(row['met'])} |")
    for name in ordered:
        sec = sections[name]
        lines += ["", f"## {sec['title']}", "",
                  f"_Run {sec['date']} by `{sec['command']}`"
                  f"{' (quick mode: tiny budgets, no goals)' if sec['quick'] else ''}"
                  f", {sec['seconds']} s. Machine: {machine_line(sec['machine'])}"
                  + (f"; load average at the end {sec['load_average'][0]} (1 min), {sec['load_average'][1]} (5 min)"
                     if sec.get("load_average") else "") + "._", ""]
        if sec.get("intro"):
            lines += [sec["intro"], ""]
        for table in sec.get("tables", []):
            lines += [Table(table["title"], table["header"], table["rows"]).markdown(), ""]
        for image in sec.get("images", []):
            lines += [f"![{Path(image).stem}]({image})", ""]
        for note in sec.get("notes", []):
            lines += [f"- {note}"]
        if sec.get("notes"):
            lines.append("")
        written = findings / f"{name}.md" if findings is not None else None
        if written is not None and written.exists():
            lines += ["### Findings", "", written.read_text().strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------- servers


@dataclass
class ServerProcess:
    """`python server.py` in a subprocess, on 127.0.0.1 and a free port."""

    process: subprocess.Popen[str]
    port: int
    started_at: float  # perf_counter when Popen was called
    log_path: Path
    http_url: str = ""  # the HTTP API's base URL from the "server started" line ("" when HTTP is off)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM, then wait (the server checkpoints its runs); SIGKILL if it does not exit."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_server_process(data_dir: Path, *extra: str, env: dict[str, str] | None = None,
                         timeout: float = 60, new_session: bool = False) -> ServerProcess:
    """Start server.py with --port 0 and JSON logs; the port comes from its "server started" log line.

    new_session: in a process group of its own (its pid is the group's id), so os.killpg reaches everything it
    started."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "server.log"
    # HTTP_PORT=0: never the default 8080, which another server (or a parallel CI job) may hold.
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "HTTP_PORT": "0", **(env or {})}
    command = [sys.executable, str(REPO / "server.py"), "--host", "127.0.0.1", "--port", "0", "--data-dir",
               str(data_dir), "--log-format", "json", "--log-level", "INFO", "--env-file", os.devnull, *extra]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=str(data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=environment, start_new_session=new_session)
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    with log_path.open("a") as log:  # a restarted server adds to its predecessor's log
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                if process.poll() is not None:
                    break
                continue
            log.write(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "server started":
                port = int(str(record["address"]).rsplit(":", 1)[1])
                _drain(process, log_path)
                http = str(record.get("http", "off"))
                return ServerProcess(process, port, started, log_path, "" if http == "off" else http.rstrip("/"))
    process.kill()
    raise RuntimeError(f"server did not start; see {log_path}")


def _drain(process: subprocess.Popen[str], log_path: Path) -> None:
    """Keep reading the server's output into its log file so the pipe never fills."""
    import threading

    def pump() -> None:
        assert process.stdout is not None
        with log_path.open("a") as log:
            for line in process.stdout:
                log.write(line)
                log.flush()

    threading.Thread(target=pump, daemon=True).start()


def training_stub(address: str) -> Any:
    """A TrainingService stub on a fresh channel, once the channel is ready."""
    import grpc

    from rl_service_proto.v1 import training_pb2_grpc

    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=30)
    return training_pb2_grpc.TrainingServiceStub(channel)


def wait_for_runs(stub: Any, run_ids: Sequence[str], poll: float = 2.0,
                  timeout: float = 24 * 3600, on_poll: Callable[[dict[str, Any]], None] | None = None
                  ) -> dict[str, Any]:
    """Poll GetTrainingStatus until every run has ended; returns run_id -> final TrainingStatus."""
    from rl_service_proto.v1 import training_pb2 as pb

    ended = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED, pb.INTERRUPTED}
    final: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while len(final) < len(run_ids) and time.monotonic() < deadline:
        for run_id in run_ids:
            if run_id in final:
                continue
            status = stub.GetTrainingStatus(pb.RunRequest(run_id=run_id), timeout=30)
            if status.state in ended:
                final[run_id] = status
        if on_poll is not None:
            on_poll(final)
        if len(final) < len(run_ids):
            time.sleep(poll)
    return final
