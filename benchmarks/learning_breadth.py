"""Section 9, learning breadth: the algorithms added after PPO, A2C and DQN (SAC, TD3, DDPG, TQC, QR-DQN, TRPO,
MaskablePPO) and `normalize`, trained through the service on a server in a subprocess, against the published
rl-baselines3-zoo results.

Every run evaluates itself with the service's own evaluations (eval_freq = a fifth of its budget, 10 deterministic
episodes on a separate environment seeded from the run's seed, raw rewards even when normalised); the table reports
the last evaluation (the final policy) and the best, over seeds 0, 1, 2. Goal: each configuration's mean of the last
evaluations within the zoo's reported std_reward of its reported mean_reward.

Hyperparameters: rl-baselines3-zoo hyperparams/*.yml (files and commits read are in ZOO_FILES), translated into the
service's hyperparameter strings; what the service has no key for is listed per row ("not matched"). Published
figures: rl-baselines3-zoo benchmark.md at commit 0088472b (one trained agent each, about 150k evaluation steps).

    python -m benchmarks run --only learning_breadth            # the full table (about an hour on 2 CPUs)
    python -m benchmarks run --quick --only learning_breadth    # every configuration for a few hundred steps
    python -m benchmarks run --only learning_breadth --keep-finished  # train only what the last results lack
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, Section, Table, fmt, goal_cell, start_server_process, training_stub, wait_for_runs

ZOO = "DLR-RM/rl-baselines3-zoo"
ZOO_FILES = ("hyperparams/sac.yml (00128b5d), td3.yml (1337ead0: its Pendulum-v0 entry, budget as the benchmark's "
             "20k), ddpg.yml (1159e284: Pendulum-v0 entry), tqc.yml (00d7cd9b: Pendulum-v0 entry), qrdqn.yml "
             "(04640c91), trpo.yml (13a3fe74), ppo.yml (208b6fdf); benchmark.md (0088472b)")
EVAL_EPISODES = 10
MASKED_ENV_ID = "rl_service/MaskedChoice-v0"  # tests/support/envs.py: the server loads it with GYM_PACKAGES


@dataclass(frozen=True)
class Config:
    """One algorithm on one environment: the service's hyperparameters and the zoo's published result."""

    algorithm: str
    env_id: str
    timesteps: int
    hyperparameters: dict[str, str]
    published: tuple[float, float] | None  # (mean_reward, std_reward) in benchmark.md; None: no row
    source: str
    unmatched: tuple[str, ...] = field(default=())
    quick: dict[str, str] = field(default_factory=dict)  # overrides for --quick (tiny warm-ups and batches)

    @property
    def key(self) -> str:
        return f"{self.algorithm}/{self.env_id}"


_OFF_QUICK = {"learning_starts": "100", "buffer_size": "1000"}

CONFIGS: tuple[Config, ...] = (
    Config("SAC", "Pendulum-v1", 20_000, {"learning_rate": "0.001"}, (-156.995, 88.714),
           f"{ZOO} hyperparams/sac.yml Pendulum-v1", quick=_OFF_QUICK),
    Config("TD3", "Pendulum-v1", 20_000,
           {"action_noise": "normal", "action_noise_std": "0.1", "learning_starts": "1000"}, (-151.855, 90.227),
           f"{ZOO} hyperparams/td3.yml Pendulum-v0", quick=_OFF_QUICK),
    Config("DDPG", "Pendulum-v1", 20_000,
           {"gamma": "0.98", "buffer_size": "200000", "learning_starts": "10000", "action_noise": "normal",
            "action_noise_std": "0.1", "gradient_steps": "-1", "train_freq": "200", "learning_rate": "0.001",
            "net_arch": "400,300"}, (-152.099, 94.282), f"{ZOO} hyperparams/ddpg.yml Pendulum-v0",
           ('train_freq [1, "episode"]: 200 steps, the length of every Pendulum-v1 episode',), quick=_OFF_QUICK),
    Config("TQC", "Pendulum-v1", 20_000,
           {"learning_rate": "0.001", "use_sde": "true", "gradient_steps": "64", "train_freq": "64",
            "net_arch": "64,64"}, None, f"{ZOO} hyperparams/tqc.yml Pendulum-v0",
           ("policy_kwargs log_std_init=-2 (a key since these runs; not re-run)",), quick=_OFF_QUICK),
    Config("SAC", "MountainCarContinuous-v0", 50_000,
           {"learning_rate": "0.0003", "buffer_size": "50000", "batch_size": "512", "ent_coef": "0.1",
            "train_freq": "32", "gradient_steps": "32", "gamma": "0.9999", "tau": "0.01", "learning_starts": "0",
            "use_sde": "true", "net_arch": "64,64"}, (94.679, 1.134),
           f"{ZOO} hyperparams/sac.yml MountainCarContinuous-v0",
           ("policy_kwargs log_std_init=-3.67 (a key since these runs; not re-run)",),
           quick={"batch_size": "64", "buffer_size": "1000"}),
    Config("PPO", "Acrobot-v1", 1_000_000,
           {"normalize": "true", "n_envs": "16", "n_steps": "256", "gae_lambda": "0.94", "gamma": "0.99",
            "n_epochs": "4", "ent_coef": "0.0"}, (-73.506, 18.201), f"{ZOO} hyperparams/ppo.yml Acrobot-v1",
           quick={"n_envs": "2", "n_steps": "64", "batch_size": "64"}),
    Config("QRDQN", "CartPole-v1", 50_000,
           {"learning_rate": "0.0023", "batch_size": "64", "buffer_size": "100000", "learning_starts": "1000",
            "gamma": "0.99", "target_update_interval": "10", "train_freq": "256", "gradient_steps": "128",
            "exploration_fraction": "0.16", "exploration_final_eps": "0.04", "net_arch": "256,256",
            "n_quantiles": "10"},
           (500.0, 0.0), f"{ZOO} hyperparams/qrdqn.yml CartPole-v1",
           quick={"learning_starts": "100", "buffer_size": "1000", "gradient_steps": "8"}),
    Config("TRPO", "CartPole-v1", 100_000,
           {"n_envs": "2", "n_steps": "512", "batch_size": "512", "cg_damping": "0.001", "gae_lambda": "0.98",
            "gamma": "0.99", "learning_rate": "0.001", "n_critic_updates": "20"}, (500.0, 0.0),
           f"{ZOO} hyperparams/trpo.yml CartPole-v1",
           quick={"n_steps": "64", "batch_size": "64", "n_critic_updates": "2"}),
    # No zoo row: the suite's masked env; 16 legal steps of at best 1 each, 0.1 for the other legal action.
    Config("MaskablePPO", MASKED_ENV_ID, 50_000, {"n_steps": "512", "batch_size": "64"}, None,
           "SB3 defaults but n_steps 512", quick={"n_steps": "64"}),
)
QUICK_TIMESTEPS = 600


def _hyper(config: Config, quick: bool) -> dict[str, str]:
    """The hyperparameters sent: the config's, with evaluations added (and --quick's overrides)."""
    timesteps = QUICK_TIMESTEPS if quick else config.timesteps
    hyper = {**config.hyperparameters, **(config.quick if quick else {})}
    hyper.update(eval_freq=str(max(1, timesteps // (2 if quick else 5))), n_eval_episodes=str(
        2 if quick else EVAL_EPISODES))
    return hyper


def finished_runs(results_json: Path) -> list[dict[str, Any]]:
    """The succeeded runs recorded in an earlier results.json (none when it has no learning_breadth section)."""
    if not results_json.is_file():
        return []
    section = json.loads(results_json.read_text()).get("sections", {}).get("learning_breadth")
    if not section or section.get("quick"):
        return []
    return [r for r in section.get("data", {}).get("runs", []) if r.get("state") == "SUCCEEDED"]


def _same_run(record: dict[str, Any], config: Config, seed: int, hyper: dict[str, str]) -> bool:
    """True when an earlier run trained exactly this configuration and seed (records name what they sent)."""
    return (record.get("key") == config.key and record.get("seed") == seed
            and record.get("timesteps") == config.timesteps and record.get("hyperparameters") == hyper)


def train(address: str, seeds: list[int], quick: bool, kept: list[dict[str, Any]] | None = None
          ) -> list[dict[str, Any]]:
    """Start every run not in `kept` (seed by seed, longest first), wait for all; one record per run."""
    from rl_service_proto.v1 import training_pb2 as pb

    stub = training_stub(address)
    runs: list[dict[str, Any]] = []
    reused: list[dict[str, Any]] = []
    for seed in seeds:
        for config in sorted(CONFIGS, key=lambda c: -c.timesteps):
            timesteps = QUICK_TIMESTEPS if quick else config.timesteps
            hyper = _hyper(config, quick)
            earlier = next((r for r in kept or [] if _same_run(r, config, seed, hyper)), None)
            if earlier is not None:
                reused.append({**earlier, "reused": True})
                continue
            run_id = stub.StartTraining(pb.StartTrainingRequest(
                experiment_id="benchmark-learning-breadth", algorithm=config.algorithm, env_id=config.env_id,
                total_timesteps=timesteps, seed=seed, hyperparameters=hyper,
                checkpoint_interval=max(100, timesteps // 2)), timeout=60).run_id
            runs.append({"key": config.key, "seed": seed, "timesteps": timesteps, "run_id": run_id,
                         "hyperparameters": hyper})
    if reused:
        print(f"    reusing {len(reused)} finished runs; training {len(runs)}", flush=True)
    final = wait_for_runs(stub, [r["run_id"] for r in runs], poll=0.5 if quick else 5.0) if runs else {}
    for run in runs:
        status = final[run["run_id"]]
        run.update(state=pb.RunState.Name(status.state), error=status.error,
                   wall_seconds=status.finished_at - status.started_at, timesteps_done=status.timesteps_done,
                   last=_evaluation(status, "last_evaluation"), best=_evaluation(status, "best_evaluation"))
    return sorted(reused + runs, key=lambda r: (r["key"], r["seed"]))


def _evaluation(status: Any, name: str) -> dict[str, float] | None:
    if not status.HasField(name):
        return None
    evaluation = getattr(status, name)
    return {"mean": evaluation.mean_reward, "std": evaluation.std_reward, "timesteps": evaluation.timesteps}


def report(runs: list[dict[str, Any]], quick: bool) -> Section:
    """The table: per configuration, the last and best evaluations over seeds, beside the zoo's figure."""
    table = Table(f"Last and best evaluation ({EVAL_EPISODES if not quick else 2} deterministic episodes each), "
                  "mean over seeds", ["algorithm", "env", "timesteps", "seeds", "last (per seed)", "last mean",
                                      "best mean", "zoo mean ± std", "goal", "train wall s (mean)"])
    summary = []
    for config in CONFIGS:
        mine = [r for r in runs if r["key"] == config.key]
        lasts = [r["last"]["mean"] for r in mine if r.get("last")]
        bests = [r["best"]["mean"] for r in mine if r.get("best")]
        walls = [r["wall_seconds"] for r in mine if r.get("state") == "SUCCEEDED"]
        last_mean = statistics.fmean(lasts) if lasts else None
        met: bool | None = None
        if not quick and config.published is not None and last_mean is not None and len(lasts) == len(mine):
            mean, std = config.published
            met = abs(last_mean - mean) <= std
        published = f"{fmt(config.published[0])} ± {fmt(config.published[1])}" if config.published else "no row"
        table.rows.append([config.algorithm, config.env_id, fmt(mine[0]["timesteps"]) if mine else "-",
                           str(len(mine)), ", ".join(fmt(v) for v in lasts) or "-", fmt(last_mean),
                           fmt(statistics.fmean(bests) if bests else None), published, goal_cell(met),
                           fmt(statistics.fmean(walls) if walls else None)])
        summary.append({"goal": f"{config.key} within the zoo's std", "measured": fmt(last_mean),
                        "met": met, "wall_seconds": walls})
    hyper = Table("Hyperparameters sent to StartTraining (besides eval_freq and n_eval_episodes)",
                  ["algorithm", "env", "hyperparameters", "source", "not matched"])
    for config in CONFIGS:
        hyper.rows.append([config.algorithm, config.env_id,
                           ", ".join(f"`{k}={v}`" for k, v in config.hyperparameters.items()) or "defaults",
                           config.source, "; ".join(config.unmatched) or "-"])
    failed = [f"{r['key']} seed {r['seed']}: {r['state']} {r.get('error', '')}" for r in runs
              if r.get("state") != "SUCCEEDED"]
    reused = [f"{r['key']} seed {r['seed']}" for r in runs if r.get("reused")]
    return Section(
        name="learning_breadth", title="Learning breadth: SAC, TD3, DDPG, TQC, QR-DQN, TRPO, MaskablePPO, normalize",
        intro=(__doc__ or "").split("\n\n")[1], tables=[table, hyper],
        notes=[f"Sources: {ZOO_FILES}.", *(["Runs that did not succeed: " + "; ".join(failed)] if failed else []),
               *([f"Reused from the previous results (--keep-finished: same configuration and seed): "
                  f"{len(reused)} of {len(runs)} runs."] if reused else [])],
        data={"runs": runs, "summary": summary})


def run(quick: bool, seeds: list[int], kept: list[dict[str, Any]] | None = None) -> Section:
    """A server in a subprocess (two runs at a time, the suite's masked env loaded), every run, the report."""
    seeds = seeds[:1] if quick else seeds
    # 27 runs are queued at once (9 configurations x 3 seeds), two training at a time.
    env = {"GYM_PACKAGES": "tests.support.envs", "MAX_QUEUED_RUNS": "64",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    with tempfile.TemporaryDirectory(prefix="bench-learning-breadth-") as tmp:
        server = start_server_process(Path(tmp) / "server", "--max-concurrent-runs", "2", env=env)
        try:
            started = time.perf_counter()
            runs = train(server.address, seeds, quick, kept)
            print(f"    {len(runs)} runs in {time.perf_counter() - started:.0f} s", flush=True)
            for r in runs:
                print(f"    {r['key']} seed {r['seed']}: {r['state']} {r['timesteps_done']} steps in "
                      f"{r['wall_seconds']:.1f} s, last {r['last']}{' (reused)' if r.get('reused') else ''}",
                      flush=True)
        finally:
            server.stop()
    return report(runs, quick)
