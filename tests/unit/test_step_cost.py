"""StepCost: busy work per step that leaves the wrapped env's results untouched."""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
import pytest

from rl_service.envserver.cli import main as env_server_main
from rl_service.envserver.step_cost import StepCost, make_costly


def test_results_are_the_wrapped_envs_and_each_step_spends_at_least_the_cost() -> None:
    plain, costly = gym.make("CartPole-v1"), make_costly("CartPole-v1", 2000.0)
    assert isinstance(costly, StepCost)
    np.testing.assert_array_equal(plain.reset(seed=3)[0], costly.reset(seed=3)[0])
    for _ in range(5):
        started = time.perf_counter()
        expected, got = plain.step(1), costly.step(1)
        assert time.perf_counter() - started >= 0.002  # a lower bound: busy waiting cannot finish early
        np.testing.assert_array_equal(expected[0], got[0])
        assert expected[1:4] == got[1:4]


def test_no_cost_means_no_wrapper() -> None:
    assert not isinstance(make_costly("CartPole-v1", 0.0), StepCost)


@pytest.mark.parametrize("cost", [-1.0, 2e6, float("nan")])
def test_bad_costs_are_refused(cost: float) -> None:
    with pytest.raises(ValueError, match="step cost"):
        StepCost(gym.make("CartPole-v1"), cost)


def test_the_env_server_flag_is_range_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        env_server_main(["--env", "CartPole-v1", "--step-cost-us", "-5"])
    assert info.value.code == 2
    assert "--step-cost-us must be in 0..1e+06" in capsys.readouterr().err
