"""Benchmark: PPO on CartPole-v1 (8 envs) in-process against the same training through the reference environment
server over the adapter, side by side in one run.

Variants, each trained for the same timesteps with the same hyperparameters and seed, interleaved per repeat so
that load from other work on the machine falls on all of them alike:

- inprocess:       stable-baselines3's DummyVecEnv of 8 Monitor-wrapped envs (what a Gymnasium id trains on)
- grpc_stream:     the reference server in its own process, 8 envs, one Session-stream message per vector step
- grpc_stream_unix: the same as grpc_stream over a unix domain socket (env_id unix:...) instead of loopback TCP
- grpc_unary:      the same with unary Step calls
- grpc_env_per_msg: 8 reference servers of 1 env each, 8 messages per vector step (one env per message)
- ipc_floor:       the in-process envs plus one blocking 1-byte round trip over a socket pair to another process per
                   vector step: no gRPC, no encoding, no env work moved. The floor any out-of-process environment
                   pays on this machine, whatever its protocol.

Alongside training throughput it measures raw vector steps per second (random actions, no learning), which
isolates the transport's cost. Writes benchmarks/results/external_env.json and .md.

    python -m benchmarks.external_env --timesteps 30000 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from benchmarks.common import write_keeping_analysis
from benchmarks.transport_floor import EchoPeer
from rl_service.core.algorithms.registry import ALGORITHMS
from rl_service.infra.external_env.address import parse_address
from rl_service.infra.external_env.grpc_adapter import ConnectionOptions, GrpcExternalEnvAdapter
from rl_service.infra.external_env.vec_env import ExternalVecEnv

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENV_ID = "CartPole-v1"
N_ENVS = 8
# rl-baselines3-zoo's tuned PPO for CartPole-v1 (hyperparams/ppo.yml), in this service's hyperparameter strings.
ZOO_PPO = {"n_steps": "32", "batch_size": "256", "gae_lambda": "0.8", "gamma": "0.98", "n_epochs": "20",
           "ent_coef": "0.0", "learning_rate": "lin_0.001", "clip_range": "lin_0.2"}
VARIANTS = ("inprocess", "grpc_stream", "grpc_stream_unix", "grpc_unary", "grpc_env_per_msg", "ipc_floor")


class SequentialVecEnv(VecEnv):
    """Several single-env VecEnvs stepped one after another: one message per env per vector step."""

    def __init__(self, parts: Sequence[VecEnv]) -> None:
        self.parts = list(parts)
        super().__init__(len(self.parts), self.parts[0].observation_space, self.parts[0].action_space)

    def reset(self) -> VecEnvObs:
        """Reset each part with its own seed (env i: seed + i)."""
        for i, part in enumerate(self.parts):
            if self._seeds[i] is not None:
                part.seed(self._seeds[i])
        self._reset_seeds()
        return np.concatenate([part.reset() for part in self.parts])

    def step_async(self, actions: np.ndarray) -> None:
        """Keep the actions."""
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        """Step each part in turn."""
        results = [part.step(self._actions[i:i + 1]) for i, part in enumerate(self.parts)]
        obs = np.concatenate([r[0] for r in results])
        return obs, np.concatenate([r[1] for r in results]), np.concatenate([r[2] for r in results]), \
            [r[3][0] for r in results]

    def close(self) -> None:
        """Close every part."""
        for part in self.parts:
            part.close()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """render_mode only."""
        if attr_name == "render_mode":
            return [None] * self.num_envs
        raise AttributeError(attr_name)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Not supported."""
        raise AttributeError(attr_name)

    def env_method(self, method_name: str, *args: Any, indices: VecEnvIndices = None, **kwargs: Any) -> list[Any]:
        """Not supported."""
        raise AttributeError(method_name)

    def env_is_wrapped(self, wrapper_class: type[Any], indices: VecEnvIndices = None) -> list[bool]:
        """No wrappers."""
        return [False] * self.num_envs


