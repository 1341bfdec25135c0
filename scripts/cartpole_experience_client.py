"""A client that runs its own CartPole loop and trains a named policy on the service with its experience.

It needs only grpcio, the stubs compiled from proto/, torch and gymnasium (it never imports rl_service): it acts
with the TorchScript model the service hands back, sends each batch of episodes with SendTrainingBatch, takes the
updated model from the answer, and finally evaluates the greedy policy.

REINFORCE on CartPole does not stay at 500: the greedy policy gets there and, as updates go on, falls back and
climbs again (seed 0 passes 500 at batches 11, 12 and 24 to 32, and ends a fixed 50 batches at 191.5; a smaller
learning rate only slows the swings). So after every update the client checks the greedy policy on
--check-episodes fresh episodes and stops once every one of them reaches --target on --stop-after consecutive
batches; --batches is only the most it will send (--stop-after 0 sends all of them, the old behaviour). The
final evaluation runs on other episodes (reset seeds 10000 onwards), never seen by a check.

With --algorithm ppo the policy learns with PPO: each batch is a fixed number of steps (--steps-per-batch, 512 by
default) of one environment that carries on across batches, so episodes are cut at batch ends (the server
bootstraps them with its critic); a time-limit end is sent as truncated, and each batch names the version it was
collected with (behaviour_version).

    python scripts/cartpole_experience_client.py --address 127.0.0.1:50051 --batches 150
    python scripts/cartpole_experience_client.py --algorithm ppo --fresh
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time

import grpc
import gymnasium as gym
import numpy as np
import torch

from rl_service_proto.v1 import policy_pb2 as pb
from rl_service_proto.v1 import policy_pb2_grpc as pb_grpc


def load_model(data: bytes) -> torch.jit.ScriptModule:
    """A TorchScript policy from the service: obs (batch, 4) -> action probabilities (batch, 2)."""
    return torch.jit.load(io.BytesIO(data))


def collect(env: gym.Env, model: torch.jit.ScriptModule, min_steps: int, rng: np.random.Generator,
            seed: int) -> tuple[list[float], list[float], list[float], list[bool], list[float]]:
    """Whole episodes, sampling actions from the policy, until at least `min_steps` transitions."""
    states: list[float] = []
    actions: list[float] = []
    rewards: list[float] = []
    dones: list[bool] = []
    returns: list[float] = []
    obs, _ = env.reset(seed=seed)
    total = 0.0
    while True:
        with torch.no_grad():
            probs = model(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))[0].numpy()
        action = int(rng.choice(len(probs), p=probs / probs.sum()))
        next_obs, reward, terminated, truncated, _ = env.step(action)
        done = bool(terminated or truncated)
        states.extend(float(x) for x in obs)
        actions.append(float(action))
        rewards.append(float(reward))
        dones.append(done)
        total += float(reward)
        obs = next_obs
        if done:
            returns.append(total)
            total = 0.0
            if len(rewards) >= min_steps:
                return states, actions, rewards, dones, returns
            obs, _ = env.reset()


class Stepper:
    """One CartPole environment that carries on across PPO's fixed-size batches."""

    def __init__(self, seed: int) -> None:
        self.env = gym.make("CartPole-v1")
        self.obs, _ = self.env.reset(seed=seed)
        self.total = 0.0

    def collect(self, model: torch.jit.ScriptModule, steps: int, rng: np.random.Generator
                ) -> tuple[list[float], list[float], list[float], list[bool], list[bool], list[float]]:
        """Exactly `steps` transitions sampled from the policy; the last episode may go on in the next batch."""
        states: list[float] = []
        actions: list[float] = []
        rewards: list[float] = []
        dones: list[bool] = []
        truncs: list[bool] = []
        returns: list[float] = []
        for _ in range(steps):
            with torch.no_grad():
                probs = model(torch.as_tensor(self.obs, dtype=torch.float32).unsqueeze(0))[0].numpy()
            action = int(rng.choice(len(probs), p=probs / probs.sum()))
            next_obs, reward, terminated, truncated, _ = self.env.step(action)
            states.extend(float(x) for x in self.obs)
            actions.append(float(action))
            rewards.append(float(reward))
            dones.append(bool(terminated or truncated))
            truncs.append(bool(truncated and not terminated))
            self.total += float(reward)
            self.obs = next_obs
            if terminated or truncated:
                returns.append(self.total)
                self.total = 0.0
                self.obs, _ = self.env.reset()
        return states, actions, rewards, dones, truncs, returns


def evaluate(model: torch.jit.ScriptModule, episodes: int, seed: int,
             stop_below: float | None = None) -> list[float]:
    """Greedy (most probable action) returns on fresh episodes (reset seeds seed, seed + 1, ...).

    With `stop_below`, stops after the first episode that returns less (the check has failed already).
    """
    env = gym.make("CartPole-v1")
    results = []
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
        if stop_below is not None and total < stop_below:
            break
    return results


