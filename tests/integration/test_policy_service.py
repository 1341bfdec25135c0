"""PolicyService over real gRPC: lifecycle, experience batches, held tails, streams, exports, concurrency.

Every test on the module's server runs twice, once per POLICY_SYNC mode (background, the default, and always).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from safetensors.torch import load as load_safetensors

from rl_service_proto.v1 import policy_pb2 as pb
from rl_service_proto.v1 import policy_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle, start_server

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SYNC_MODES = ["background", "always"]


@pytest.fixture(scope="module", params=SYNC_MODES)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """The module's server, once per POLICY_SYNC mode: what this module checks holds in both."""
    handle = start_server(tmp_path_factory.mktemp("server"), policy_sync=request.param)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def stub(server: ServerHandle) -> pb_grpc.PolicyServiceStub:
    return pb_grpc.PolicyServiceStub(server.channel)


_counter = iter(range(10**6))


def new_id(prefix: str = "p") -> str:
    return f"{prefix}-{next(_counter)}-{time.monotonic_ns() % 10**6}"


def discrete_spec(obs: int = 4, n: int = 2, seed: int = 0, **hyper: str) -> pb.PolicySpec:
    return pb.PolicySpec(observation_shape=[obs], discrete_n=n, seed=seed, hyperparameters=hyper)


def create(stub: pb_grpc.PolicyServiceStub, spec: pb.PolicySpec | None = None, policy_id: str | None = None
           ) -> str:
    policy_id = policy_id or new_id()
    info = stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=policy_id, spec=spec or discrete_spec()))
    assert info.created and info.version == 0
    return policy_id


def episode(length: int, obs: int = 4, seed: int = 0, done: bool = True) -> dict[str, list[Any]]:
    rng = np.random.default_rng(seed)
    return {
        "states": rng.uniform(-1, 1, size=length * obs).astype(np.float32).tolist(),
        "actions": rng.integers(0, 2, size=length).astype(float).tolist(),
        "rewards": rng.uniform(0, 1, size=length).astype(np.float32).tolist(),
        "dones": [False] * (length - 1) + [done],
    }


def batch(policy_id: str, *parts: dict[str, list[Any]], **options: Any) -> pb.TrainingBatch:
    joined: dict[str, list[Any]] = {"states": [], "actions": [], "rewards": [], "dones": []}
    for part in parts:
        for key in joined:
            joined[key] += part[key]
    return pb.TrainingBatch(policy_id=policy_id, **joined, **options)


def weights(stub: pb_grpc.PolicyServiceStub, policy_id: str) -> dict[str, np.ndarray]:
    blob = stub.GetModel(pb.GetModelRequest(policy_id=policy_id, format=pb.SAFETENSORS))
    return {k: v.numpy() for k, v in load_safetensors(blob.data).items()}


# Equal data gives equal updates up to float32 rounding, not bit for bit: a batch assembled from a held tail lies
# elsewhere in memory than the same batch sent whole, and torch's vectorised reductions (and, with more than one
# intra-op thread, its work split) sum in an order that depends on alignment and threads. Seen: 1 weight in 64 off
# by 3.7e-9 (one float32 ulp at that magnitude) with one thread. A wrong join (one transition lost at the batch
# edge) moves a weight by 2e-3 (measured on this test's episode), far outside the tolerance.
WEIGHT_TOLERANCE = {"rtol": 1e-6, "atol": 1e-7}


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], err_msg=key, **WEIGHT_TOLERANCE)


