"""Section 8, named policies learn with PPO too: a client's own loop on CartPole-v1 and Pendulum-v1, acting with
the model the service hands back, trained through PolicyService.SendTrainingBatch on a server in a subprocess.

CartPole-v1, side by side in one run, for each seed:

- REINFORCE: the tuned defaults of scripts/cartpole_experience_client.py (learning_rate 0.005, beta 0.01, whole
  episodes, at least 2,000 transitions a batch);
- PPO, newest: the script's PPO defaults (512-step batches of one environment that carries on across batches,
  time-limit ends sent as truncated, learning_rate 1e-3, gamma 0.98, gae_lambda 0.8, n_epochs 10, batch_size 64),
  acting with the model of the newest version and sending that version as behaviour_version;
- PPO, one behind: the same, but the client acts with the previous version's model (kept from the reply before)
  and sends that version as behaviour_version, so every update corrects for data one version old.

After every update the greedy policy (most probable action) of the newest version plays 10 fresh episodes (reset
seeds 20000 + 10 x update onwards); the run stops the first time their mean return is >= 475, or at the step cap
(50,000 transitions for PPO, 100,000 for REINFORCE). Steps count training transitions only. Then the final
greedy mean over 10 evaluation episodes (reset seeds 10000..10009, never seen by a check).
Goal: every PPO seed, newest and one behind, passes within 50,000 steps and in fewer steps than REINFORCE on that
seed (a REINFORCE run that never passes counts as more).

Pendulum-v1 (Box actions): a PPO named policy with rl-baselines3-zoo's Pendulum-v1 PPO settings where a named
policy can follow them, 102,400 steps (25 batches of 4 x 1,024), evaluated deterministically (the Gaussian's mean
clipped to [-2, 2]) over 10 episodes (reset seeds 10000..10009), beside the zoo's published PPO figure.
"""

from __future__ import annotations

import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Section, Table, fmt, median, start_server_process

TARGET = 475.0
CHECK_EPISODES = 10
EVAL_EPISODES = 10
PPO_CAP, REINFORCE_CAP = 50_000, 100_000
VARIANTS = ("reinforce", "ppo newest", "ppo one behind")
# DLR-RM/rl-baselines3-zoo, benchmark.md: PPO on Pendulum-v1, 100k timesteps, mean_reward -172.225, std_reward
# 104.159, over 750 deterministic evaluation episodes of one trained agent.
ZOO_PENDULUM_PPO = -172.0
ZOO_SOURCE = "DLR-RM/rl-baselines3-zoo benchmark.md, PPO Pendulum-v1"
# rl-baselines3-zoo's hyperparams/ppo.yml, Pendulum-v1: n_envs 4, n_steps 1024, gae_lambda 0.95, gamma 0.9,
# n_epochs 10, ent_coef 0.0, learning_rate 1e-3, clip_range 0.2, use_sde true (sde_sample_freq 4), 1e5 timesteps;
# batch_size is SB3's default 64.
PENDULUM_HYPER = {"learning_rate": "0.001", "gamma": "0.9", "gae_lambda": "0.95", "n_epochs": "10",
                  "ent_coef": "0.0", "clip_range": "0.2", "batch_size": "64"}
PENDULUM_ENVS, PENDULUM_STEPS_PER_ENV, PENDULUM_UPDATES = 4, 1024, 25
CARTPOLE_PPO_HYPER = {"learning_rate": "0.001", "gamma": "0.98", "gae_lambda": "0.8", "n_epochs": "10",
                      "batch_size": "64"}
CARTPOLE_REINFORCE_HYPER = {"learning_rate": "0.005", "beta": "0.01"}


def _load(data: bytes) -> Any:
    import torch

    return torch.jit.load(io.BytesIO(data))


# ---------------------------------------------------------------------------------------------------- CartPole


def greedy_returns(model: Any, episodes: int, seed: int, need_mean: float | None = None) -> list[float]:
    """Greedy CartPole returns on reset seeds seed, seed + 1, ...; with `need_mean`, stops as soon as the mean
    over `episodes` can no longer reach it (every episode is worth at most 500)."""
    import gymnasium as gym
    import torch

    env = gym.make("CartPole-v1")
    results: list[float] = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                probs = model(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))[0]
            obs, reward, terminated, truncated, _ = env.step(int(probs.argmax()))
            total += float(reward)
            done = terminated or truncated
        results.append(total)
        if need_mean is not None and sum(results) + 500.0 * (episodes - i - 1) < need_mean * episodes:
            break
    env.close()
    return results


