"""Resuming and deleting runs over real gRPC: ResumeTraining, AUTO_RESUME across a restart, DeleteRun, and the
refusals, each leaving nothing changed."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status

from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import FAST_PPO, ServerHandle, files_under


def stop_midway(server: ServerHandle, total: int = 3000) -> str:
    """A PPO run stopped after its first checkpoint (CANCELLED, with a final checkpoint and model)."""
    run_id = server.start(total_timesteps=total, hyperparameters=FAST_PPO, checkpoint_interval=500)
    server.wait_until(run_id, lambda s: s.timesteps_done >= 600)
    stopped = server.stub.StopTraining(pb.RunRequest(run_id=run_id), timeout=60)
    assert stopped.state == pb.CANCELLED and stopped.timesteps_done < total
    return run_id


def error_of(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_a_stopped_run_resumes_to_its_budget_as_attempt_two(server: ServerHandle) -> None:
    run_id = stop_midway(server)
    before = server.status(run_id)
    history_before = server.stub.GetRunHistory(pb.RunHistoryRequest(run_id=run_id)).episodes
    resumed = server.stub.ResumeTraining(pb.ResumeTrainingRequest(run_id=run_id), timeout=30)
    assert resumed.attempt == 2 and resumed.state in (pb.PENDING, pb.RUNNING) and not resumed.error
    final = server.watch_to_end(run_id)[-1]
    assert final.state == pb.SUCCEEDED and final.timesteps_done >= 3000 and final.attempt == 2
    assert [(a.attempt, a.outcome) for a in final.attempts] == [(1, "CANCELLED"), (2, "SUCCEEDED")]
    assert final.attempts[1].start_timesteps == before.timesteps_done == final.attempts[0].end_timesteps
    episodes = server.stub.GetRunHistory(pb.RunHistoryRequest(run_id=run_id)).episodes
    assert [(e.timesteps, e.time) for e in episodes[:len(history_before)]] == [
        (e.timesteps, e.time) for e in history_before]
    assert [e.timesteps for e in episodes] == sorted(e.timesteps for e in episodes)
    assert final.metrics.episodes_completed == len(episodes)
    metadata = json.loads((Path(final.model_path).parent / "metadata.json").read_text())
    assert [(a["attempt"], a["outcome"]) for a in metadata["attempts"]] == [(1, "CANCELLED"), (2, "SUCCEEDED")]

    # A SUCCEEDED run trains further only to a larger budget.
    refused = error_of(lambda: server.stub.ResumeTraining(pb.ResumeTrainingRequest(run_id=run_id), timeout=30))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    extended = server.stub.ResumeTraining(pb.ResumeTrainingRequest(run_id=run_id, total_timesteps=4000),
                                          timeout=30)
    assert extended.attempt == 3 and extended.total_timesteps == 4000
    assert server.watch_to_end(run_id)[-1].timesteps_done >= 4000


def test_bad_resumes_are_refused_naming_the_field_and_change_nothing(server: ServerHandle) -> None:
    run_id = stop_midway(server)
    before = server.status(run_id)
    roots = [server.settings.models_root, server.settings.checkpoint_root]
    files = files_under(*roots)
    for total, code in ((100, grpc.StatusCode.INVALID_ARGUMENT), (10**12, grpc.StatusCode.INVALID_ARGUMENT)):
        error = error_of(lambda t=total: server.stub.ResumeTraining(
            pb.ResumeTrainingRequest(run_id=run_id, total_timesteps=t), timeout=30))
        assert error.code() == code and error.details().startswith("total_timesteps:"), error.details()
        status = rpc_status.from_call(error)
        assert status is not None and len(status.details) == 1
    missing = error_of(lambda: server.stub.ResumeTraining(pb.ResumeTrainingRequest(run_id="run-nope"), timeout=30))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert server.status(run_id) == before and files_under(*roots) == files

    active = server.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO)
    for call in (lambda: server.stub.ResumeTraining(pb.ResumeTrainingRequest(run_id=active), timeout=30),
                 lambda: server.stub.DeleteRun(pb.DeleteRunRequest(run_id=active), timeout=30)):
        error = error_of(call)
        assert (error.code() == grpc.StatusCode.FAILED_PRECONDITION and "stop" in error.details()) or \
            "only a finished run" in error.details()
    server.stub.StopTraining(pb.RunRequest(run_id=active), timeout=60)


def test_a_run_without_a_checkpoint_cannot_resume(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle: ServerHandle = server_factory(max_concurrent_runs=1)
    blocker = handle.start(total_timesteps=5_000_000, hyperparameters=FAST_PPO)
    queued = handle.start(total_timesteps=1000, hyperparameters=FAST_PPO)
    handle.stub.StopTraining(pb.RunRequest(run_id=queued), timeout=30)  # cancelled before it trained
    error = error_of(lambda: handle.stub.ResumeTraining(pb.ResumeTrainingRequest(run_id=queued), timeout=30))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "no checkpoint" in error.details()
    handle.stub.StopTraining(pb.RunRequest(run_id=blocker), timeout=60)


def test_delete_removes_every_file_and_the_record(server: ServerHandle) -> None:
    run_id = server.start(total_timesteps=512, hyperparameters=FAST_PPO, checkpoint_interval=256,
                          model_output_path="deleted/elsewhere.zip")
    final = server.watch_to_end(run_id)[-1]
    model = Path(final.model_path)
    checkpoints = Path(final.last_checkpoint_path).parent
    assert model.is_file() and checkpoints.is_dir()
    assert server.stub.DeleteRun(pb.DeleteRunRequest(run_id=run_id), timeout=30).run_id == run_id
    assert not model.exists() and not checkpoints.exists()
    assert not (server.settings.models_root / run_id).exists()
    assert run_id not in {r.run_id for r in server.stub.ListRuns(pb.ListRunsRequest()).runs}
    for call in (lambda: server.status(run_id),
                 lambda: server.stub.DeleteRun(pb.DeleteRunRequest(run_id=run_id), timeout=30),
                 lambda: server.stub.Act(pb.ActRequest(run_id=run_id, observation=[0.0] * 4), timeout=30)):
        assert error_of(call).code() == grpc.StatusCode.NOT_FOUND


def test_a_graceful_restart_resumes_interrupted_runs_by_itself(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = server_factory(tmp_path)
    run_id = first.start(total_timesteps=3000, hyperparameters=FAST_PPO, checkpoint_interval=500)
    first.wait_until(run_id, lambda s: s.timesteps_done >= 600)
    stopper = threading.Thread(target=first.running.stop)
    stopper.start()
    stopper.join(timeout=60)
    second = server_factory(tmp_path)
    final = second.watch_to_end(run_id)[-1]
    assert final.state == pb.SUCCEEDED and final.timesteps_done >= 3000 and final.attempt == 2
    assert [a.outcome for a in final.attempts] == ["INTERRUPTED", "SUCCEEDED"]
    assert final.attempts[1].start_timesteps == final.attempts[0].end_timesteps >= 600
