"""Section 1, service overhead: PPO, A2C and DQN on CartPole-v1 started through the service against the same
training as a bare stable-baselines3 script, interleaved per repeat.

Timings, both compared side by side:

- end to end: service = StartTraining sent -> final status seen by the client (worker start from the forkserver,
  env and model construction, learning, checkpoints, final save, registry updates); bare = a fresh Python process
  (spawned, so it pays the imports that the service's forkserver has already paid) that builds the env and the
  model, learns, saves the model, and exits.
- learning only: service = the worker's own started -> finished (status.started_at .. finished_at, learn() plus
  the final checkpoint and save); bare = the script's own time around model construction + learn() + save.

Both use one torch thread (the service's WORKER_TORCH_THREADS default) and the rl-baselines3-zoo hyperparameters.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Section, ServerProcess, Table, fmt, fmt_ratio, median, ratio, training_stub
from benchmarks.learning import CONFIGS

GOAL = 1.05
BUDGETS = {"PPO": 20_000, "A2C": 20_000, "DQN": 10_000}
QUICK_BUDGETS = {"PPO": 256}

BARE_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.utils import LinearSchedule
torch.set_num_threads(1)
spec = json.loads(sys.argv[1])
kwargs = {}
for key, value in spec["kwargs"].items():
    kwargs[key] = LinearSchedule(value[1], 0.0, 1.0) if isinstance(value, list) and value[0] == "lin" else value
kwargs["policy_kwargs"] = {"net_arch": spec["net_arch"],
                           "activation_fn": {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[spec["activation"]],
                           **spec["policy_kwargs"]}
t1 = time.perf_counter()
env = make_vec_env(spec["env_id"], n_envs=spec["n_envs"], seed=spec["seed"])
model = {"PPO": PPO, "A2C": A2C, "DQN": DQN}[spec["algorithm"]]("MlpPolicy", env, seed=spec["seed"], device="cpu",
                                                                 verbose=0, **kwargs)
model.learn(total_timesteps=spec["timesteps"])
model.save(spec["save"])
t2 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "learn": t2 - t1}))
"""


def bare_spec(algorithm: str, env_id: str, hyper: dict[str, str], timesteps: int, seed: int, save: str
              ) -> dict[str, Any]:
    """The script's arguments: the same values the service's schema parses the strings into."""
    from rl_service.core.algorithms.hyperparams import LinearSchedule
    from rl_service.core.algorithms.registry import get_algorithm
    from rl_service.core.algorithms.schemas import POLICY_KEYS, SERVICE_KEYS

    spec = get_algorithm(algorithm)
    values = spec.schema.parse(hyper)
    kwargs: dict[str, Any] = {}
    policy: dict[str, Any] = {}
    for key, value in values.items():
        if key in SERVICE_KEYS:  # the service's own keys (n_envs, net_arch, normalize, eval_freq, ...)
            continue
        if key in POLICY_KEYS:  # the policy's keywords (log_std_init, n_quantiles, ...), as the service passes them
            policy[key] = value
            continue
        kwargs[key] = ["lin", value.start] if isinstance(value, LinearSchedule) else value
    return {"algorithm": spec.name, "env_id": env_id, "n_envs": int(values["n_envs"]), "seed": seed,
            "timesteps": timesteps, "kwargs": kwargs, "policy_kwargs": policy, "net_arch": list(values["net_arch"]),
            "activation": str(values["activation_fn"]), "save": save}


def run_bare(spec: dict[str, Any]) -> dict[str, float]:
    """The bare script in a fresh process: wall seconds from spawn to exit, and its own inner timings."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", BARE_SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                         check=True, timeout=1800)
    wall = time.perf_counter() - started
    inner = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall": wall, "learn": inner["learn"], "imports": inner["imports"]}


def run_service(stub: Any, algorithm: str, env_id: str, hyper: dict[str, str], timesteps: int, seed: int
                ) -> dict[str, float]:
    """StartTraining -> the final status on WatchTraining; wall and the worker's own started..finished."""
    from rl_service_proto.v1 import training_pb2 as pb

    started = time.perf_counter()
    run_id = stub.StartTraining(pb.StartTrainingRequest(
        experiment_id="benchmark-overhead", algorithm=algorithm, env_id=env_id, total_timesteps=timesteps,
        seed=seed, hyperparameters=hyper), timeout=60).run_id
    final = None
    for status in stub.WatchTraining(pb.RunRequest(run_id=run_id), timeout=1800):
        final = status
    wall = time.perf_counter() - started
    assert final is not None and final.state == pb.SUCCEEDED, final
    return {"wall": wall, "learn": final.finished_at - final.started_at}