def _sample(model: Any, obs: np.ndarray, rng: np.random.Generator) -> int:
    import torch

    with torch.no_grad():
        probs = model(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))[0].numpy().astype(np.float64)
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def _episodes(env: Any, model: Any, min_steps: int, rng: np.random.Generator, seed: int) -> dict[str, list[Any]]:
    """REINFORCE's batch: whole episodes sampled from the policy until at least `min_steps` transitions."""
    out: dict[str, list[Any]] = {"states": [], "actions": [], "rewards": [], "dones": []}
    obs, _ = env.reset(seed=seed)
    while True:
        action = _sample(model, obs, rng)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        out["states"].extend(float(x) for x in obs)
        out["actions"].append(float(action))
        out["rewards"].append(float(reward))
        out["dones"].append(bool(terminated or truncated))
        obs = next_obs
        if terminated or truncated:
            if len(out["rewards"]) >= min_steps:
                return out
            obs, _ = env.reset()


class _Stepper:
    """PPO's batches: one CartPole environment that carries on across fixed-size batches."""

    def __init__(self, seed: int) -> None:
        import gymnasium as gym

        self.env = gym.make("CartPole-v1")
        self.obs, _ = self.env.reset(seed=seed)

    def collect(self, model: Any, steps: int, rng: np.random.Generator) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"states": [], "actions": [], "rewards": [], "dones": [], "truncated": []}
        for _ in range(steps):
            action = _sample(model, self.obs, rng)
            next_obs, reward, terminated, truncated, _ = self.env.step(action)
            out["states"].extend(float(x) for x in self.obs)
            out["actions"].append(float(action))
            out["rewards"].append(float(reward))
            out["dones"].append(bool(terminated or truncated))
            out["truncated"].append(bool(truncated and not terminated))
            self.obs = next_obs
            if terminated or truncated:
                self.obs, _ = self.env.reset()
        return out


@dataclass
class CartPoleRun:
    variant: str
    seed: int
    cap: int
    steps: int
    updates: int
    first_pass_steps: int | None
    final_mean: float
    final_returns: list[float]
    seconds: float
    curve: list[tuple[int, float]]  # (steps, mean of the check's episodes played)


def cartpole_run(stub: Any, variant: str, seed: int, cap: int, max_updates: int | None = None) -> CartPoleRun:
    """One client loop until the greedy check first passes, the step cap, or `max_updates`."""
    import gymnasium as gym

    from rl_service_proto.v1 import policy_pb2 as pb

    ppo = variant != "reinforce"
    lagged = variant == "ppo one behind"
    policy_id = f"cartpole-{variant.replace(' ', '-')}-{seed}"
    spec = pb.PolicySpec(observation_shape=[4], discrete_n=2, seed=seed, algorithm="ppo" if ppo else "reinforce",
                         hyperparameters=CARTPOLE_PPO_HYPER if ppo else CARTPOLE_REINFORCE_HYPER)
    stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=policy_id, spec=spec), timeout=30)
    blob = stub.GetModel(pb.GetModelRequest(policy_id=policy_id), timeout=30)
    newest, newest_version = _load(blob.data), blob.version
    acting, acting_version = newest, newest_version
    rng = np.random.default_rng(seed)
    env = gym.make("CartPole-v1")
    stepper = _Stepper(seed * 100_000) if ppo else None
    steps, updates, first_pass = 0, 0, None
    curve: list[tuple[int, float]] = []
    started = time.perf_counter()
    while steps < cap and (max_updates is None or updates < max_updates):
        if stepper is not None:
            batch = stepper.collect(acting, 512, rng)
            message = pb.TrainingBatch(policy_id=policy_id, behaviour_version=acting_version, return_model=True,
                                       **batch)
        else:
            batch = _episodes(env, acting, 2000, rng, seed=seed * 100_000 + updates)
            message = pb.TrainingBatch(policy_id=policy_id, return_model=True, **batch)
        steps += len(batch["rewards"])
        result = stub.SendTrainingBatch(message, timeout=300)
        previous, previous_version = newest, newest_version
        newest, newest_version = _load(result.torchscript), result.version
        # One behind: act with the version before the newest (version 0 until there is one).
        acting, acting_version = (previous, previous_version) if lagged else (newest, newest_version)
        check = greedy_returns(newest, CHECK_EPISODES, seed=20_000 + 10 * updates, need_mean=TARGET)
        updates += 1
        curve.append((steps, float(np.mean(check))))
        if len(check) == CHECK_EPISODES and float(np.mean(check)) >= TARGET:
            first_pass = steps
            break
    seconds = time.perf_counter() - started
    final = greedy_returns(newest, EVAL_EPISODES, seed=10_000)
    env.close()
    return CartPoleRun(variant, seed, cap, steps, updates, first_pass, float(np.mean(final)), final, seconds, curve)