class ProcessBoundaryVecEnv(VecEnvWrapper):
    """In-process envs, plus one blocking 1-byte round trip to an echo process per vector step (ipc_floor)."""

    def __init__(self, venv: VecEnv) -> None:
        super().__init__(venv)
        self._peer = EchoPeer()

    def reset(self) -> VecEnvObs:
        """Reset the envs."""
        return self.venv.reset()

    def step_wait(self) -> VecEnvStepReturn:
        """Cross the process boundary once (send a byte, wait for it to come back), then step in-process."""
        self._peer.exchange()
        return self.venv.step_wait()

    def close(self) -> None:
        """Close the envs and stop the echo peer."""
        self._peer.close()
        self.venv.close()


@contextlib.contextmanager
def env_servers(count: int, num_envs: int, unix_dir: Path | None = None) -> Iterator[list[str]]:
    """`count` reference servers (separate processes) of num_envs envs each, on loopback TCP or, given a directory,
    on unix sockets in it; yields their addresses."""
    processes = []
    addresses = []
    try:
        for index in range(count):
            where = ["--unix", str(unix_dir / f"env-{index}.sock")] if unix_dir else ["--port", "0"]
            process = subprocess.Popen(
                [sys.executable, "-m", "rl_service.envserver", "--env", ENV_ID, "--num-envs", str(num_envs), *where],
                stdout=subprocess.PIPE, text=True, cwd=ROOT)
            processes.append(process)
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            if " on grpc://" not in line and " on unix:" not in line:
                raise RuntimeError(f"env server did not start: {line!r}")
            addresses.append(line.rsplit(" on ", 1)[1].strip())
        yield addresses
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


def grpc_vec_env(address: str, use_stream: bool) -> VecEnv:
    """The service's own path: adapter -> ExternalVecEnv -> VecMonitor."""
    adapter = GrpcExternalEnvAdapter(parse_address(address), ConnectionOptions(use_stream=use_stream))
    return VecMonitor(ExternalVecEnv(adapter))


def make_env(variant: str, addresses: dict[str, list[str]]) -> VecEnv:
    """The VecEnv of a variant (servers already running)."""
    if variant == "inprocess":
        return make_vec_env(ENV_ID, n_envs=N_ENVS, seed=0)
    if variant == "grpc_stream":
        return grpc_vec_env(addresses["batched"][0], use_stream=True)
    if variant == "grpc_stream_unix":
        return grpc_vec_env(addresses["unix"][0], use_stream=True)
    if variant == "grpc_unary":
        return grpc_vec_env(addresses["batched"][0], use_stream=False)
    if variant == "ipc_floor":
        return ProcessBoundaryVecEnv(make_vec_env(ENV_ID, n_envs=N_ENVS, seed=0))
    parts = [ExternalVecEnv(GrpcExternalEnvAdapter(parse_address(a), ConnectionOptions())) for a in addresses["single"]]
    return VecMonitor(SequentialVecEnv(parts))


def train_once(env: VecEnv, timesteps: int, seed: int) -> dict[str, float]:
    """PPO with the zoo hyperparameters, as the service's worker builds it; steps per second of learn()."""
    spec = ALGORITHMS["ppo"]
    values = spec.schema.parse({**ZOO_PPO, "n_envs": str(N_ENVS)})
    model = PPO("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **spec.constructor_kwargs(values))
    started = time.perf_counter()
    model.learn(total_timesteps=timesteps)
    elapsed = time.perf_counter() - started
    rewards = [info["r"] for info in model.ep_info_buffer or ()]
    return {"steps_per_second": model.num_timesteps / elapsed, "seconds": elapsed,
            "timesteps": float(model.num_timesteps),
            "mean_episode_reward_last_100": float(np.mean(rewards)) if rewards else 0.0}


def raw_steps(env: VecEnv, vector_steps: int) -> float:
    """Vector steps per second with random actions (no learning): the environment path alone."""
    env.seed(0)
    env.reset()
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 2, size=(vector_steps, env.num_envs))
    started = time.perf_counter()
    for row in actions:
        env.step(row)
    return vector_steps / (time.perf_counter() - started)


