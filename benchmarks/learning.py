"""Section 5, learning quality: PPO, A2C, DQN and REINFORCE on CartPole-v1 and Acrobot-v1, trained through the
service, evaluated for 10 deterministic episodes, against the published rl-baselines3-zoo benchmark.

The SB3 algorithms use the rl-baselines3-zoo hyperparameters (DLR-RM/rl-baselines3-zoo, hyperparams/ppo.yml,
a2c.yml, dqn.yml) translated into the service's hyperparameter strings; the published figures are from the same
repository's benchmark.md. Training is long (about an hour of CPU per seed for all configurations), so it can run
on its own and be collected later:

    python -m benchmarks.learning train --data DIR [--seeds 0 1 2]   # a server in a subprocess; writes DIR/runs.json
    python -m benchmarks run --only learning --learning-data DIR      # evaluate, plot, write the table
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Section,
    Table,
    fmt,
    start_server_process,
    training_stub,
    wait_for_runs,
)

ZOO = "DLR-RM/rl-baselines3-zoo"
# The files read (GitHub paths at these commits): facts cited, nothing copied.
ZOO_CITATION = (
    "Published figures: DLR-RM/rl-baselines3-zoo `benchmark.md` (commit 0088472b, \"Performance of trained agents\": "
    "mean_reward ± std_reward of the deterministic policy over about 150k evaluation timesteps, one trained agent "
    "each; the zoo itself notes it is not a quantitative benchmark). Hyperparameters: `hyperparams/ppo.yml` "
    "(commit 208b6fdf), `hyperparams/a2c.yml` (c6c209e7), `hyperparams/dqn.yml` (ce95481b).")
# algo/env -> (mean_reward, std_reward) in benchmark.md.
PUBLISHED_STD = {"PPO/CartPole-v1": 0.0, "A2C/CartPole-v1": 0.0, "DQN/CartPole-v1": 0.0,
                 "PPO/Acrobot-v1": 18.201, "A2C/Acrobot-v1": 17.213, "DQN/Acrobot-v1": 11.752}


@dataclass(frozen=True)
class Config:
    """One algorithm on one environment: the service's hyperparameters and the published result."""

    algorithm: str
    env_id: str
    timesteps: int
    hyperparameters: dict[str, str]
    published: float | None  # mean return in the zoo's benchmark table (None: no row)
    source: str  # where the hyperparameters come from
    unmatched: tuple[str, ...] = field(default=())  # zoo settings the service has no equivalent for

    @property
    def key(self) -> str:
        return f"{self.algorithm}/{self.env_id}"


CONFIGS: tuple[Config, ...] = (
    Config("PPO", "CartPole-v1", 100_000,
           {"n_envs": "8", "n_steps": "32", "batch_size": "256", "gae_lambda": "0.8", "gamma": "0.98",
            "n_epochs": "20", "ent_coef": "0.0", "learning_rate": "lin_0.001", "clip_range": "lin_0.2"},
           500.0, f"{ZOO} hyperparams/ppo.yml CartPole-v1"),
    Config("A2C", "CartPole-v1", 500_000, {"n_envs": "8", "ent_coef": "0.0"},
           500.0, f"{ZOO} hyperparams/a2c.yml CartPole-v1"),
    Config("DQN", "CartPole-v1", 50_000,
           {"learning_rate": "0.0023", "batch_size": "64", "buffer_size": "100000", "learning_starts": "1000",
            "gamma": "0.99", "target_update_interval": "10", "train_freq": "256", "gradient_steps": "128",
            "exploration_fraction": "0.16", "exploration_final_eps": "0.04", "net_arch": "256,256"},
           500.0, f"{ZOO} hyperparams/dqn.yml CartPole-v1"),
    Config("PPO", "Acrobot-v1", 1_000_000,
           {"n_envs": "16", "n_steps": "256", "gae_lambda": "0.94", "gamma": "0.99", "n_epochs": "4",
            "ent_coef": "0.0"},
           -73.506, f"{ZOO} hyperparams/ppo.yml Acrobot-v1", ("normalize: true (VecNormalize)",)),
    Config("A2C", "Acrobot-v1", 500_000, {"n_envs": "16", "ent_coef": "0.0"},
           -83.353, f"{ZOO} hyperparams/a2c.yml Acrobot-v1", ("normalize: true (VecNormalize)",)),
    Config("DQN", "Acrobot-v1", 100_000,
           {"learning_rate": "0.00063", "batch_size": "128", "buffer_size": "50000", "learning_starts": "0",
            "gamma": "0.99", "target_update_interval": "250", "train_freq": "4", "gradient_steps": "-1",
            "exploration_fraction": "0.12", "exploration_final_eps": "0.1", "net_arch": "256,256"},
           -76.639, f"{ZOO} hyperparams/dqn.yml Acrobot-v1"),
    # No zoo row for REINFORCE: the settings benchmarks/reinforce_cartpole.py found best (lr 0.002, beta 0.02).
    Config("REINFORCE", "CartPole-v1", 100_000, {"learning_rate": "0.002", "beta": "0.02"},
           None, "benchmarks/reinforce_cartpole.py tuned settings"),
    Config("REINFORCE", "Acrobot-v1", 300_000, {"learning_rate": "0.002", "beta": "0.02"},
           None, "benchmarks/reinforce_cartpole.py tuned settings"),
)