# ---------------------------------------------------------------------------------------------------- Pendulum


@dataclass
class PendulumRun:
    seed: int
    steps: int
    updates: int
    final_mean: float
    final_returns: list[float]
    train_means: list[float]  # mean return of the training episodes that ended in each batch
    seconds: float


def pendulum_run(stub: Any, seed: int, updates: int, steps_per_env: int) -> PendulumRun:
    """PPO on Pendulum-v1 from PENDULUM_ENVS environments stepped by the client, one batch per rollout."""
    import gymnasium as gym
    import torch

    from rl_service_proto.v1 import policy_pb2 as pb

    policy_id = f"pendulum-ppo-{seed}"
    spec = pb.PolicySpec(observation_shape=[3], box=pb.BoxActions(shape=[1]), seed=seed, algorithm="ppo",
                         hyperparameters=PENDULUM_HYPER)
    stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=policy_id, spec=spec), timeout=30)
    blob = stub.GetModel(pb.GetModelRequest(policy_id=policy_id), timeout=30)
    model, version = _load(blob.data), blob.version
    rng = np.random.default_rng(seed)
    envs = [gym.make("Pendulum-v1") for _ in range(PENDULUM_ENVS)]
    obs = np.stack([env.reset(seed=seed * 100_000 + i)[0] for i, env in enumerate(envs)]).astype(np.float32)
    totals = np.zeros(PENDULUM_ENVS)
    steps, train_means = 0, []
    started = time.perf_counter()
    for _ in range(updates):
        states = np.zeros((PENDULUM_ENVS, steps_per_env, 3), np.float32)
        actions = np.zeros((PENDULUM_ENVS, steps_per_env), np.float64)
        rewards = np.zeros((PENDULUM_ENVS, steps_per_env), np.float64)
        dones = np.zeros((PENDULUM_ENVS, steps_per_env), bool)
        truncs = np.zeros((PENDULUM_ENVS, steps_per_env), bool)
        ended: list[float] = []
        for t in range(steps_per_env):
            with torch.no_grad():
                mean, std = model(torch.as_tensor(obs))
            # The sampled action is what is sent (SB3 stores it unclipped too); the environment gets it clipped.
            action = (mean.numpy()[:, 0] + std.numpy()[:, 0] * rng.standard_normal(PENDULUM_ENVS)).astype(np.float64)
            states[:, t] = obs
            actions[:, t] = action
            for i, env in enumerate(envs):
                next_obs, reward, terminated, truncated, _ = env.step(np.clip(action[i:i + 1], -2.0, 2.0))
                rewards[i, t] = reward
                totals[i] += reward
                if terminated or truncated:
                    dones[i, t] = True
                    truncs[i, t] = bool(truncated and not terminated)
                    ended.append(float(totals[i]))
                    totals[i] = 0.0
                    next_obs, _ = env.reset()
                obs[i] = next_obs
        # One environment's rollout after another in one batch: where a rollout stops mid-episode, the transition
        # is sent as done and truncated, so the server bootstraps it with the critic and no advantage runs into
        # the next environment's rollout (the environment itself carries on in the next batch).
        truncs[:, -1] = ~(dones[:, -1] & ~truncs[:, -1])  # every end but a termination
        dones[:, -1] = True
        message = pb.TrainingBatch(policy_id=policy_id, states=states.ravel().tolist(),
                                   actions=actions.ravel().tolist(), rewards=rewards.ravel().tolist(),
                                   dones=dones.ravel().tolist(), truncated=truncs.ravel().tolist(),
                                   behaviour_version=version, return_model=True)
        steps += PENDULUM_ENVS * steps_per_env
        result = stub.SendTrainingBatch(message, timeout=600)
        model, version = _load(result.torchscript), result.version
        train_means.append(float(np.mean(ended)) if ended else float("nan"))
    seconds = time.perf_counter() - started
    final = pendulum_eval(model, EVAL_EPISODES, 10_000)
    for env in envs:
        env.close()
    return PendulumRun(seed, steps, updates, float(np.mean(final)), final, train_means, seconds)


