"""benchmarks/simulation_speed.py: its report (ratios, goals, break-even, missing env groups) from fixed figures, and
one real harness run through a reference env-server (one rollout)."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from benchmarks import simulation_speed as sim
from rl_service.envserver.reference_server import serve_gym
from rl_service.infra.external_env.connector import GrpcExternalEnvironments

LOCKSTEP_GOAL = ("C = 0: remote lockstep over TCP (best variant) >= 0.8x in-process DummyVecEnv (the faster of dummy "
                 "and dummy_pinned)")


def groups_goal(cost: int) -> str:
    return (f"C = {cost} us: two groups (best variant) >= 1.0x DummyVecEnv (the faster of dummy and dummy_pinned) "
            "and >= SubprocVecEnv")


def figures(steps_per_s: float, collection_steps_per_s: float = 1000.0) -> dict[str, float]:
    return {"steps": 1000, "total_s": 1000 / steps_per_s, "collection_s": 1000 / collection_steps_per_s,
            "train_s": 1000 / steps_per_s - 1000 / collection_steps_per_s, "steps_per_s": steps_per_s,
            "collection_steps_per_s": collection_steps_per_s}


def results(rates: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, list[dict[str, float] | None]]]:
    """Two repeats per variant and cost; None rates stand for a variant that could not run."""
    return {cost: {variant: [None if (r := row.get(variant)) is None else figures(r * k) for k in (0.9, 1.1)]
                   for variant in sim.VARIANTS}
            for cost, row in rates.items()}


def test_report_ratios_goals_and_break_even() -> None:
    rates = {"0": {"dummy": 1000, "subproc": 700, "lockstep_tcp": 850, "lockstep_unix": 800, "groups_tcp": 600,
                   "groups_unix": 600, "lockstep_tcp_2p": 800, "groups_tcp_2p": 550, "groups_unix_2p": 560},
             "100": {"dummy": 500, "subproc": 480, "lockstep_tcp": 400, "lockstep_unix": 410, "groups_tcp": 550,
                     "groups_unix": 450, "lockstep_tcp_2p": 420, "groups_tcp_2p": 500, "groups_unix_2p": 520},
             "400": {"dummy": 200, "subproc": 260, "lockstep_tcp": 180, "lockstep_unix": 190, "groups_tcp": 240,
                     "groups_unix": 250, "lockstep_tcp_2p": 200, "groups_tcp_2p": 230, "groups_unix_2p": 246}}
    section = sim.report(results(rates), {"cost_us": 0, "steps_per_s": 800.0, "harness_steps_per_s": 850.0},
                         1000, 2, quick=False)
    summary = {row["goal"]: row for row in section.data["summary"]}
    lockstep = summary[LOCKSTEP_GOAL]
    assert lockstep["measured"] == "lockstep_tcp: 0.85x of dummy" and lockstep["met"] is True
    at_100 = summary[groups_goal(100)]
    assert at_100["measured"] == "groups_tcp: 1.10x of dummy, 1.15x of subproc" and at_100["met"] is True
    assert at_100["variant"] == "groups_tcp"
    at_400 = summary[groups_goal(400)]
    assert at_400["variant"] == "groups_unix" and at_400["met"] is False, "1.25x of dummy but below subproc"
    assert at_400["measured"] == "groups_unix: 1.25x of dummy, 0.96x of subproc"
    assert len(section.data["summary"]) == 3, "one goal line per cost >= 100, for the best two-groups variant"
    notes = "\n".join(section.notes)
    # groups_tcp: 0.6x at 0 us, 1.1x at 100 us: 1.0x reached at 0 + 0.4 / 0.5 * 100 = 80 us
    assert "groups_tcp: about C = 80 us per env step" in notes
    assert "lockstep_tcp: not reached up to C = 400 us (0.90x there)" in notes
    assert "subproc: about C = 135 us" in notes  # 0.96x at 100 us, 1.3x at 400 us
    assert "lockstep_tcp_2p: about C = 400 us" in notes  # 0.84x at 100 us, 1.0x at 400 us
    steps_table = section.tables[0]
    assert steps_table.header == ["variant", "C = 0 us", "C = 100 us", "C = 400 us"]
    assert steps_table.rows[0] == ["dummy", "1,000 (1.00x)", "500 (1.00x)", "200 (1.00x)"]
    assert steps_table.rows[8] == ["groups_unix_2p", "560 (0.56x)", "520 (1.04x)", "246 (1.23x)"]
    assert steps_table.rows[12] == ["groups_unix_pinned", *[sim.NO_PINNING] * 3], "no pinned figures given"
    assert steps_table.rows[-1] == ["groups_unix_node_pinned", *[sim.NO_NODE] * 3]
    assert section.tables[-1].rows[-1] == ["service / harness", "0.94x"]
    assert section.tables[-1].rows[1][0] == "harness, lockstep_tcp (median)"


def test_the_best_two_groups_variant_may_be_one_over_two_processes() -> None:
    rates = {"100": {"dummy": 500, "subproc": 600, "lockstep_tcp": 400, "lockstep_unix": 410, "groups_tcp": 450,
                     "groups_unix": 460, "lockstep_tcp_2p": 500, "groups_tcp_2p": 640, "groups_unix_2p": 620}}
    row = sim.report(results(rates), {}, 1000, 1, quick=False).data["summary"][0]
    assert row["variant"] == "groups_tcp_2p" and row["met"] is True
    assert row["measured"] == "groups_tcp_2p: 1.28x of dummy, 1.07x of subproc"


def test_variant_names_say_mode_transport_processes_and_pinning() -> None:
    assert sim.variant_parts("groups_unix_2p") == ("groups", "unix", 2, False, "python")
    assert sim.variant_parts("lockstep_tcp") == ("lockstep", "tcp", 1, False, "python")
    assert sim.variant_parts("groups_unix_pinned") == ("groups", "unix", 1, True, "python")
    assert sim.variant_parts("dummy_pinned") == ("dummy", "", 1, True, "python")
    assert sim.variant_parts("subproc") == ("subproc", "", 1, False, "python")
    assert sim.variant_parts("groups_unix_node_pinned") == ("groups", "unix", 1, True, "node")
    assert sim.GROUPS_VARIANTS == ("groups_tcp", "groups_unix", "groups_tcp_2p", "groups_unix_2p",
                                   "groups_tcp_pinned", "groups_unix_pinned")


def test_goals_take_the_best_pinned_or_unpinned_variant_against_the_faster_in_process_run() -> None:
    rates = {"0": {"dummy": 1000, "dummy_pinned": 1050, "subproc": 700, "lockstep_tcp": 700,
                   "lockstep_tcp_pinned": 860},
             "100": {"dummy": 500, "dummy_pinned": 480, "subproc": 450, "groups_tcp": 450, "groups_unix_pinned": 510,
                     "groups_tcp_pinned": 505}}
    summary = {row["goal"]: row for row in sim.report(results(rates), {}, 1000, 1, quick=False).data["summary"]}
    lockstep = summary[LOCKSTEP_GOAL]
    assert lockstep["variant"] == "lockstep_tcp_pinned" and lockstep["met"] is True
    assert lockstep["measured"] == "lockstep_tcp_pinned: 0.82x of dummy_pinned", "divided by the faster baseline"
    at_100 = summary[groups_goal(100)]
    assert at_100["measured"] == "groups_unix_pinned: 1.02x of dummy, 1.13x of subproc" and at_100["met"] is True


def test_report_without_env_groups_says_so_and_assesses_nothing_for_them() -> None:
    rates = {"0": {"dummy": 1000, "subproc": 700, "lockstep_tcp": 700, "lockstep_unix": 700},
             "100": {"dummy": 500, "subproc": 480, "lockstep_tcp": 400, "lockstep_unix": 410}}
    section = sim.report(results(rates), {}, 1000, 2, quick=False)
    rows = {row["goal"]: row for row in section.data["summary"]}
    assert rows[LOCKSTEP_GOAL]["met"] is False
    row = rows[groups_goal(100)]
    assert row == {"goal": row["goal"], "measured": sim.NOT_AVAILABLE, "met": None}
    assert section.tables[0].rows[4] == ["groups_tcp", sim.NOT_AVAILABLE, sim.NOT_AVAILABLE]
    assert "Break-even, groups_unix: n/a (env_groups not available)." in section.notes
    assert all(row["met"] is None for row in sim.report(results(rates), {}, 1000, 1, quick=True).data["summary"])


@pytest.mark.timeout(120)
def test_the_harness_trains_through_a_simulation_and_times_collection_apart() -> None:
    handle = serve_gym("CartPole-v1", sim.N_ENVS)
    try:
        model = sim.build_model(handle.address, GrpcExternalEnvironments())
        assert model.n_steps == 32 and model.batch_size == 256 and model.n_epochs == 20 and model.gamma == 0.98
        figures = sim.train_once(model, 256)
    finally:
        handle.stop()
    assert figures["steps"] == 256 and handle.servicer.steps_served == 32, "one message per vector step"
    assert 0 < figures["collection_s"] < figures["total_s"]
    assert np.isclose(figures["collection_s"] + figures["train_s"], figures["total_s"])


def test_lockstep_ceiling_adds_one_echo_per_vector_step() -> None:
    # DummyVecEnv at 4,000 steps/s with 8 envs: 2 ms per vector step; one 500 us echo more: 2 / 2.5 = 0.8
    assert sim.lockstep_ceiling(4000.0, 500.0) == pytest.approx(0.8)
    assert sim.lockstep_ceiling(4000.0, 0.0) == pytest.approx(1.0)


def test_report_names_the_ceiling_of_each_layout_beside_the_lockstep_goal() -> None:
    rates = {"0": dict.fromkeys(sim.VARIANTS, 1000.0) | {"lockstep_tcp": 700.0, "lockstep_tcp_pinned": 750.0,
                                                          "dummy_pinned": 500.0}}
    section = sim.report(results(rates), {}, 1000, 2, quick=False, echo_us={"unpinned": 2000.0, "pinned": 4000.0})
    # dummy's median is 1,000 steps/s (the repeats at 0.9x and 1.1x): 8 ms per vector step, 10 ms with the echo;
    # dummy_pinned's 500 steps/s: 16 ms, 20 ms with its echo
    assert section.data["lockstep_ceiling"] == {"unpinned": {"0": pytest.approx(0.8)},
                                                "pinned": {"0": pytest.approx(0.8)}}
    lockstep = section.data["summary"][0]
    assert lockstep["measured"] == "lockstep_tcp_pinned: 0.75x of dummy (ceiling over a bare stream echo 0.80x)"
    assert lockstep["met"] is False
    table = next(t for t in section.tables if t.title.startswith("Lockstep against its ceiling"))
    assert table.rows == [["ceiling, unpinned (echo 2000 us; ratio to dummy)", "0.80x"],
                          ["lockstep_tcp (ratio to dummy)", "0.70x"],
                          ["ceiling, pinned (echo 4000 us; ratio to dummy_pinned)", "0.80x"],
                          ["lockstep_tcp_pinned (ratio to dummy_pinned)", "1.50x"]]
    without_echo = sim.report(results(rates), {}, 1000, 2, quick=False)
    assert not any(t.title.startswith("Lockstep against") for t in without_echo.tables)


@pytest.mark.skipif(sim.pin_layout() is None, reason="needs two CPUs to pin to")
def test_pinned_runs_keep_every_thread_on_the_trainer_cpu_and_give_the_cpus_back() -> None:
    layout = sim.pin_layout()
    assert layout is not None and layout.trainer != layout.simulation
    before = os.sched_getaffinity(0)
    waiting = threading.Event()
    older = threading.Thread(target=waiting.wait)  # started before the block, as gRPC's threads are
    older.start()
    try:
        with sim.pinned_to(layout.trainer):
            seen: list[set[int]] = []
            newer = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
            newer.start()
            newer.join()
            assert os.sched_getaffinity(0) == layout.trainer and seen == [layout.trainer]
            assert os.sched_getaffinity(older.native_id) == layout.trainer  # type: ignore[arg-type]
        assert os.sched_getaffinity(0) == before
        assert os.sched_getaffinity(older.native_id) == before  # type: ignore[arg-type]
    finally:
        waiting.set()
        older.join()


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sim.node_available() or sim.pin_layout() is None,
                    reason="needs node, examples/node-simulation/node_modules and two CPUs")
def test_the_node_variants_train_through_the_node_simulation_on_its_own_cpu(tmp_path: Path) -> None:
    from rl_service.infra.external_env.address import SocketDirectory

    layout = sim.pin_layout()
    assert layout is not None
    with sim.node_env_server(25.0, tmp_path, layout.simulation) as unix:
        runner = sim.Runner(25.0, 256, {("unix", 1, True, "node"): unix},
                            GrpcExternalEnvironments(socket_dir=SocketDirectory(tmp_path)), layout)
        figures = runner.run("groups_unix_node_pinned")
        assert runner.run("lockstep_tcp_node_pinned") is None, "no TCP Node.js simulation was started"
    assert figures is not None and figures["steps"] == 256 and figures["collection_s"] > 0