QUICK_TIMESTEPS = {"PPO": 256, "A2C": 400, "DQN": 600, "REINFORCE": 600}


def _jobs(seeds: list[int], quick: bool) -> list[tuple[Config, int, int]]:
    """(config, seed, timesteps): all configs for seed 0, then seed 1, ...; the longest first within a seed,
    so that if time runs out whole seeds are complete."""
    configs = sorted(CONFIGS, key=lambda c: -c.timesteps * (3 if c.algorithm == "DQN" else 1))
    jobs = []
    for seed in seeds:
        for config in configs:
            jobs.append((config, seed, QUICK_TIMESTEPS[config.algorithm] if quick else config.timesteps))
    return jobs


def train(address: str, data: Path, seeds: list[int], quick: bool,
          only: list[str] | None = None) -> list[dict[str, Any]]:
    """Start every run through StartTraining on the server at `address`, wait for all, record them in runs.json."""
    stub = training_stub(address)
    runs: list[dict[str, Any]] = []
    manifest = data / "runs.json"
    for config, seed, timesteps in _jobs(seeds, quick):
        if only and config.key not in only:
            continue
        hyper = dict(config.hyperparameters)
        if quick and config.algorithm == "DQN":
            hyper["learning_starts"] = "0"
        if quick and config.algorithm == "PPO":
            hyper.update(n_steps="32", batch_size="64", n_epochs="2")
        run_id = _start_run(stub, config.algorithm, config.env_id, timesteps, seed, hyper)
        runs.append({"key": config.key, "algorithm": config.algorithm, "env_id": config.env_id, "seed": seed,
                     "timesteps": timesteps, "hyperparameters": hyper, "run_id": run_id})
    manifest.write_text(json.dumps({"address": address, "runs": runs}, indent=1))

    def record(final: dict[str, Any]) -> None:
        for run in _record_finished(runs, final):
            manifest.write_text(json.dumps({"address": address, "runs": runs}, indent=1))
            print(f"{time.strftime('%H:%M:%S')} {run['key']} seed {run['seed']}: {run['state']} "
                  f"in {run['wall_seconds']:.0f} s", flush=True)

    wait_for_runs(stub, [r["run_id"] for r in runs], poll=5.0 if not quick else 0.2, on_poll=record)
    return runs