def pendulum_eval(model: Any, episodes: int, seed: int) -> list[float]:
    """Deterministic Pendulum returns: the Gaussian's mean, clipped to the action bounds."""
    import gymnasium as gym
    import torch

    env = gym.make("Pendulum-v1")
    results = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                mean, _ = model(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))
            obs, reward, terminated, truncated, _ = env.step(np.clip(mean.numpy()[0], -2.0, 2.0))
            total += float(reward)
            done = terminated or truncated
        results.append(total)
    env.close()
    return results


# ---------------------------------------------------------------------------------------------------- section


def run(quick: bool, seeds: list[int]) -> Section:
    """Start a server, run the CartPole variants and the Pendulum runs, and report."""
    import grpc
    import torch

    from rl_service_proto.v1 import policy_pb2_grpc

    torch.set_num_threads(1)
    seeds = seeds[:1] if quick else seeds
    with tempfile.TemporaryDirectory(prefix="bench-policy-learning-") as tmp:
        server = start_server_process(Path(tmp) / "server")
        try:
            with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20),
                                                                ("grpc.max_receive_message_length", 64 << 20)]
                                       ) as channel:
                stub = policy_pb2_grpc.PolicyServiceStub(channel)
                max_updates = 2 if quick else None
                cartpole: list[CartPoleRun] = []
                for seed in seeds:
                    for variant in VARIANTS:
                        cap = REINFORCE_CAP if variant == "reinforce" else PPO_CAP
                        r = cartpole_run(stub, variant, seed, cap, max_updates)
                        print(f"    cartpole {variant} seed {seed}: first pass {r.first_pass_steps} "
                              f"({r.steps} steps, {r.updates} updates, {r.seconds:.0f} s), final {r.final_mean}",
                              flush=True)
                        cartpole.append(r)
                pendulum: list[PendulumRun] = []
                for seed in seeds:
                    p = pendulum_run(stub, seed, 2 if quick else PENDULUM_UPDATES,
                                     128 if quick else PENDULUM_STEPS_PER_ENV)
                    print(f"    pendulum seed {seed}: {p.steps} steps, final {p.final_mean:.1f} "
                          f"({p.seconds:.0f} s)", flush=True)
                    pendulum.append(p)
        finally:
            server.stop()
    return report(cartpole, pendulum, quick, seeds)


