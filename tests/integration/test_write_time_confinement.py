"""A real server: a directory under MODELS_DIR swapped for a symlink after StartTraining accepted the run does not
let the worker write the final model outside MODELS_DIR; the run fails and says why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import FAST_PPO, ServerHandle


def test_a_directory_swapped_for_a_link_after_acceptance_fails_the_run(
        server_factory: Callable[..., ServerHandle], tmp_path: Path) -> None:
    server = server_factory(tmp_path / "server", max_concurrent_runs=1)
    outside = tmp_path / "outside"
    outside.mkdir()
    # The first run holds the only slot, so the second stays PENDING while its directory is swapped: no race.
    blocker = server.start(total_timesteps=10_000_000, hyperparameters=FAST_PPO)
    victim = server.start(total_timesteps=256, hyperparameters=FAST_PPO, model_output_path="team/model.zip")
    assert server.status(victim).state == pb.PENDING
    server.settings.models_root.mkdir(parents=True, exist_ok=True)
    (server.settings.models_root / "team").symlink_to(outside, target_is_directory=True)
    server.stub.StopTraining(pb.RunRequest(run_id=blocker), timeout=30)
    final = server.wait_until(victim, lambda s: s.is_done, timeout=120)
    assert final.state == pb.FAILED
    assert "PathEscapesRoot" in final.error and "symlink" in final.error
    assert list(outside.iterdir()) == []
    # The run's own directories were real and inside the roots: its checkpoint and history are there.
    assert (server.settings.models_root / victim / "history.json").is_file()
