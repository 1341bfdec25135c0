"""The benchmark runner: `python -m benchmarks run [--quick] [--only NAME ...] [--output DIR]`, and
`python -m benchmarks render` to rewrite RESULTS.md from results/results.json (e.g. after editing the findings).

Sections: overhead, external_env, act, experience, learning, footprint, chaos, policy_learning, ray,
learning_breadth, fuzz, http, simulation_speed (see each module's docstring). The full run writes
benchmarks/RESULTS.md and benchmarks/results/results.json (a section run alone replaces only its own part);
--quick uses tiny budgets, asserts no goal, and writes to --output (default: a new temporary directory) so it never
touches the committed results.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Section, ServerProcess, start_server_process, write_results

SECTIONS = ("overhead", "external_env", "act", "experience", "learning", "footprint", "chaos",
            "policy_learning", "ray", "learning_breadth", "fuzz", "http", "simulation_speed")
DEFAULT_OUTPUT = Path(__file__).resolve().parent


class Context:
    """What the sections share: the output directory, the mode, and one service in a subprocess (started lazily)."""

    def __init__(self, output: Path, quick: bool, repeats: int, learning_data: Path | None, seeds: list[int],
                 fuzz_cases: int | None = None, keep_finished: bool = False) -> None:
        self.output = output
        self.fuzz_cases = fuzz_cases
        self.keep_finished = keep_finished
        self.quick = quick
        self.repeats = repeats
        self.learning_data = learning_data
        self.seeds = seeds
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-server-")
        self._server: ServerProcess | None = None

    @property
    def scratch(self) -> Path:
        """The run's temporary directory (the shared server's data lives in scratch/server)."""
        return Path(self._tmp.name)

    def server(self) -> ServerProcess:
        """The shared server (MAX_CONCURRENT_RUNS=2), started on first use."""
        if self._server is None:
            self._server = start_server_process(Path(self._tmp.name) / "server", "--max-concurrent-runs", "2")
        return self._server

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._tmp.cleanup()


def run_section(name: str, ctx: Context) -> Section:
    """One section."""
    if name == "overhead":
        from benchmarks import overhead

        return overhead.run(ctx.server(), ctx.quick, ctx.repeats, ctx.output)
    if name == "external_env":
        from benchmarks import external_env_section

        return external_env_section.run(ctx.quick, ctx.repeats)
    if name == "act":
        from benchmarks import act_latency

        return act_latency.run(ctx.server(), ctx.quick, ctx.repeats, ctx.output)
    if name == "experience":
        from benchmarks import experience

        return experience.run(ctx.server(), ctx.quick, ctx.repeats, ctx.output)
    if name == "learning":
        return _learning(ctx)
    if name == "chaos":
        from benchmarks import chaos

        return chaos.run(ctx.quick, ctx.output)
    if name == "policy_learning":
        from benchmarks import policy_learning

        return policy_learning.run(ctx.quick, ctx.seeds)
    if name == "learning_breadth":
        from benchmarks import learning_breadth

        kept = learning_breadth.finished_runs(ctx.output / "results" / "results.json") if ctx.keep_finished else []
        return learning_breadth.run(ctx.quick, ctx.seeds, kept)
    if name == "footprint":
        from benchmarks import footprint

        return footprint.run(ctx.quick, 1 if ctx.quick else ctx.repeats)
    if name == "ray":
        from benchmarks import ray_executor

        return ray_executor.run(ctx.quick, ctx.repeats)
    if name == "fuzz":
        from benchmarks import fuzz

        return fuzz.run(ctx.quick, ctx.scratch, ctx.fuzz_cases)
    if name == "http":
        from benchmarks import http_api

        return http_api.run(ctx.server(), ctx.quick, ctx.repeats)
    if name == "simulation_speed":
        from benchmarks import simulation_speed

        return simulation_speed.run(ctx.quick, ctx.repeats)
    raise ValueError(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")


def _learning(ctx: Context) -> Section:
    """Train through the service (or collect runs trained earlier with --learning-data), evaluate, plot."""
    from benchmarks import learning

    if ctx.learning_data is not None:
        data = ctx.learning_data
        runs = learning.collect(data)
        section = learning.report(runs, data / "server" / "models", ctx.output / "results", ctx.quick)
        section.notes.append(f"Trained with `python -m benchmarks.learning train --data {data.name}` through a "
                             "server in a subprocess (MAX_CONCURRENT_RUNS=2) and collected by the runner.")
    else:
        data = ctx.scratch / "learning"
        data.mkdir(parents=True, exist_ok=True)
        runs = learning.train(ctx.server().address, data, [0] if ctx.quick else ctx.seeds, ctx.quick,
                              ["PPO/CartPole-v1"] if ctx.quick else None)
        section = learning.report(runs, ctx.scratch / "server" / "models", ctx.output / "results",
                                  ctx.quick)
    return section


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the chosen sections, write the results."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmarks and write RESULTS.md and results/results.json")
    run.add_argument("--quick", action="store_true", help="tiny budgets, no goals (CI: keeps the runner working)")
    run.add_argument("--only", nargs="+", choices=SECTIONS, metavar="NAME",
                     help=f"only these sections ({', '.join(SECTIONS)})")
    run.add_argument("--output", type=Path, help="where RESULTS.md and results/ go (default: benchmarks/, or a "
                                                 "temporary directory with --quick)")
    run.add_argument("--repeats", type=int, help="repeats per comparison (default 3, 1 with --quick)")
    run.add_argument("--learning-data", type=Path,
                     help="collect learning runs trained earlier by `python -m benchmarks.learning train`")
    run.add_argument("--fuzz-cases", type=int, help="fuzz: cases per RPC and kind (default 10,000; 3 with --quick)")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="learning seeds (default 0 1 2)")
    run.add_argument("--keep-finished", action="store_true",
                     help="learning_breadth: reuse the succeeded runs in --output's results.json whose algorithm, "
                          "environment, seed, budget and hyperparameters are unchanged; train only the rest")
    render = sub.add_parser("render", help="rewrite RESULTS.md from results/results.json (after editing findings)")
    render.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.command == "render":
        import json

        from benchmarks.common import render_markdown

        sections = json.loads((args.output / "results" / "results.json").read_text())["sections"]
        (args.output / "RESULTS.md").write_text(render_markdown(sections, args.output / "results" / "findings"))
        return 0
    output = args.output or (Path(tempfile.mkdtemp(prefix="benchmarks-quick-")) if args.quick else DEFAULT_OUTPUT)
    repeats = args.repeats or (1 if args.quick else 3)
    ctx = Context(output.resolve(), args.quick, repeats, args.learning_data, args.seeds, args.fuzz_cases,
                  args.keep_finished)
    from benchmarks.machine import machine_facts

    facts = machine_facts()
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    sections = []
    try:
        for name in args.only or SECTIONS:
            print(f"[{time.perf_counter() - started:6.1f} s] {name} ...", flush=True)
            t0 = time.perf_counter()
            section = run_section(name, ctx)
            section.seconds = time.perf_counter() - t0
            sections.append(section)
            md, js = write_results(ctx.output, [section], facts, args.quick, command)
            for row in section.data.get("summary", []):
                print(f"    {row['goal']}: {row['measured']}", flush=True)
    finally:
        ctx.close()
    print(f"[{time.perf_counter() - started:6.1f} s] wrote {md} and {js}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