def report(cartpole: list[CartPoleRun], pendulum: list[PendulumRun], quick: bool, seeds: list[int]) -> Section:
    section = Section("policy_learning", "8. Named policies learn: PPO against REINFORCE on CartPole-v1, and "
                                         "Pendulum-v1")
    section.intro = (__doc__ or "").split("\n\n", 1)[1].strip()
    by = {(r.variant, r.seed): r for r in cartpole}

    def steps_cell(r: CartPoleRun) -> str:
        return fmt(r.first_pass_steps) if r.first_pass_steps is not None else f"not passed in {r.steps:,}"

    rows = []
    for seed in seeds:
        rows.append([str(seed), *(f"{steps_cell(by[(v, seed)])} ({by[(v, seed)].updates} updates)"
                                  for v in VARIANTS),
                     *(fmt(by[(v, seed)].final_mean) for v in VARIANTS)])

    def med_steps(v: str) -> float:
        # A run that never passed counts as its cap (so the median is a lower bound then).
        return median([float(by[(v, s)].first_pass_steps or by[(v, s)].cap) for s in seeds])

    rows.append(["median", *(fmt(med_steps(v)) for v in VARIANTS),
                 *(fmt(median([by[(v, s)].final_mean for s in seeds])) for v in VARIANTS)])
    section.tables.append(Table(
        f"CartPole-v1: environment steps until the greedy mean over {CHECK_EPISODES} fresh episodes is >= "
        f"{TARGET:g}, and the final greedy mean ({EVAL_EPISODES} episodes, reset seeds 10000..10009)",
        ["seed", *(f"{v}: steps to pass" for v in VARIANTS), *(f"{v}: final mean" for v in VARIANTS)], rows))
    summary = []
    for v in VARIANTS[1:]:
        oks = []
        for s in seeds:
            ppo, base = by[(v, s)], by[("reinforce", s)]
            oks.append(ppo.first_pass_steps is not None and ppo.first_pass_steps <= PPO_CAP
                       and (base.first_pass_steps is None or ppo.first_pass_steps < base.first_pass_steps))
        measured = ", ".join(f"seed {s}: {steps_cell(by[(v, s)])} vs {steps_cell(by[('reinforce', s)])}"
                             for s in seeds)
        summary.append({"goal": f"CartPole-v1 {v}: greedy mean >= {TARGET:g} within {PPO_CAP:,} steps and in "
                                "fewer steps than REINFORCE, every seed",
                        "measured": measured, "met": None if quick else all(oks)})
    prow = [[str(p.seed), fmt(p.steps), fmt(p.final_mean), " ".join(str(round(x)) for x in p.final_returns),
             fmt(p.train_means[-1]), f"{p.seconds:.0f}"] for p in pendulum]
    pmed = median([p.final_mean for p in pendulum])
    prow.append(["median", "", fmt(pmed), "", fmt(median([p.train_means[-1] for p in pendulum])), ""])
    every = [x for p in pendulum for x in p.final_returns]
    prow.append([f"all {len(every)} episodes", "", f"{np.mean(every):.0f} +/- {np.std(every):.0f}", "", "", ""])
    section.tables.append(Table(
        f"Pendulum-v1, PPO named policy: deterministic return over {EVAL_EPISODES} episodes (reset seeds "
        f"10000..10009), beside rl-baselines3-zoo's PPO {ZOO_PENDULUM_PPO:g} +/- 104 at 100k steps (one agent, "
        f"750 episodes; {ZOO_SOURCE})",
        ["seed", "steps", "final mean", "final returns", "last batch's training episodes", "seconds"], prow))
    summary.append({"goal": f"Pendulum-v1 PPO named policy, deterministic mean over {EVAL_EPISODES} episodes "
                            f"(beside the zoo's {ZOO_PENDULUM_PPO:g}; no threshold)",
                    "measured": f"median {fmt(pmed)} over seeds {', '.join(str(p.seed) for p in pendulum)}",
                    "met": None})
    section.notes += [
        "CartPole steps are training transitions only (not the checks' greedy episodes); each run stops at the "
        "first passing check, so the final mean is that model's. A run that never passed counts as its cap in "
        "the median.",
        f"Pendulum: {PENDULUM_ENVS} Gymnasium environments stepped by the client, {PENDULUM_STEPS_PER_ENV:,} steps "
        f"each per batch ({PENDULUM_ENVS * PENDULUM_STEPS_PER_ENV:,}-transition batches, as the zoo's n_envs 4 x "
        f"n_steps 1024), {PENDULUM_UPDATES} batches ({PENDULUM_UPDATES * PENDULUM_ENVS * PENDULUM_STEPS_PER_ENV:,} "
        "steps, as many rollouts as SB3 collects for 1e5 timesteps); gamma 0.9, gae_lambda 0.95, n_epochs 10, "
        "batch_size 64, learning_rate 1e-3, clip_range 0.2, ent_coef 0. What differs from the zoo: no gSDE (a "
        "named policy's Gaussian has a learned state-independent std, log_std_init 0, sampled every step); the "
        "four rollouts go back to back in one batch, each rollout's last transition sent as truncated (bootstrapped "
        "with the critic's value of its own state, not of the next one, which is not sent); advantages are "
        "normalised per minibatch, as SB3.",
    ]
    section.data = {
        "summary": summary,
        "cartpole": [r.__dict__ for r in cartpole],
        "pendulum": [p.__dict__ for p in pendulum],
        "zoo_pendulum_ppo": ZOO_PENDULUM_PPO,
    }
    return section