def envs_per_message_sweep(sizes: Sequence[int], vector_steps: int, repeats: int) -> list[dict[str, Any]]:
    """Raw env steps/s, in-process against the Session stream, for several envs per message (transport share)."""
    rows = []
    for size in sizes:
        inprocess: list[float] = []
        stream: list[float] = []
        with env_servers(1, size) as addresses:
            for _ in range(repeats):
                for kind, bucket in (("inprocess", inprocess), ("stream", stream)):
                    env = make_vec_env(ENV_ID, n_envs=size, seed=0) if kind == "inprocess" \
                        else grpc_vec_env(addresses[0], use_stream=True)
                    try:
                        bucket.append(raw_steps(env, vector_steps) * size)
                    finally:
                        env.close()
        rows.append({"envs_per_message": size, "inprocess_env_steps_per_second": round(median(inprocess), 1),
                     "stream_env_steps_per_second": round(median(stream), 1),
                     "ratio": round(median(stream) / median(inprocess), 3)})
    return rows


def machine_facts() -> dict[str, Any]:
    """Where the figures come from."""
    import grpc
    import gymnasium
    import stable_baselines3

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu, "logical_cores": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load],
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "stable_baselines3": stable_baselines3.__version__, "gymnasium": gymnasium.__version__,
        "grpcio": grpc.__version__, "numpy": np.__version__, "platform": platform.platform(),
        # grpc's internal experiment switches (inherited by the env servers); empty is grpc's default.
        "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", ""),
    }


def median(values: list[float]) -> float:
    """The median (0 for none)."""
    return float(statistics.median(values)) if values else 0.0