def _start_run(stub: Any, algorithm: str, env_id: str, timesteps: int, seed: int,
               hyperparameters: dict[str, str]) -> str:
    """Start one learning run through the service (checkpoints at half-way and at the end); its run id."""
    from rl_service_proto.v1 import training_pb2 as pb

    return str(stub.StartTraining(pb.StartTrainingRequest(
        experiment_id="benchmark-learning", algorithm=algorithm, env_id=env_id, total_timesteps=timesteps,
        seed=seed, hyperparameters=hyperparameters, checkpoint_interval=max(100, timesteps // 2)),
        timeout=60).run_id)


def _final_record(status: Any) -> dict[str, Any]:
    """What a run's record keeps of its final status."""
    from rl_service_proto.v1 import training_pb2 as pb

    return {"state": pb.RunState.Name(status.state), "model_path": status.model_path, "error": status.error,
            "wall_seconds": status.finished_at - status.started_at, "timesteps_done": status.timesteps_done}


def _record_finished(runs: list[dict[str, Any]], final: dict[str, Any]) -> list[dict[str, Any]]:
    """Fill in the record of every run that `final` (run id -> final status) shows ended; those runs."""
    recorded = []
    for run in runs:
        status = final.get(run["run_id"])
        if status is not None and "state" not in run:
            run.update(_final_record(status))
            recorded.append(run)
    return recorded


def collect(data: Path) -> list[dict[str, Any]]:
    """The runs recorded in data/runs.json (and data/runs_requeued.json: runs cancelled while pending and started
    again later in the queue), with the state of any still unrecorded run asked of the server if it still runs."""
    import grpc

    from rl_service_proto.v1 import training_pb2 as pb
    from rl_service_proto.v1 import training_pb2_grpc

    manifest = json.loads((data / "runs.json").read_text())
    runs = [r for r in manifest["runs"] if r.get("state") != "CANCELLED"]
    requeued = data / "runs_requeued.json"
    if requeued.exists():
        moved = json.loads(requeued.read_text())["runs"]
        moved_keys = {(r["key"], r["seed"]) for r in moved}
        runs = [r for r in runs if (r["key"], r["seed"]) not in moved_keys] + moved
    pending = [r for r in runs if "state" not in r]
    if pending:
        channel = grpc.insecure_channel(manifest["address"])
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        try:
            for run in pending:
                status = stub.GetTrainingStatus(pb.RunRequest(run_id=run["run_id"]), timeout=5)
                if status.is_done:
                    run.update(_final_record(status))
                else:
                    run.update(state=pb.RunState.Name(status.state), timesteps_done=status.timesteps_done)
        except grpc.RpcError:
            pass  # the server has gone: those runs count as not finished
        finally:
            channel.close()
    return runs


def evaluate(model_path: str, algorithm: str, env_id: str, episodes: int = 10, seed: int = 10_000,
             deterministic: bool = True) -> list[float]:
    """Returns of `episodes` episodes of the saved model (loaded with the registry's class), deterministic unless
    told otherwise."""
    import gymnasium as gym

    from rl_service.core.algorithms.registry import get_algorithm

    model = get_algorithm(algorithm).cls.load(model_path, device="cpu")
    env = gym.make(env_id)
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=deterministic)
            obs, reward, terminated, truncated, _ = env.step(int(action))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def plot_curves(runs: list[dict[str, Any]], models_dir: Path, output: Path) -> list[str]:
    """One PNG per environment: each algorithm's episode return (moving average) against timesteps, per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    images = []
    output.mkdir(parents=True, exist_ok=True)
    for env_id in sorted({r["env_id"] for r in runs}):
        algos = sorted({r["algorithm"] for r in runs if r["env_id"] == env_id})
        fig, axes = plt.subplots(1, len(algos), figsize=(4.2 * len(algos), 3.4), squeeze=False)
        for ax, algo in zip(axes[0], algos, strict=True):
            for run in [r for r in runs if r["env_id"] == env_id and r["algorithm"] == algo]:
                history = models_dir / run["run_id"] / "history.json"
                if not history.exists():
                    continue
                episodes = json.loads(history.read_text())["episodes"]
                if not episodes:
                    continue
                steps = np.array([e["timesteps"] for e in episodes], dtype=float)
                rewards = np.array([e["reward"] for e in episodes], dtype=float)
                window = max(1, min(100, len(rewards) // 10))
                smooth = np.convolve(rewards, np.ones(window) / window, mode="valid")
                partial = "" if run.get("state") == "SUCCEEDED" else " (unfinished)"
                ax.plot(steps[window - 1:], smooth, label=f"seed {run['seed']}{partial}", linewidth=1)
            published = next((c.published for c in CONFIGS if c.algorithm == algo and c.env_id == env_id), None)
            if published is not None:
                ax.axhline(published, color="grey", linestyle="--", linewidth=1, label="zoo published")
            ax.set_title(f"{algo} on {env_id}")
            ax.set_xlabel("timesteps")
            ax.set_ylabel("episode return (moving avg)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"learning_{env_id.replace('-', '_').lower()}.png"
        fig.savefig(output / name, dpi=80)
        plt.close(fig)
        images.append(name)
    return images


def report(runs: list[dict[str, Any]], models_dir: Path, output: Path, quick: bool,
           images_prefix: str = "results/") -> Section:
    """Evaluate every finished run, compare with the published table, draw the curves."""
    section = Section("learning", "5. Learning quality against the rl-baselines3-zoo benchmark")
    for run in runs:
        if run.get("state") == "SUCCEEDED" and run.get("model_path") and "eval" not in run:
            run["eval"] = evaluate(run["model_path"], run["algorithm"], run["env_id"])
            if run["algorithm"] == "REINFORCE":  # no zoo convention to follow: the sampling policy too
                run["eval_stochastic"] = evaluate(run["model_path"], run["algorithm"], run["env_id"],
                                                  deterministic=False)
    table = Table("Final model, 10 deterministic evaluation episodes per seed (seeds 10000..10009 of the env)",
                  ["algorithm", "env", "timesteps", "seeds evaluated", "per-seed means", "mean ± std over seeds",
                   "std over all episodes", "zoo published (mean ± std)", "goal: within 10% of published or better"])
    summary = []
    for config in CONFIGS:
        mine = [r for r in runs if r["key"] == config.key]
        if not mine:
            continue
        done = [r for r in mine if "eval" in r]
        means = [statistics.fmean(r["eval"]) for r in done]
        mean = statistics.fmean(means) if means else math.nan
        std = statistics.pstdev(means) if len(means) > 1 else 0.0 if means else math.nan
        pooled = [x for r in done for x in r["eval"]]
        pooled_std = statistics.pstdev(pooled) if pooled else math.nan
        met: bool | None = None
        if config.published is not None and means and not quick:
            met = abs(mean - config.published) <= 0.1 * abs(config.published) or mean >= config.published
        missing = len(mine) - len(done)
        seeds = f"{len(done)}" + (f" ({missing} not finished)" if missing else "")
        published = (f"{fmt(config.published, 5)} ± {fmt(PUBLISHED_STD[config.key], 3)}"
                     if config.published is not None else "no zoo row")
        table.rows.append([config.algorithm, config.env_id, f"{mine[0]['timesteps']:,}", seeds,
                           ", ".join(fmt(m, 4) for m in means) or "-", f"{fmt(mean, 4)} ± {fmt(std, 3)}",
                           fmt(pooled_std, 3), published,
                           {None: "-", True: "yes", False: "**no**"}[met]])
        if config.published is not None:
            summary.append({"goal": f"{config.key}: zoo {fmt(config.published, 4)} at {config.timesteps:,}",
                            "measured": f"{fmt(mean, 4)} ± {fmt(std, 3)} ({len(done)} seeds)",
                            "met": met})
    section.tables.append(table)
    hyper = Table("Hyperparameters sent to StartTraining (from the zoo, translated)",
                  ["algorithm", "env", "source", "hyperparameters", "zoo settings without an equivalent"])
    for config in CONFIGS:
        hyper.rows.append([config.algorithm, config.env_id, config.source,
                           " ".join(f"{k}={v}" for k, v in config.hyperparameters.items()),
                           ", ".join(config.unmatched) or "none"])
    section.tables.append(hyper)
    per_run = Table("Every run", ["algorithm", "env", "seed", "run_id", "state", "timesteps done", "train wall s",
                                  "eval returns"])
    for run in runs:
        per_run.rows.append([run["algorithm"], run["env_id"], str(run["seed"]), run["run_id"], run.get("state", "?"),
                             f"{int(run.get('timesteps_done', 0)):,}", fmt(run.get("wall_seconds")),
                             " ".join(fmt(x, 4) for x in run.get("eval", [])) or "-"])
    section.tables.append(per_run)
    for config in CONFIGS:
        sampled = [statistics.fmean(r["eval_stochastic"]) for r in runs
                   if r["key"] == config.key and "eval_stochastic" in r]
        if sampled:
            section.notes.append(f"{config.key} evaluated with the sampling (non-deterministic) policy, 10 episodes "
                                 f"per seed: per-seed means {', '.join(fmt(m, 4) for m in sampled)}.")
    section.intro = ZOO_CITATION
    section.images = [images_prefix + name for name in plot_curves(runs, models_dir, output)]
    section.data = {"summary": summary, "runs": runs}
    return section


def resume(data: Path) -> None:
    """Restart the server on data/server and let every recorded run that did not succeed finish under its own
    run id: those a shutdown or crash left unfinished resume by themselves (AUTO_RESUME), those that ended
    CANCELLED or FAILED through ResumeTraining. Records them in data/runs_requeued.json and waits for them."""
    from rl_service_proto.v1 import training_pb2 as pb

    server = start_server_process(data.resolve() / "server", "--max-concurrent-runs", "2",
                                  "--max-queued-runs", "100")
    try:
        manifest = json.loads((data / "runs.json").read_text())
        manifest["address"] = server.address
        (data / "runs.json").write_text(json.dumps(manifest, indent=1))
        runs = collect(data)  # asks the restarted server for every run not yet recorded
        stub = training_stub(server.address)
        path = data / "runs_requeued.json"
        by_id = {r["run_id"]: r for r in runs}
        requeued = [by_id.get(r["run_id"], r) for r in json.loads(path.read_text())["runs"]] if path.exists() else []
        again = [r for r in runs if r.get("state") != "SUCCEEDED"]
        started = []
        for run in again:
            status = stub.GetTrainingStatus(pb.RunRequest(run_id=run["run_id"]), timeout=30)
            if status.is_done:
                status = stub.ResumeTraining(pb.ResumeTrainingRequest(run_id=run["run_id"]), timeout=60)
            print(f"{run['key']} seed {run['seed']}: was {run.get('state')}, resumed as attempt {status.attempt}",
                  flush=True)
            started.append({key: run[key] for key in ("key", "algorithm", "env_id", "seed", "timesteps",
                                                      "hyperparameters", "run_id")})
        redone = {r["run_id"] for r in again}
        requeued = [r for r in requeued if r["run_id"] not in redone] + started
        path.write_text(json.dumps({"runs": requeued}, indent=1))

        def record(final: dict[str, Any]) -> None:
            recorded = _record_finished(started, final)
            for run in recorded:
                print(f"{time.strftime('%H:%M:%S')} {run['key']} seed {run['seed']}: {run['state']}", flush=True)
            if recorded:
                path.write_text(json.dumps({"runs": requeued}, indent=1))

        wait_for_runs(stub, [r["run_id"] for r in started], poll=5.0, on_poll=record)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """`train`: start a server in a subprocess and train every configuration through it."""
    parser = argparse.ArgumentParser(description="learning-quality runs through the service")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("train")
    run.add_argument("--data", type=Path, required=True)
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--quick", action="store_true")
    run.add_argument("--only", nargs="*", help="config keys such as PPO/CartPole-v1")
    again = sub.add_parser("resume", help="restart the server on DATA and train again the runs that did not succeed")
    again.add_argument("--data", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "resume":
        resume(args.data)
        return 0
    args.data.mkdir(parents=True, exist_ok=True)
    server = start_server_process(args.data.resolve() / "server", "--max-concurrent-runs", "2",
                                  "--max-queued-runs", "100")
    try:
        train(server.address, args.data, args.seeds, args.quick, args.only)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