def profile_worker(algorithm: str, env_id: str, hyper: dict[str, str], timesteps: int, seed: int, root: Path
                   ) -> str:
    """cProfile of the service's worker code (run_worker) in this process: where a run's time goes."""
    from rl_service.core.algorithms.hyperparams import format_value
    from rl_service.core.algorithms.registry import get_algorithm
    from rl_service.core.runs.jobs import RunJob
    from rl_service.core.runs.worker import WorkerServices, run_worker
    from rl_service.infra.model_store import FileModelStore

    spec = get_algorithm(algorithm)
    effective = {key: format_value(value) for key, value in spec.schema.parse(hyper).items()}
    store = FileModelStore(root / "models", root / "checkpoints")
    job = RunJob(run_id="run-profile", experiment_id="profile", algorithm=algorithm.lower(), env_id=env_id,
                 total_timesteps=timesteps, seed=seed, hyperparameters=effective, checkpoint_interval=10_000,
                 model_path=str(store.run_dir("run-profile") / "model.zip"))
    profiler = cProfile.Profile()
    profiler.enable()
    run_worker(job, WorkerServices(store), lambda event: None, lambda: False)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(r"rl_service|callbacks|save|learn|collect_rollouts|train\b", 25)
    return text.getvalue()


def run(server: ServerProcess, quick: bool, repeats: int, output: Path) -> Section:
    """Every algorithm, service and bare, interleaved per repeat."""
    section = Section("overhead", "1. Service overhead against bare stable-baselines3")
    section.intro = (__doc__ or "").split("\n\n", 1)[1].strip()
    budgets = QUICK_BUDGETS if quick else BUDGETS
    configs = [c for c in CONFIGS if c.env_id == "CartPole-v1" and c.algorithm in budgets]
    samples: dict[str, dict[str, list[dict[str, float]]]] = {c.algorithm: {"service": [], "bare": []}
                                                            for c in configs}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        stub = training_stub(server.address)
        if True:  # runs are started one at a time: each has the server (and the machine) to itself
            for repeat in range(repeats):
                for config in configs:
                    steps = budgets[config.algorithm]
                    spec = bare_spec(config.algorithm, config.env_id, config.hyperparameters, steps, repeat,
                                     str(Path(tmp) / f"bare-{config.algorithm}-{repeat}.zip"))
                    order = ["service", "bare"] if repeat % 2 == 0 else ["bare", "service"]
                    for variant in order:
                        if variant == "service":
                            result = run_service(stub, config.algorithm, config.env_id, config.hyperparameters,
                                                 steps, repeat)
                        else:
                            result = run_bare(spec)
                        samples[config.algorithm][variant].append(result)
                        print(f"  overhead {config.algorithm} repeat {repeat + 1}/{repeats} {variant}: "
                              f"wall {result['wall']:.2f} s, learn {result['learn']:.2f} s", flush=True)
        table = Table(f"CartPole-v1, zoo hyperparameters, {repeats} repeats (seed = repeat), medians",
                      ["algorithm", "timesteps", "service wall s", "bare wall s", "wall ratio",
                       "service learn s", "bare learn s", "learn ratio", f"goal wall <= {GOAL}x"])
        summary = []
        worst: tuple[float, str] = (0.0, "")
        for config in configs:
            s, b = samples[config.algorithm]["service"], samples[config.algorithm]["bare"]
            sw, bw = median([x["wall"] for x in s]), median([x["wall"] for x in b])
            sl, bl = median([x["learn"] for x in s]), median([x["learn"] for x in b])
            wall_ratio, learn_ratio = ratio(sw, bw), ratio(sl, bl)
            met = None if quick else wall_ratio <= GOAL
            worst = max(worst, (learn_ratio, config.algorithm))
            table.rows.append([config.algorithm, f"{budgets[config.algorithm]:,}", fmt(sw), fmt(bw),
                               fmt_ratio(wall_ratio), fmt(sl), fmt(bl), fmt_ratio(learn_ratio),
                               {None: "not assessed", True: "met", False: "**NOT met**"}[met]])
            summary.append({"goal": f"{config.algorithm} wall time <= {GOAL}x bare SB3",
                            "measured": f"{fmt_ratio(wall_ratio)} (learn only {fmt_ratio(learn_ratio)})",
                            "met": met})
        section.tables.append(table)
        imports = median([x["imports"] for c in configs for x in samples[c.algorithm]["bare"]])
        section.notes.append(f"The bare script's own import time (torch, stable-baselines3) is {fmt(imports)} s "
                             "(median), part of its wall time; the service's worker inherits those imports from "
                             "its forkserver.")
        if not quick and worst[1] and worst[0] > GOAL:
            config = next(c for c in configs if c.algorithm == worst[1])
            prof = profile_worker(config.algorithm, config.env_id, config.hyperparameters,
                                  budgets[config.algorithm], 0, Path(tmp) / "profile")
            (output / "results").mkdir(parents=True, exist_ok=True)
            (output / "results" / f"overhead_profile_{config.algorithm.lower()}.txt").write_text(prof)
            section.notes.append(f"Profile of the service's worker code for {config.algorithm} (cProfile, "
                                 f"cumulative): results/overhead_profile_{config.algorithm.lower()}.txt.")
            section.data["profile"] = prof
    section.data.update({"summary": summary, "samples": samples, "budgets": budgets, "repeats": repeats})
    return section