def test_lifecycle_create_is_idempotent_get_list_delete(stub: pb_grpc.PolicyServiceStub, server: ServerHandle
                                                        ) -> None:
    policy_id = create(stub, discrete_spec(seed=5, beta="0.05"))
    again = stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=policy_id, spec=discrete_spec(seed=5, beta="0.05")))
    assert not again.created and again.version == 0
    unseeded = pb.PolicySpec(observation_shape=[4], discrete_n=2, hyperparameters={"beta": "0.05"})
    assert not stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=policy_id, spec=unseeded)).created
    with pytest.raises(grpc.RpcError) as info:
        stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=policy_id, spec=discrete_spec(seed=5, beta="0.2")))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and "policy_id" in info.value.details()

    got = stub.GetPolicy(pb.PolicyRequest(policy_id=policy_id))
    assert got.spec.hyperparameters["beta"] == "0.05" and got.spec.hyperparameters["learning_rate"] == "0.001"
    assert got.spec.seed == 5 and got.spec.discrete_n == 2 and list(got.spec.observation_shape) == [4]
    assert policy_id in [p.policy_id for p in stub.ListPolicies(pb.ListPoliciesRequest()).policies]
    state_dir = Path(server.settings.policies_root) / policy_id
    assert (state_dir / "state.safetensors").is_file()

    stub.DeletePolicy(pb.PolicyRequest(policy_id=policy_id))
    assert not state_dir.exists()
    for call in (lambda: stub.GetPolicy(pb.PolicyRequest(policy_id=policy_id)),
                 lambda: stub.DeletePolicy(pb.PolicyRequest(policy_id=policy_id)),
                 lambda: stub.SendTrainingBatch(batch(policy_id, episode(3)))):
        with pytest.raises(grpc.RpcError) as missing:
            call()
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND and policy_id in missing.value.details()


def test_batch_updates_once_and_holds_the_unfinished_tail(stub: pb_grpc.PolicyServiceStub) -> None:
    policy_id = create(stub)
    result = stub.SendTrainingBatch(batch(policy_id, episode(5, seed=1), episode(3, seed=2),
                                          episode(4, seed=3, done=False)))
    assert result.updated and result.version == 1 and result.pending_steps == 4
    assert result.metrics.episodes_used == 2 and result.metrics.steps_used == 8
    assert np.isfinite(result.metrics.loss) and result.metrics.entropy > 0
    info = stub.GetPolicy(pb.PolicyRequest(policy_id=policy_id))
    assert info.pending_steps == 4 and info.episodes_trained == 2 and info.steps_trained == 8

    only_tail = stub.SendTrainingBatch(batch(policy_id, episode(2, seed=4, done=False)))
    assert not only_tail.updated and only_tail.version == 1 and only_tail.pending_steps == 6


def test_returns_span_batches_exactly_as_one_batch(stub: pb_grpc.PolicyServiceStub) -> None:
    """An episode split over two batches trains exactly like the same episode sent whole."""
    whole, split = create(stub, discrete_spec(seed=11)), create(stub, discrete_spec(seed=11))
    full = episode(9, seed=7)
    first = {k: v[: 4 * 5] if k == "states" else v[:5] for k, v in full.items()}
    rest = {k: v[4 * 5:] if k == "states" else v[5:] for k, v in full.items()}
    assert not any(first["dones"])

    one = stub.SendTrainingBatch(batch(whole, full))
    held = stub.SendTrainingBatch(batch(split, first))
    two = stub.SendTrainingBatch(batch(split, rest))
    assert not held.updated and held.pending_steps == 5
    assert one.version == two.version == 1 and two.pending_steps == 0
    assert two.metrics.loss == pytest.approx(one.metrics.loss, rel=1e-6)
    assert two.metrics.mean_episode_return == pytest.approx(sum(full["rewards"]), rel=1e-6)
    assert_same_weights(weights(stub, whole), weights(stub, split))


def test_chunked_stream_equals_one_message(stub: pb_grpc.PolicyServiceStub) -> None:
    unary, streamed = create(stub, discrete_spec(seed=3)), create(stub, discrete_spec(seed=3))
    parts = [episode(6, seed=s) for s in range(5)]
    stub.SendTrainingBatch(batch(unary, *parts))

    def chunks() -> Iterator[pb.TrainingBatch]:
        yield batch(streamed, parts[0], return_model=True)
        for part in parts[1:]:
            yield batch("", part)  # later chunks may omit policy_id

    result = stub.SendTrainingBatchStream(chunks())
    assert result.version == 1 and result.metrics.episodes_used == 5 and result.torchscript
    assert_same_weights(weights(stub, unary), weights(stub, streamed))