def run(timesteps: int, repeats: int, raw_vector_steps: int, variants: Sequence[str],
        progress: Callable[[str], None], sweep: Sequence[int] = ()) -> dict[str, Any]:
    """Every variant, `repeats` times, interleaved; the raw results with medians and ratios to in-process."""
    torch.set_num_threads(1)  # as the service's workers (WORKER_TORCH_THREADS=1)
    results: dict[str, Any] = {"machine": machine_facts(), "env_id": ENV_ID, "n_envs": N_ENVS,
                               "hyperparameters": ZOO_PPO, "timesteps_per_repeat": timesteps, "repeats": repeats,
                               "raw_vector_steps": raw_vector_steps, "runs": {v: [] for v in variants},
                               "raw": {v: [] for v in variants}}
    with tempfile.TemporaryDirectory(prefix="rlsvc-bench-") as socket_dir, \
            env_servers(1, N_ENVS) as batched, \
            env_servers(1 if "grpc_stream_unix" in variants else 0, N_ENVS, Path(socket_dir)) as unix, \
            env_servers(N_ENVS if "grpc_env_per_msg" in variants else 0, 1) as single:
        addresses = {"batched": batched, "unix": unix, "single": single}
        for repeat in range(repeats):
            for variant in variants:
                env = make_env(variant, addresses)
                try:
                    results["raw"][variant].append(raw_steps(env, raw_vector_steps))
                    outcome = train_once(env, timesteps, seed=repeat)
                finally:
                    env.close()
                results["runs"][variant].append(outcome)
                progress(f"repeat {repeat + 1}/{repeats} {variant:17} {outcome['steps_per_second']:8.1f} steps/s "
                         f"(raw {results['raw'][variant][-1]:8.1f} vector steps/s)")
    summary: dict[str, Any] = {}
    base = median([r["steps_per_second"] for r in results["runs"].get("inprocess", [])])
    base_raw = median(results["raw"].get("inprocess", []))
    baseline_runs = results["runs"].get("inprocess", [])
    for variant in variants:
        sps = median([r["steps_per_second"] for r in results["runs"][variant]])
        raw = median(results["raw"][variant])
        # Each repeat's variant against the same repeat's in-process run: robust to load that drifts between repeats.
        paired = [r["steps_per_second"] / b["steps_per_second"]
                  for r, b in zip(results["runs"][variant], baseline_runs, strict=False) if b["steps_per_second"]]
        summary[variant] = {
            "median_steps_per_second": round(sps, 1),
            "ratio_to_inprocess": round(sps / base, 3) if base else None,
            "median_paired_ratio": round(median(paired), 3) if paired else None,
            "median_raw_vector_steps_per_second": round(raw, 1),
            "raw_ratio_to_inprocess": round(raw / base_raw, 3) if base_raw else None,
            "median_us_per_vector_step_raw": round(1e6 / raw, 1) if raw else None,
            "median_mean_episode_reward": round(median([r["mean_episode_reward_last_100"]
                                                        for r in results["runs"][variant]]), 1),
        }
    results["summary"] = summary
    if sweep:
        results["envs_per_message_sweep"] = envs_per_message_sweep(sweep, max(raw_vector_steps // 3, 200), repeats)
    return results


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown table with the machine facts."""
    machine = results["machine"]
    lines = [
        "# External environment benchmark: PPO CartPole-v1, 8 envs",
        "",
        f"{machine['date']} on {machine['cpu']} ({machine['logical_cores']} logical cores, load average "
        f"{machine['load_average_at_start']} at start, shared with other work), Python {machine['python']}, "
        f"torch {machine['torch']} ({machine['torch_threads']} thread), stable-baselines3 "
        f"{machine['stable_baselines3']}, gymnasium {machine['gymnasium']}, grpcio {machine['grpcio']}"
        + (f", GRPC_EXPERIMENTS={machine['grpc_experiments']} (client and env servers)"
           if machine.get("grpc_experiments") else "") + ".",
        "",
        f"{results['timesteps_per_repeat']} timesteps per run, {results['repeats']} repeats interleaved, medians; "
        "the per-repeat ratio divides each repeat's variant by the same repeat's in-process run. "
        f"PPO hyperparameters (rl-baselines3-zoo CartPole-v1): {results['hyperparameters']}. Training steps/s is "
        "model.learn() time; raw is vector steps/s of random actions (no learning), the environment path alone. "
        "The reference server runs in its own process.",
        "",
        "| variant | training steps/s | ratio to in-process | median of per-repeat ratios | raw vector steps/s | "
        "raw us per vector step | raw ratio | mean episode reward |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, row in results["summary"].items():
        lines.append(f"| {variant} | {row['median_steps_per_second']} | {row['ratio_to_inprocess']} | "
                     f"{row.get('median_paired_ratio')} | {row['median_raw_vector_steps_per_second']} | "
                     f"{row['median_us_per_vector_step_raw']} | "
                     f"{row['raw_ratio_to_inprocess']} | {row['median_mean_episode_reward']} |")
    lines += ["", "Per-repeat training steps/s:", ""]
    for variant, runs in results["runs"].items():
        lines.append(f"- {variant}: " + ", ".join(f"{r['steps_per_second']:.1f}" for r in runs))
    sweep = results.get("envs_per_message_sweep")
    if sweep:
        lines += ["", "Raw CartPole env steps/s by envs per message (random actions, no learning): what one message "
                  "costs against the work it carries.", "",
                  "| envs per message | in-process env steps/s | Session stream env steps/s | ratio |",
                  "|---:|---:|---:|---:|"]
        lines += [f"| {r['envs_per_message']} | {r['inprocess_env_steps_per_second']} | "
                  f"{r['stream_env_steps_per_second']} | {r['ratio']} |" for r in sweep]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--timesteps", type=int, default=30_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--raw-vector-steps", type=int, default=3000)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--sweep", default="8,32,128", help="envs per message for the raw sweep ('' to skip)")
    parser.add_argument("--output", type=Path, default=RESULTS / "external_env")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    sweep = [int(n) for n in args.sweep.split(",") if n]
    results = run(args.timesteps, args.repeats, args.raw_vector_steps, variants, lambda line: print(line, flush=True),
                  sweep)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_keeping_analysis(args.output.with_suffix(".md"), markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
