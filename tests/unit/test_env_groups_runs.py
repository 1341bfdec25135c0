"""env_groups through StartTraining's validation and the worker: who may set it, and a run that trains with two
groups in flight against an in-process fake simulation (the gRPC path: tests/integration/test_env_groups_service.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
from stable_baselines3.common.vec_env import VecEnv, VecMonitor

from rl_service.core.algorithms.registry import ALGORITHMS
from rl_service.core.envs import EnvSpaces
from rl_service.core.errors import EnvironmentLacksFeature, InvalidHyperparameter
from rl_service.core.runs.events import Failed, Finished
from rl_service.core.runs.jobs import RunJob
from rl_service.core.runs.records import TrainingRequest
from rl_service.core.runs.requests import RequestLimits, validate_request
from rl_service.core.runs.worker import WorkerServices, run_worker
from rl_service.infra.external_env.adapter import FakeExternalEnvAdapter
from rl_service.infra.external_env.vec_env import ExternalVecEnv
from tests.unit.test_worker import Sink, Stop, make_job

SIM = "grpc://127.0.0.1:50099"
GROUPED = {"n_steps": "32", "batch_size": "64", "n_epochs": "1", "net_arch": "16,16", "env_groups": "2"}


class FakeSimulations:
    """ExternalEnvironments over in-process fakes: CartPole with num_envs envs, speaking version 2 or 1."""

    def __init__(self, num_envs: int = 4, env_subsets: bool = True) -> None:
        self.num_envs = num_envs
        self.env_subsets = env_subsets
        self.adapters: list[FakeExternalEnvAdapter] = []

    def spaces(self, address: str) -> EnvSpaces:
        adapter = FakeExternalEnvAdapter.from_gym_id("CartPole-v1", self.num_envs)
        return EnvSpaces(adapter.spec.observation_space, adapter.spec.action_space, self.num_envs,
                         env_subsets=self.env_subsets)

    def make_vec_env(self, address: str, n_envs: int, seed: int) -> VecEnv:
        adapter = FakeExternalEnvAdapter.from_gym_id("CartPole-v1", self.num_envs, env_subsets=self.env_subsets)
        self.adapters.append(adapter)
        env = VecMonitor(ExternalVecEnv(adapter))
        env.seed(seed)
        return env


def validate(algorithm: str, env_id: str, sims: FakeSimulations | None = None, **hyperparameters: str) -> Any:
    request = TrainingRequest(algorithm=algorithm, env_id=env_id, total_timesteps=1000,
                              hyperparameters=hyperparameters)
    return validate_request(request, RequestLimits(), sims or FakeSimulations())


def test_the_on_policy_algorithms_accept_two_groups_against_a_v2_simulation() -> None:
    for name in ("PPO", "A2C", "TRPO"):
        assert validate(name, SIM, env_groups="2").hyperparameters["env_groups"] == "2"
    assert validate("PPO", SIM, env_groups="2", normalize='{"norm_obs": false}').hyperparameters


@pytest.mark.parametrize("key", sorted(k for k, spec in ALGORITHMS.items() if not spec.env_groups))
def test_every_other_algorithm_refuses_groups_listing_those_that_take_them(key: str) -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        validate(ALGORITHMS[key].name, SIM, env_groups="2")
    assert info.value.field == "hyperparameters.env_groups"
    assert "supported by PPO, A2C, TRPO, MaskablePPO only" in str(info.value)
    env_id = "CartPole-v1" if gym.spaces.Discrete in ALGORITHMS[key].action_spaces else "Pendulum-v1"
    assert validate(ALGORITHMS[key].name, env_id, env_groups="1").hyperparameters["env_groups"] == "1"


@pytest.mark.parametrize(("env_id", "sims", "extra", "error", "words"), [
    ("CartPole-v1", None, {"n_envs": "2"}, InvalidHyperparameter, "runs in the worker's own process"),
    (SIM, FakeSimulations(num_envs=3), {}, InvalidHyperparameter, "n_envs = 3 does not split evenly into 2"),
    (SIM, None, {"normalize": "true"}, InvalidHyperparameter, "observation normalisation needs them all"),
    (SIM, FakeSimulations(env_subsets=False), {}, EnvironmentLacksFeature, "(environment protocol version 1)"),
])
def test_groups_that_cannot_work_are_refused(env_id: str, sims: FakeSimulations | None, extra: dict[str, str],
                                             error: type[Exception], words: str) -> None:
    with pytest.raises(error) as info:
        validate("PPO", env_id, sims, env_groups="2", **extra)
    assert getattr(info.value, "field", None) == "hyperparameters.env_groups"
    assert words in str(info.value)


def test_three_groups_are_out_of_range() -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        validate("PPO", SIM, env_groups="3")
    assert info.value.field == "hyperparameters.env_groups"


def run_with(tmp: Path, sims: FakeSimulations, algorithm: str = "ppo") -> Sink:
    job, store = make_job(tmp, algorithm=algorithm, env_id=SIM, total_timesteps=256,
                          raw={**GROUPED, "n_envs": str(sims.num_envs)})
    events = Sink()
    run_worker(RunJob.from_dict(json.loads(json.dumps(job.to_dict()))), WorkerServices(store, sims), events, Stop())
    return events


def test_a_run_trains_with_two_groups_in_flight(tmp_path: Path) -> None:
    sims = FakeSimulations()
    events = run_with(tmp_path, sims)
    finished = events.of(Finished)
    assert finished and finished[0].timesteps >= 256, events.of(Failed)
    adapter = sims.adapters[0]
    # Every step sent was a group's (2 envs), none a lockstep one: 256 timesteps / 2 envs per step.
    assert adapter.steps == 256 // 2 and adapter.closed
    assert finished[0].metrics.episodes_completed > 0, "VecMonitor saw the assembled vector steps"


def test_a_simulation_that_lost_subsets_since_start_training_fails_the_run(tmp_path: Path) -> None:
    events = run_with(tmp_path, FakeSimulations(env_subsets=False))
    failed = events.of(Failed)
    assert failed and "EnvironmentLacksFeature: hyperparameters['env_groups']" in failed[0].error
    assert "cannot step a subset of its envs" in failed[0].error
