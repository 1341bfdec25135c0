"""ProcessBatch against EnvBatch, without gRPC: the same arrays for Box actions and Discrete observations (what the
raw-bytes messages carry), and the clear errors of a worker that cannot start or dies."""

from __future__ import annotations

import multiprocessing.connection
import os
import signal

import gymnasium as gym
import numpy as np
import pytest

from rl_service.envserver.process_batch import ProcessBatch, WorkerGone
from rl_service.infra.external_env.env_batch import BatchStep, EnvBatch, ResetNeeded


def assert_same_step(expected: BatchStep, got: BatchStep) -> None:
    for name in ("observations", "rewards", "terminated", "truncated", "final_observations"):
        want, have = getattr(expected, name), getattr(got, name)
        assert have.dtype == want.dtype and have.shape == want.shape, name
        np.testing.assert_array_equal(have, want, err_msg=name)
    assert (expected.action_masks is None) == (got.action_masks is None)


@pytest.mark.parametrize(("env_id", "num_envs", "steps"), [("Pendulum-v1", 3, 320), ("FrozenLake-v1", 4, 60)])
def test_the_same_arrays_as_one_env_batch(env_id: str, num_envs: int, steps: int) -> None:
    one = EnvBatch.from_gym_id(env_id, num_envs)
    several = ProcessBatch(env_id, num_envs, 2)
    try:
        assert several.spec == one.spec and several.processes == 2
        np.testing.assert_array_equal(several.reset(seed=9), one.reset(seed=9))
        space = one.action_space
        space.seed(4)
        rng = np.random.default_rng(1)
        ended = 0
        for step in range(steps):
            env_ids = None if step % 3 == 0 else [int(i) for i in rng.permutation(num_envs)[:2]]
            actions = np.stack([np.asarray(space.sample()) for _ in range(num_envs if env_ids is None else 2)])
            if isinstance(space, gym.spaces.Discrete):
                actions = actions.astype(np.int64)
            expected = one.step(actions, env_ids)
            assert_same_step(expected, several.step(actions, env_ids))
            ended += len(expected.final_observations)
        assert ended > 0, "final observations were compared"
    finally:
        several.close()
        one.close()


def test_step_before_reset_is_refused_with_env_batchs_words() -> None:
    several = ProcessBatch("CartPole-v1", 2, 2)
    try:
        with pytest.raises(ResetNeeded) as refused:
            several.step(np.zeros(2, dtype=np.int64))
        with pytest.raises(ResetNeeded) as expected:
            EnvBatch.from_gym_id("CartPole-v1", 2).step(np.zeros(2, dtype=np.int64))
        assert str(refused.value) == str(expected.value)
    finally:
        several.close()


def test_a_worker_that_cannot_build_its_envs_fails_the_start_clearly() -> None:
    with pytest.raises(RuntimeError, match=r"env worker 0 \(envs 0\.\.1, pid \d+\) cannot create its envs: "
                                           r"ModuleNotFoundError: No module named 'no_such_module_xyz'"):
        ProcessBatch("CartPole-v1", 3, 2, modules=("no_such_module_xyz",))


def test_bad_process_counts_are_refused() -> None:
    for processes in (0, 3):
        with pytest.raises(ValueError, match=r"processes must be in 1\.\.2 "):
            ProcessBatch("CartPole-v1", 2, processes)


def test_a_dead_worker_fails_every_later_request_clearly() -> None:
    several = ProcessBatch("CartPole-v1", 4, 2)
    try:
        several.reset(seed=1)
        victim = several._processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        multiprocessing.connection.wait([victim.sentinel], 30)  # ended (its receiver thread reaps it)
        with pytest.raises(WorkerGone, match=r"env worker 1 \(envs 2\.\.3, pid \d+\) ended \(exit code -9\); "
                                             "restart the env-server"):
            several.step(np.zeros(4, dtype=np.int64))
        with pytest.raises(WorkerGone):
            several.step(np.zeros(1, dtype=np.int64), [0])  # a live worker's env: the batch is broken as a whole
    finally:
        several.close()
