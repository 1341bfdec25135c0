"""Benchmark: REINFORCE learning quality on CartPole-v1.

Goal (issue): a mean return of at least 475 over 100 consecutive episodes within 1000 training episodes, for at
least 2 of 3 seeds. Each configuration trains the registry's REINFORCE (the same class a managed run uses, one
update per episode, one env) for up to 1000 episodes per seed, in parallel worker processes (one per core), and
records the episode at which the 100-episode mean first reached 475, the best and the final 100-episode means.
Writes benchmarks/results/reinforce_cartpole.json and .md.

    python -m benchmarks.reinforce_cartpole [--seeds 0 1 2] [--episodes 1000] [--workers 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import machine_facts

RESULTS = Path(__file__).resolve().parent / "results"
GOAL, WINDOW = 475.0, 100
# The service's defaults (issue: learning_rate 0.001, beta 0.1), and the settings a small sweep on seed 0 found
# best (learning_rate 0.002, beta 0.02); both are reported, side by side.
CONFIGS: dict[str, dict[str, float]] = {
    "defaults (lr 0.001, beta 0.1)": {"learning_rate": 1e-3, "beta": 0.1},
    "tuned (lr 0.002, beta 0.02)": {"learning_rate": 2e-3, "beta": 0.02},
}


def train_one(args: tuple[str, dict[str, float], int, int]) -> dict[str, Any]:
    """Train one seed of one configuration until `episodes` episodes; return its learning figures."""
    name, hyper, seed, episodes = args
    import torch
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    from rl_service.core.algorithms.reinforce import Reinforce

    torch.set_num_threads(1)
    returns: list[float] = []

    class Episodes(BaseCallback):  # type: ignore[misc]
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    returns.append(float(info["episode"]["r"]))
            return len(returns) < episodes

    env = make_vec_env("CartPole-v1", n_envs=1, seed=seed)
    model = Reinforce("MlpPolicy", env, seed=seed, device="cpu", **hyper)
    started = time.perf_counter()
    model.learn(10**9, callback=Episodes())
    seconds = time.perf_counter() - started
    means = np.convolve(returns, np.ones(WINDOW) / WINDOW, mode="valid")
    reached = np.flatnonzero(means >= GOAL)
    return {
        "config": name, "seed": seed, "episodes": len(returns), "timesteps": int(model.num_timesteps),
        "solved_at_episode": int(reached[0]) + WINDOW if reached.size else None,
        "best_mean_100": float(means.max()), "final_mean_100": float(means[-1]), "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every configuration and seed, write the results files, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    jobs = [(name, hyper, seed, args.episodes) for name, hyper in CONFIGS.items() for seed in args.seeds]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        runs = pool.map(train_one, jobs)
    summary = []
    for name in CONFIGS:
        mine = [r for r in runs if r["config"] == name]
        solved = [r for r in mine if r["solved_at_episode"] is not None]
        summary.append({"config": name, "seeds_solved": len(solved), "seeds": len(mine),
                        "goal_met": len(solved) >= 2 and len(mine) >= 3,
                        "median_solved_at": float(np.median([r["solved_at_episode"] for r in solved]))
                        if solved else None})
    report = {"benchmark": "reinforce_cartpole", "goal": f"mean over {WINDOW} episodes >= {GOAL} within "
              f"{args.episodes} episodes for >= 2 of 3 seeds", "date": datetime.datetime.now(datetime.UTC)
              .isoformat(timespec="seconds"), "machine": machine_facts(), "runs": runs, "summary": summary}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "reinforce_cartpole.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# REINFORCE on CartPole-v1: learning quality", "",
        f"Goal: {report['goal']}. Date {report['date']}; {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores; torch {report['machine']['versions']['torch']}, "
        f"stable-baselines3 {report['machine']['versions']['stable_baselines3']}.", "",
        "| configuration | seed | solved at episode | best 100-episode mean | final 100-episode mean | timesteps | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['config']} | {r['seed']} | {r['solved_at_episode'] or 'not within budget'} | "
                     f"{r['best_mean_100']:.1f} | {r['final_mean_100']:.1f} | {r['timesteps']} | {r['seconds']} |")
    lines += ["", "| configuration | seeds solved | goal met | median solved at |", "|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['config']} | {s['seeds_solved']}/{s['seeds']} | {'yes' if s['goal_met'] else 'NO'} | "
                     f"{s['median_solved_at'] or '-'} |")
    (args.output / "reinforce_cartpole.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
