"""Act, ActBatch and ExportModel over real gRPC: action masks, the model choice, recorded spaces, and the exported
TorchScript program answering as Act does (mask included)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import grpc
import gymnasium as gym
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from rl_service.core.models.space_json import spaces_from_json
from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import FAST_PPO, ServerHandle
from tests.support.envs import MASKED_ENV_ID

N = 8  # MaskedChoice's actions
INVALID = grpc.StatusCode.INVALID_ARGUMENT
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


def _field(error: grpc.RpcError) -> str:
    """The field the error's BadRequest names."""
    status = rpc_status.from_call(error)
    assert status is not None, error.details()
    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    [violation] = bad.field_violations
    return str(violation.field)


@pytest.fixture(scope="module")
def masked_run(server: ServerHandle) -> str:
    run_id = server.start(env_id=MASKED_ENV_ID, total_timesteps=256, hyperparameters=FAST_PPO)
    assert server.watch_to_end(run_id)[-1].state == pb.SUCCEEDED
    return run_id


def _observations(count: int) -> np.ndarray:
    rng = np.random.default_rng(4)
    return (rng.random((count, 2 * N)) < 0.3).astype(np.float32)


def test_the_worker_records_plain_json_spaces(server: ServerHandle, masked_run: str) -> None:
    metadata = json.loads((Path(server.settings.models_root) / masked_run / "metadata.json").read_text())
    observation, action = spaces_from_json(metadata["spaces"])
    assert observation.shape == (2 * N,) and action == gym.spaces.Discrete(N)


def test_masked_act_and_act_batch_answer_only_legal_actions(server: ServerHandle, masked_run: str) -> None:
    obs = _observations(N)
    masks = np.eye(N, dtype=bool)  # observation i: only action i is legal
    for deterministic in (True, False):
        reply = server.stub.ActBatch(pb.ActBatchRequest(run_id=masked_run, observations=obs.ravel().tolist(),
                                                        action_masks=masks.ravel().tolist(),
                                                        deterministic=deterministic))
        assert reply.count == N and list(reply.actions) == [float(i) for i in range(N)]
        one = server.stub.Act(pb.ActRequest(run_id=masked_run, observation=obs[3].tolist(),
                                            action_mask=masks[5].tolist(), deterministic=deterministic))
        assert list(one.action) == [5.0]


@pytest.mark.parametrize(("batch", "mask", "field", "words"), [
    (False, [True] * 3, "action_mask", ("3 flags", "8 actions")),
    (False, [False] * N, "action_mask", ("no legal action",)),
    (True, [True] * N, "action_masks", ("8 flags", "16 are needed for 2 observations")),
])
def test_bad_masks_are_invalid_naming_their_field(server: ServerHandle, masked_run: str, batch: bool,
                                                  mask: list[bool], field: str, words: tuple[str, ...]) -> None:
    obs = _observations(2)
    with pytest.raises(grpc.RpcError) as info:
        if batch:
            server.stub.ActBatch(pb.ActBatchRequest(run_id=masked_run, observations=obs.ravel().tolist(),
                                                    action_masks=mask))
        else:
            server.stub.Act(pb.ActRequest(run_id=masked_run, observation=obs[0].tolist(), action_mask=mask))
    assert info.value.code() == INVALID and _field(info.value) == field
    assert info.value.details().startswith(field + ":") and all(w in info.value.details() for w in words)


def test_model_choice_errors(server: ServerHandle, masked_run: str) -> None:
    obs = _observations(1)[0].tolist()
    with pytest.raises(grpc.RpcError) as best:
        server.stub.Act(pb.ActRequest(run_id=masked_run, observation=obs, model="best"))
    assert best.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert best.value.details().startswith("model:") and "eval_freq" in best.value.details()
    calls: list[Callable[[], object]] = [
        lambda: server.stub.Act(pb.ActRequest(run_id=masked_run, observation=obs, model="yesterday")),
        lambda: server.stub.ActBatch(pb.ActBatchRequest(run_id=masked_run, observations=obs, model="x" * 500)),
        lambda: server.stub.ExportModel(pb.ExportModelRequest(run_id=masked_run, format="sb3", model="top"))]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == INVALID and _field(info.value) == "model"
        assert len(info.value.details()) < 300, "a long value is quoted by a short prefix only"
    latest = server.stub.Act(pb.ActRequest(run_id=masked_run, observation=obs, model="latest"))
    assert latest.model_timesteps == server.stub.Act(pb.ActRequest(run_id=masked_run, observation=obs)).model_timesteps


def test_the_torchscript_export_answers_as_act_with_and_without_masks(server: ServerHandle, masked_run: str) -> None:
    exported = server.stub.ExportModel(pb.ExportModelRequest(run_id=masked_run, format="torchscript",
                                                             model="latest"))
    assert exported.signature.startswith("forward(obs: float32[batch, 16]) -> int64[batch]")
    assert "optional second argument action_mask: Optional[bool[batch, 8]] = None" in exported.signature
    program = torch.jit.load(io.BytesIO(exported.data))
    obs = _observations(16)
    rng = np.random.default_rng(9)
    masks = rng.random((16, N)) < 0.3
    masks[np.arange(16), rng.integers(0, N, 16)] = True
    for mask in (None, masks):
        request = pb.ActBatchRequest(run_id=masked_run, observations=obs.ravel().tolist(), deterministic=True)
        if mask is not None:
            request.action_masks.extend(mask.ravel().tolist())
        served = np.asarray(server.stub.ActBatch(request).actions)
        with torch.no_grad():
            args = (torch.as_tensor(obs),) if mask is None else (torch.as_tensor(obs), torch.as_tensor(mask))
            np.testing.assert_array_equal(program(*args).numpy().astype(float), served)
