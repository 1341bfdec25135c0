"""POLICY_SYNC over real gRPC: durable_version in replies, sync batches, and the guarantee after a kill -9.

The guarantee: after the server is killed (SIGKILL, no flush), every policy comes back at a version no older than
the newest durable_version the server replied for it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from rl_service_proto.v1 import policy_pb2 as pb
from rl_service_proto.v1 import policy_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle

ROOT = Path(__file__).resolve().parents[2]
SPEC = pb.PolicySpec(observation_shape=[4], discrete_n=2, seed=0)


def episode_batch(policy_id: str, seed: int, done: bool = True, **options: Any) -> pb.TrainingBatch:
    rng = np.random.default_rng(seed)
    return pb.TrainingBatch(policy_id=policy_id, states=rng.uniform(-1, 1, 16).astype(np.float32).tolist(),
                            actions=rng.integers(0, 2, 4).astype(float).tolist(), rewards=[1.0] * 4,
                            dones=[False, False, False, done], **options)


def stub_of(handle: ServerHandle) -> pb_grpc.PolicyServiceStub:
    return pb_grpc.PolicyServiceStub(handle.channel)


def test_always_mode_replies_are_durable_at_once(server_factory) -> None:  # type: ignore[no-untyped-def]
    stub = stub_of(server_factory(policy_sync="always"))
    created = stub.CreatePolicy(pb.CreatePolicyRequest(policy_id="always", spec=SPEC))
    assert created.version == created.durable_version == 0
    for seed in range(3):
        reply = stub.SendTrainingBatch(episode_batch("always", seed, sync=seed == 1))
        assert reply.version == reply.durable_version == seed + 1
    held = stub.SendTrainingBatch(episode_batch("always", 5, done=False))
    assert not held.updated and held.durable_version == 3
    assert stub.GetPolicy(pb.PolicyRequest(policy_id="always")).durable_version == 3
    assert stub.GetModel(pb.GetModelRequest(policy_id="always")).durable_version == 3
    watch = stub.WatchModelUpdates(pb.WatchModelRequest(policy_id="always", from_version=0), timeout=10)
    assert next(watch).durable_version == 3
    watch.cancel()


def test_background_replies_lag_until_a_sync_batch(server_factory) -> None:  # type: ignore[no-untyped-def]
    stub = stub_of(server_factory(policy_sync="background", policy_sync_interval_seconds=3600))
    assert stub.CreatePolicy(pb.CreatePolicyRequest(policy_id="bg", spec=SPEC)).durable_version == 0
    replies = [stub.SendTrainingBatch(episode_batch("bg", seed)) for seed in range(3)]
    assert [(r.version, r.durable_version) for r in replies] == [(1, 0), (2, 0), (3, 0)]
    info = stub.GetPolicy(pb.PolicyRequest(policy_id="bg"))
    assert info.version == 3 and info.durable_version == 0
    synced = stub.SendTrainingBatch(episode_batch("bg", 3, sync=True), timeout=30)
    assert synced.version == synced.durable_version == 4
    # A streamed batch takes `sync` from its first chunk, like its other options.
    chunks = [episode_batch("bg", 4, done=False, sync=True), episode_batch("", 5)]
    streamed = stub.SendTrainingBatchStream(iter(chunks), timeout=30)
    assert streamed.version == streamed.durable_version == 5
    assert stub.ListPolicies(pb.ListPoliciesRequest()).policies[0].durable_version == 5
    assert stub.GetModel(pb.GetModelRequest(policy_id="bg", format=pb.SAFETENSORS)).durable_version == 5


def test_background_saves_catch_up_within_the_interval(server_factory) -> None:  # type: ignore[no-untyped-def]
    stub = stub_of(server_factory(policy_sync="background", policy_sync_interval_seconds=0.2))
    stub.CreatePolicy(pb.CreatePolicyRequest(policy_id="tick", spec=SPEC))
    for seed in range(5):
        last = stub.SendTrainingBatch(episode_batch("tick", seed))
    started = time.monotonic()
    while stub.GetPolicy(pb.PolicyRequest(policy_id="tick")).durable_version != last.version:
        assert time.monotonic() - started < 5, "the writer did not catch up"
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------- kill -9


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GRPC_", "LOG_", "MAX_", "MODELS_", "GYM_", "POLICY", "DATA_DIR"))}
    env.update({"DATA_DIR": str(data_dir), "GRPC_HOST": "127.0.0.1", "GRPC_PORT": "0", "HTTP_PORT": "0",
                "LOG_FORMAT": "json"})
    env.update(extra)
    return env


def _start(workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--env-file", os.devnull], cwd=workdir,
                               env=env, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        if '"server started"' in line:
            return process, int(json.loads(line)["address"].rsplit(":", 1)[1])
    process.kill()
    raise AssertionError("server did not log 'server started'")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Server processes the test starts; any still running at the end is killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_after_sigkill_a_policy_is_no_older_than_its_last_durable_version(
        tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    env = _env(tmp_path / "data", POLICY_SYNC="background", POLICY_SYNC_INTERVAL_SECONDS="0.3")
    process, port = _start(tmp_path, env)
    processes.append(process)
    durable = {"steady": 0, "synced": 0}
    sent = {"steady": 0, "synced": 0}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.PolicyServiceStub(channel)
        for policy_id in durable:
            stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=policy_id, spec=SPEC), timeout=30)
        # "steady": batches spread over several writer ticks, so durable_version moves on between replies.
        for seed in range(25):
            reply = stub.SendTrainingBatch(episode_batch("steady", seed), timeout=30)
            sent["steady"], durable["steady"] = reply.version, max(durable["steady"], reply.durable_version)
            time.sleep(0.05)
        durable["steady"] = max(durable["steady"],
                                stub.GetPolicy(pb.PolicyRequest(policy_id="steady"), timeout=30).durable_version)
        # "synced": one sync batch, then a burst the writer cannot have saved yet when the kill comes.
        for seed in range(3):
            stub.SendTrainingBatch(episode_batch("synced", seed), timeout=30)
        reply = stub.SendTrainingBatch(episode_batch("synced", 3, sync=True), timeout=30)
        assert reply.durable_version == reply.version == 4
        durable["synced"] = reply.durable_version
        for seed in range(4, 9):
            reply = stub.SendTrainingBatch(episode_batch("synced", seed), timeout=30)
            sent["synced"], durable["synced"] = reply.version, max(durable["synced"], reply.durable_version)
    assert durable["steady"] > 0, "the background writer saved at least once while the batches came"
    assert sent["synced"] > durable["synced"], "the kill comes while the last batches are still only in memory"
    process.send_signal(signal.SIGKILL)
    process.wait(30)

    process, port = _start(tmp_path, env)
    processes.append(process)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.PolicyServiceStub(channel)
        for policy_id in durable:
            info = stub.GetPolicy(pb.PolicyRequest(policy_id=policy_id), timeout=30)
            assert durable[policy_id] <= info.version <= sent[policy_id], (policy_id, durable, sent, info.version)
            assert info.durable_version == info.version, "what was loaded is on disk"
            # The restored policy trains on from where it came back.
            assert stub.SendTrainingBatch(episode_batch(policy_id, 99), timeout=30).version == info.version + 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