def test_assembled_batch_over_the_cap_is_resource_exhausted(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle: ServerHandle = server_factory(max_batch_bytes=4096)
    stub = pb_grpc.PolicyServiceStub(handle.channel)
    policy_id = create(stub)
    big = [episode(40, seed=s) for s in range(5)]  # 200 transitions x 7 values x 4 bytes > 4096
    with pytest.raises(grpc.RpcError) as info:
        stub.SendTrainingBatchStream(iter([batch(policy_id, part) for part in big]))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "MAX_BATCH_BYTES" in info.value.details()
    assert stub.GetPolicy(pb.PolicyRequest(policy_id=policy_id)).version == 0


def test_torchscript_export_loads_without_rl_service(stub: pb_grpc.PolicyServiceStub, tmp_path: Path) -> None:
    policy_id = create(stub, discrete_spec(obs=3, n=4, seed=2))
    stub.SendTrainingBatch(batch(policy_id, {**episode(6, obs=3, seed=1), "actions": [0, 1, 2, 3, 2, 1]}))
    blob = stub.GetModel(pb.GetModelRequest(policy_id=policy_id))
    assert blob.format == pb.TORCHSCRIPT and blob.version == 1
    (tmp_path / "policy.pt").write_bytes(blob.data)
    states = np.random.default_rng(0).uniform(-1, 1, size=(5, 3)).astype(np.float32)
    np.save(tmp_path / "states.npy", states)
    script = textwrap.dedent("""
        import sys, numpy as np, torch
        model = torch.jit.load(sys.argv[1])
        probs = model(torch.from_numpy(np.load(sys.argv[2]))).detach().numpy()
        assert not any(name.startswith("rl_service") for name in sys.modules), "rl_service was imported"
        np.save(sys.argv[3], probs)
    """)
    # -I: isolated mode, no current directory on sys.path, so the project checkout cannot be imported either.
    subprocess.run([sys.executable, "-I", "-c", script, str(tmp_path / "policy.pt"), str(tmp_path / "states.npy"),
                    str(tmp_path / "probs.npy")], check=True, cwd=tmp_path, timeout=120)
    probs = np.load(tmp_path / "probs.npy")
    assert probs.shape == (5, 4) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # The same probabilities as the service computes.
    for action in range(4):
        reply = stub.ComputeLogProb(pb.LogProbRequest(policy_id=policy_id, states=states.ravel().tolist(),
                                                      actions=[float(action)] * 5))
        assert reply.version == 1
        np.testing.assert_allclose(np.exp(reply.log_probs), probs[:, action], rtol=1e-5)


def test_watch_model_updates_two_subscribers_and_a_slow_one_skips(stub: pb_grpc.PolicyServiceStub) -> None:
    policy_id = create(stub)
    fast = stub.WatchModelUpdates(pb.WatchModelRequest(policy_id=policy_id, from_version=0, include_model=True),
                                  timeout=60)
    slow = stub.WatchModelUpdates(pb.WatchModelRequest(policy_id=policy_id, from_version=0), timeout=60)
    seen_fast: list[int] = []

    def read_fast() -> None:
        for update in fast:
            seen_fast.append(update.version)
            assert update.torchscript
            if update.version == 5:
                return

    reader = threading.Thread(target=read_fast)
    reader.start()
    time.sleep(0.3)  # both streams are open before training starts
    started = time.monotonic()
    for i in range(5):
        assert stub.SendTrainingBatch(batch(policy_id, episode(4, seed=i))).version == i + 1
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    reader.join(timeout=30)
    assert seen_fast[-1] == 5 and seen_fast == sorted(set(seen_fast))
    # The slow subscriber read nothing while training ran, and training did not wait for it. What it reads
    # now is increasing and ends at the newest version (whatever was not already in flight is skipped).
    seen_slow = []
    for update in slow:
        assert not update.torchscript and update.metrics.episodes_used == 1
        seen_slow.append(update.version)
        if update.version == 5:
            break
    assert seen_slow == sorted(set(seen_slow)) and seen_slow[-1] == 5
    slow.cancel()
    fast.cancel()
    assert elapsed < 30


def test_watch_from_a_newer_version_waits_for_the_next(stub: pb_grpc.PolicyServiceStub) -> None:
    policy_id = create(stub)
    stub.SendTrainingBatch(batch(policy_id, episode(3)))
    stream = stub.WatchModelUpdates(pb.WatchModelRequest(policy_id=policy_id, from_version=1), timeout=30)
    threading.Timer(0.5, lambda: stub.SendTrainingBatch(batch(policy_id, episode(3, seed=1)))).start()
    assert next(stream).version == 2
    stream.cancel()


def test_concurrent_senders_are_serialised_and_lose_nothing(stub: pb_grpc.PolicyServiceStub) -> None:
    policy_id = create(stub)
    versions: list[int] = []
    lock = threading.Lock()

    def sender(seed: int) -> None:
        for i in range(10):
            result = stub.SendTrainingBatch(batch(policy_id, episode(5, seed=seed * 100 + i)))
            with lock:
                versions.append(result.version)

    threads = [threading.Thread(target=sender, args=(s,)) for s in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(versions) == list(range(1, 31))
    info = stub.GetPolicy(pb.PolicyRequest(policy_id=policy_id))
    assert info.version == 30 and info.episodes_trained == 30


def test_expected_version_mismatch_is_aborted(stub: pb_grpc.PolicyServiceStub) -> None:
    policy_id = create(stub)
    assert stub.SendTrainingBatch(batch(policy_id, episode(3), expected_version=0)).version == 1
    with pytest.raises(grpc.RpcError) as info:
        stub.SendTrainingBatch(batch(policy_id, episode(3), expected_version=0))
    assert info.value.code() == grpc.StatusCode.ABORTED and "expected_version" in info.value.details()
    assert stub.GetPolicy(pb.PolicyRequest(policy_id=policy_id)).version == 1


BAD_BATCHES: list[tuple[str, dict[str, Any], str]] = [
    ("lengths disagree", {"dones": [False, True]}, "dones"),
    ("states wrong size", {"states": [0.0] * 11}, "states"),
    ("too few actions", {"actions": [0.0, 1.0]}, "actions"),
    ("action out of space", {"actions": [0.0, 2.0, 1.0]}, "actions"),
    ("negative action", {"actions": [0.0, -1.0, 1.0]}, "actions"),
    ("fractional action", {"actions": [0.0, 0.5, 1.0]}, "actions"),
    ("nan state", {"states": [0.0] * 5 + [float("nan")] + [0.0] * 6}, "states"),
    ("inf reward", {"rewards": [1.0, float("inf"), 1.0]}, "rewards"),
    ("nan reward", {"rewards": [1.0, float("nan"), 1.0]}, "rewards"),
    ("empty batch", {"states": [], "actions": [], "rewards": [], "dones": []}, "empty"),
    ("flush without an episode", {"dones": [False, False, False], "flush": True}, "flush"),
]


@pytest.mark.parametrize(("changes", "word"), [c[1:] for c in BAD_BATCHES], ids=[c[0] for c in BAD_BATCHES])
def test_bad_batch_is_invalid_and_changes_nothing(stub: pb_grpc.PolicyServiceStub, server: ServerHandle,
                                                  changes: dict[str, Any], word: str) -> None:
    policy_id = create(stub)
    # A held tail that must survive; sync: on disk before the reply, so no background write moves the file later.
    stub.SendTrainingBatch(batch(policy_id, episode(2, seed=9, done=False), sync=True))
    state_file = Path(server.settings.policies_root) / policy_id / "state.safetensors"
    before = (state_file.stat().st_mtime_ns, weights(stub, policy_id))
    request = {**episode(3), **changes}
    with pytest.raises(grpc.RpcError) as info:
        stub.SendTrainingBatch(pb.TrainingBatch(policy_id=policy_id, **request))
    assert info.value.code() == INVALID and word in info.value.details()
    info_after = stub.GetPolicy(pb.PolicyRequest(policy_id=policy_id))
    assert info_after.version == 0 and info_after.pending_steps == 2
    assert state_file.stat().st_mtime_ns == before[0]
    assert_same_weights(weights(stub, policy_id), before[1])


@pytest.mark.parametrize("bad_id", ["../escape", "a/b", "", ".", "..", "x" * 65, "-leading", "sp ace"])
def test_unsafe_policy_ids_are_invalid(stub: pb_grpc.PolicyServiceStub, server: ServerHandle, bad_id: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=bad_id, spec=discrete_spec()))
    assert info.value.code() == INVALID and "policy_id" in info.value.details()
    assert not (Path(server.settings.policies_root).parent / "escape").exists()


@pytest.mark.parametrize(("spec", "word"), [
    (pb.PolicySpec(observation_shape=[], discrete_n=2), "observation_shape"),
    (pb.PolicySpec(observation_shape=[4, 0], discrete_n=2), "observation_shape"),
    (pb.PolicySpec(observation_shape=[4]), "box"),
    (pb.PolicySpec(observation_shape=[4], discrete_n=1), "discrete_n"),
    (pb.PolicySpec(observation_shape=[4], box=pb.BoxActions(shape=[2], low=[-1.0], high=[1.0, 1.0])), "low"),
    (pb.PolicySpec(observation_shape=[4], box=pb.BoxActions(shape=[1], low=[1.0], high=[-1.0])), "low"),
    (pb.PolicySpec(observation_shape=[4], discrete_n=2, hyperparameters={"lr": "1"}), "accepted keys"),
    (pb.PolicySpec(observation_shape=[4], discrete_n=2, hyperparameters={"beta": "-1"}), "beta"),
    (pb.PolicySpec(observation_shape=[4], discrete_n=2, seed=-3), "seed"),
])
def test_bad_specs_are_invalid(stub: pb_grpc.PolicyServiceStub, spec: pb.PolicySpec, word: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.CreatePolicy(pb.CreatePolicyRequest(policy_id=new_id(), spec=spec))
    assert info.value.code() == INVALID and word in info.value.details()


def test_non_finite_loss_is_invalid_argument_and_keeps_the_last_good_weights(stub: pb_grpc.PolicyServiceStub
                                                                              ) -> None:
    spec = pb.PolicySpec(observation_shape=[2], box=pb.BoxActions(shape=[1]), seed=1)  # unbounded actions
    policy_id = create(stub, spec)
    good = stub.SendTrainingBatch(pb.TrainingBatch(policy_id=policy_id, states=[0.1, 0.2, 0.3, 0.4],
                                                   actions=[0.5, -0.5], rewards=[1, 0], dones=[False, True]))
    assert good.version == 1
    before = weights(stub, policy_id)
    with pytest.raises(grpc.RpcError) as info:  # log N(1e30 | mean, std) overflows float32 to -inf
        stub.SendTrainingBatch(pb.TrainingBatch(policy_id=policy_id, states=[0.1, 0.2, 0.3, 0.4],
                                                actions=[1e30, -0.5], rewards=[1, 0], dones=[False, True]))
    # The client's values overflowed: its mistake, not the server's (INVALID_ARGUMENT naming the batch).
    assert info.value.code() == INVALID and "loss" in info.value.details()
    assert info.value.details().startswith("batch: ")
    assert stub.GetPolicy(pb.PolicyRequest(policy_id=policy_id)).version == 1
    assert_same_weights(weights(stub, policy_id), before)


def test_box_actions_outside_bounds_are_invalid(stub: pb_grpc.PolicyServiceStub) -> None:
    spec = pb.PolicySpec(observation_shape=[2], box=pb.BoxActions(shape=[2], low=[-1, -1], high=[1, 1]), seed=1)
    policy_id = create(stub, spec)
    with pytest.raises(grpc.RpcError) as info:
        stub.SendTrainingBatch(pb.TrainingBatch(policy_id=policy_id, states=[0.0, 0.0], actions=[0.5, 1.5],
                                                rewards=[1.0], dones=[True]))
    assert info.value.code() == INVALID and "actions" in info.value.details() and "index 1" in info.value.details()


def test_set_weights_accepts_safetensors_only(stub: pb_grpc.PolicyServiceStub) -> None:
    source, target = create(stub, discrete_spec(seed=1)), create(stub, discrete_spec(seed=2))
    stub.SendTrainingBatch(batch(source, episode(5)))
    data = stub.GetModel(pb.GetModelRequest(policy_id=source, format=pb.SAFETENSORS)).data
    info = stub.SetWeights(pb.SetWeightsRequest(policy_id=target, safetensors=data, expected_version=0))
    assert info.version == 1
    assert_same_weights(weights(stub, target), weights(stub, source))

    torchscript = stub.GetModel(pb.GetModelRequest(policy_id=source)).data
    other_arch = create(stub, discrete_spec(obs=3))
    other = stub.GetModel(pb.GetModelRequest(policy_id=other_arch, format=pb.SAFETENSORS)).data
    for payload, word in ((torchscript, "zip"), (b"\x80\x04K\x01.", "pickle"), (b"not a tensor file", "safetensors"),
                          (other, "shape")):
        with pytest.raises(grpc.RpcError) as refused:
            stub.SetWeights(pb.SetWeightsRequest(policy_id=target, safetensors=payload))
        assert refused.value.code() == INVALID and word in refused.value.details(), refused.value.details()
    assert stub.GetPolicy(pb.PolicyRequest(policy_id=target)).version == 1


def test_checkpoints_save_load_and_log_probs_of_old_versions(stub: pb_grpc.PolicyServiceStub) -> None:
    policy_id = create(stub)
    stub.SendTrainingBatch(batch(policy_id, episode(5), episode(2, seed=3, done=False)))
    saved = stub.SaveCheckpoint(pb.CheckpointRequest(policy_id=policy_id, name="good-1"))
    assert saved.name == "good-1" and saved.version == 1
    at_one = weights(stub, policy_id)
    states, actions = episode(4, seed=5)["states"], [0.0, 1.0, 1.0, 0.0]
    logp_one = stub.ComputeLogProb(pb.LogProbRequest(policy_id=policy_id, states=states, actions=actions)).log_probs

    stub.SendTrainingBatch(batch(policy_id, episode(6, seed=1)))
    stub.SendTrainingBatch(batch(policy_id, episode(6, seed=2)))
    by_version = stub.ComputeLogProb(pb.LogProbRequest(policy_id=policy_id, states=states, actions=actions,
                                                       version=1))
    by_checkpoint = stub.ComputeLogProb(pb.LogProbRequest(policy_id=policy_id, states=states, actions=actions,
                                                          checkpoint="good-1"))
    current = stub.ComputeLogProb(pb.LogProbRequest(policy_id=policy_id, states=states, actions=actions))
    assert by_version.version == by_checkpoint.version == 1 and current.version == 3
    np.testing.assert_allclose(by_version.log_probs, logp_one, rtol=1e-6)
    np.testing.assert_allclose(by_checkpoint.log_probs, logp_one, rtol=1e-6)
    assert not np.allclose(current.log_probs, logp_one)

    restored = stub.LoadCheckpoint(pb.CheckpointRequest(policy_id=policy_id, name="good-1"))
    assert restored.version == 1 and restored.pending_steps == 2
    assert_same_weights(weights(stub, policy_id), at_one)
    names = [c.name for c in stub.ListCheckpoints(pb.PolicyRequest(policy_id=policy_id)).checkpoints]
    assert names == ["good-1"]
    for request, code in ((pb.CheckpointRequest(policy_id=policy_id, name="missing"), grpc.StatusCode.NOT_FOUND),
                          (pb.CheckpointRequest(policy_id=policy_id, name="../x"), INVALID)):
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadCheckpoint(request)
        assert info.value.code() == code
    with pytest.raises(grpc.RpcError) as gone:
        stub.ComputeLogProb(pb.LogProbRequest(policy_id=policy_id, states=states, actions=actions, version=99))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND and "version" in gone.value.details()


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_policies_survive_a_restart_at_their_last_state(server_factory, tmp_path: Path, mode: str) -> None:  # type: ignore[no-untyped-def]
    # A long interval in background mode: only the graceful stop's flush can have saved the last batch.
    first = server_factory(tmp_path, policy_sync=mode, policy_sync_interval_seconds=3600)
    stub = pb_grpc.PolicyServiceStub(first.channel)
    policy_id = create(stub, discrete_spec(seed=4, learning_rate="0.01"))
    stub.SendTrainingBatch(batch(policy_id, episode(5), episode(3, seed=1, done=False)))
    stub.SaveCheckpoint(pb.CheckpointRequest(policy_id=policy_id, name="kept"))
    before = weights(stub, policy_id)
    first.stop()

    second = server_factory(tmp_path, policy_sync=mode)
    stub = pb_grpc.PolicyServiceStub(second.channel)
    info = stub.GetPolicy(pb.PolicyRequest(policy_id=policy_id))
    assert info.version == info.durable_version == 1 and info.pending_steps == 3
    assert info.spec.hyperparameters["learning_rate"] == "0.01"
    assert_same_weights(weights(stub, policy_id), before)
    # The held tail and the optimizer state came back too: training carries on from where it was.
    result = stub.SendTrainingBatch(batch(policy_id, episode(2, seed=8)))
    assert result.version == 2 and result.metrics.steps_used == 5
    assert [c.name for c in stub.ListCheckpoints(pb.PolicyRequest(policy_id=policy_id)).checkpoints] == ["kept"]


CLIENT = Path(__file__).resolve().parents[2] / "scripts" / "cartpole_experience_client.py"


def _run_client(server: ServerHandle, policy_id: str, *args: str) -> dict[str, Any]:
    import json

    result = subprocess.run([sys.executable, str(CLIENT), "--address", server.address, "--policy-id", policy_id,
                             *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_client_collected_experience_improves_the_policy(server: ServerHandle) -> None:
    summary = _run_client(server, new_id("cartpole"), "--batches", "12", "--steps-per-batch", "1000",
                          "--stop-after", "0")
    returns = [h["mean_return"] for h in summary["history"]]
    assert summary["final_version"] == 12
    assert np.mean(returns[-3:]) > 2 * np.mean(returns[:3]), returns


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_client_experience_balances_the_pole_within_fifty_batches(server: ServerHandle, seed: int) -> None:
    """The README's claim: the greedy policy returns 500 (the maximum) on seeds 0, 1 and 2."""
    summary = _run_client(server, new_id("cartpole"), "--batches", "50", "--seed", str(seed))
    assert summary["stopped_early"] and summary["final_version"] <= 50, summary["history"][-1]
    assert summary["greedy_returns"] == [500.0] * 10, summary["greedy_returns"]


def test_a_twenty_megabyte_batch_fits_in_one_message(stub: pb_grpc.PolicyServiceStub) -> None:
    """The default message cap (128 MiB) admits the 100 MB chunks existing trainer clients send."""
    policy_id = create(stub, pb.PolicySpec(observation_shape=[1000], discrete_n=2, seed=0))
    n = 5000
    rng = np.random.default_rng(0)
    request = pb.TrainingBatch(policy_id=policy_id, states=rng.uniform(-1, 1, n * 1000).astype(np.float32),
                               actions=rng.integers(0, 2, n).astype(np.float32), rewards=np.ones(n, np.float32),
                               dones=([False] * 99 + [True]) * (n // 100))
    assert request.ByteSize() > 20_000_000
    result = stub.SendTrainingBatch(request, timeout=120)
    assert result.version == 1 and result.metrics.episodes_used == 50 and result.metrics.steps_used == n


def test_watch_streams_of_both_services_share_one_cap(server_factory) -> None:  # type: ignore[no-untyped-def]
    from rl_service_proto.v1 import training_pb2

    handle: ServerHandle = server_factory(max_watch_streams=1)
    stub = pb_grpc.PolicyServiceStub(handle.channel)
    policy_id = create(stub)
    stub.SendTrainingBatch(batch(policy_id, episode(3)))
    watching = stub.WatchModelUpdates(pb.WatchModelRequest(policy_id=policy_id, from_version=0), timeout=30)
    assert next(watching).version == 1
    with pytest.raises(grpc.RpcError) as info:
        next(handle.stub.WatchTraining(training_pb2.RunRequest(run_id="run-any"), timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "MAX_WATCH_STREAMS" in info.value.details()
    watching.cancel()