def main(argv: list[str] | None = None) -> int:
    """Create (or reuse) the policy, train it until the stopping rule holds or --batches, print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--policy-id", default="cartpole-client")
    parser.add_argument("--batches", type=int, default=150, help="the most batches to send")
    parser.add_argument("--algorithm", choices=("reinforce", "ppo"), default="reinforce")
    parser.add_argument("--steps-per-batch", type=int, default=None,
                        help="REINFORCE: at least this many transitions a batch, whole episodes (default 2000); "
                             "PPO: exactly this many (default 512)")
    parser.add_argument("--learning-rate", default=None, help="default: 0.005 (REINFORCE), 0.001 (PPO)")
    parser.add_argument("--beta", default="0.01", help="REINFORCE's entropy weight")
    parser.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="another hyperparameter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=500.0, help="greedy return the checks ask for")
    parser.add_argument("--stop-after", type=int, default=3,
                        help="stop once the check passes on this many consecutive batches (0: never stop early)")
    parser.add_argument("--check-episodes", type=int, default=10,
                        help="greedy episodes per check; each must reach --target")
    parser.add_argument("--eval-episodes", type=int, default=10, help="greedy episodes of the final evaluation")
    parser.add_argument("--fresh", action="store_true",
                        help="delete --policy-id first if it exists (otherwise an identical policy is reused and "
                             "trained further)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stub = pb_grpc.PolicyServiceStub(grpc.insecure_channel(args.address))
    ppo = args.algorithm == "ppo"
    steps_per_batch = args.steps_per_batch or (512 if ppo else 2000)
    # PPO: rl-baselines3-zoo's CartPole settings where they fit one environment (gamma 0.98, gae_lambda 0.8,
    # learning rate 1e-3, constant here), with 512-step batches of 64-step minibatches.
    hyperparameters = ({"learning_rate": args.learning_rate or "0.001", "gamma": "0.98", "gae_lambda": "0.8",
                        "n_epochs": "10", "batch_size": "64"} if ppo
                       else {"learning_rate": args.learning_rate or "0.005", "beta": args.beta})
    spec = pb.PolicySpec(observation_shape=[4], discrete_n=2, seed=args.seed, algorithm=args.algorithm,
                         hyperparameters={**hyperparameters, **dict(item.split("=", 1) for item in args.hp)})
    if args.fresh:
        try:
            stub.DeletePolicy(pb.PolicyRequest(policy_id=args.policy_id))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
    info = stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=args.policy_id, spec=spec))
    if not info.created:
        sys.stderr.write(f"policy {args.policy_id!r} already existed (version {info.version}); training it further "
                         "(--fresh starts over)\n")
    blob = stub.GetModel(pb.GetModelRequest(policy_id=args.policy_id))
    model, version = load_model(blob.data), blob.version
    env, rng = gym.make("CartPole-v1"), np.random.default_rng(args.seed)
    stepper = Stepper(args.seed * 100_000) if ppo else None
    history = []
    streak = 0
    steps = 0
    first_pass_steps: int | None = None
    started = time.perf_counter()
    for index in range(args.batches):
        if stepper is not None:
            states, actions, rewards, dones, truncs, returns = stepper.collect(model, steps_per_batch, rng)
            batch = pb.TrainingBatch(policy_id=args.policy_id, states=states, actions=actions, rewards=rewards,
                                     dones=dones, truncated=truncs, behaviour_version=version, return_model=True)
        else:
            states, actions, rewards, dones, returns = collect(env, model, steps_per_batch, rng,
                                                               seed=args.seed * 100_000 + index)
            batch = pb.TrainingBatch(policy_id=args.policy_id, states=states, actions=actions, rewards=rewards,
                                     dones=dones, return_model=True)
        steps += len(rewards)
        result = stub.SendTrainingBatch(batch)
        model, version = load_model(result.torchscript), result.version
        check: list[float] = []
        if args.stop_after > 0:
            # Seeds 20000 + 10 * batch onwards: other episodes at every check, none of the final evaluation's.
            check = evaluate(model, args.check_episodes, seed=20_000 + 10 * index, stop_below=args.target)
            passed = len(check) == args.check_episodes and min(check) >= args.target
            streak = streak + 1 if passed else 0
            if passed and first_pass_steps is None:
                first_pass_steps = steps
        mean_return = float(np.mean(returns)) if returns else 0.0
        history.append({"batch": index + 1, "version": result.version, "steps": steps, "episodes": len(returns),
                        "mean_return": mean_return, "loss": result.metrics.loss,
                        "check_min_return": min(check) if check else None, "streak": streak})
        sys.stderr.write(f"batch {index + 1:3d}  version {result.version:3d}  episodes {len(returns):3d}  "
                         f"steps {steps:6d}  mean return {mean_return:6.1f}"
                         + (f"  check {min(check):5.0f}  streak {streak}" if check else "") + "\n")
        if args.stop_after > 0 and streak >= args.stop_after:
            break
    greedy = evaluate(model, args.eval_episodes, seed=10_000)
    seconds = time.perf_counter() - started
    print(json.dumps({"policy_id": args.policy_id, "batches": len(history),
                      "stopped_early": args.stop_after > 0 and streak >= args.stop_after,
                      "algorithm": args.algorithm, "steps": steps, "first_pass_steps": first_pass_steps,
                      "episodes": sum(h["episodes"] for h in history), "seconds": round(seconds, 1),
                      "final_version": history[-1]["version"] if history else 0,
                      "greedy_mean_return": float(np.mean(greedy)), "greedy_returns": greedy, "history": history}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
