"""A client that runs its own CartPole loop and trains a named policy on the service with its experience.

It needs only grpcio, the stubs compiled from proto/, torch and gymnasium (it never imports rl_service): it acts
with the TorchScript model the service hands back, sends each batch of episodes with SendTrainingBatch, takes the
updated model from the answer, and finally evaluates the greedy policy.

    python scripts/cartpole_experience_client.py --address 127.0.0.1:50051 --batches 50
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


def evaluate(model: torch.jit.ScriptModule, episodes: int, seed: int) -> list[float]:
    """Greedy (most probable action) returns on fresh episodes."""
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
    return results


def main(argv: list[str] | None = None) -> int:
    """Create (or reuse) the policy, train it for --batches batches, print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--policy-id", default="cartpole-client")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--steps-per-batch", type=int, default=2000, help="at least this many transitions a batch")
    parser.add_argument("--learning-rate", default="0.005")
    parser.add_argument("--beta", default="0.01")
    parser.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="another hyperparameter")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stub = pb_grpc.PolicyServiceStub(grpc.insecure_channel(args.address))
    spec = pb.PolicySpec(observation_shape=[4], discrete_n=2, seed=args.seed,
                         hyperparameters={"learning_rate": args.learning_rate, "beta": args.beta,
                                          **dict(item.split("=", 1) for item in args.hp)})
    stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=args.policy_id, spec=spec))
    model = load_model(stub.GetModel(pb.GetModelRequest(policy_id=args.policy_id)).data)
    env, rng = gym.make("CartPole-v1"), np.random.default_rng(args.seed)
    history = []
    started = time.perf_counter()
    for index in range(args.batches):
        states, actions, rewards, dones, returns = collect(env, model, args.steps_per_batch, rng,
                                                           seed=args.seed * 100_000 + index)
        result = stub.SendTrainingBatch(pb.TrainingBatch(policy_id=args.policy_id, states=states, actions=actions,
                                                         rewards=rewards, dones=dones, return_model=True))
        model = load_model(result.torchscript)
        history.append({"batch": index + 1, "version": result.version, "episodes": len(returns),
                        "mean_return": float(np.mean(returns)), "loss": result.metrics.loss})
        sys.stderr.write(f"batch {index + 1:3d}  version {result.version:3d}  episodes {len(returns):3d}  "
                         f"mean return {np.mean(returns):6.1f}\n")
    greedy = evaluate(model, 10, seed=10_000)
    print(json.dumps({"policy_id": args.policy_id, "batches": args.batches, "seconds": round(
        time.perf_counter() - started, 1), "final_version": history[-1]["version"] if history else 0,
        "greedy_mean_return": float(np.mean(greedy)), "greedy_returns": greedy, "history": history}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
