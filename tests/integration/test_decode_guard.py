"""Request bytes that do not decode end INVALID_ARGUMENT naming the field (not gRPC's INTERNAL "Exception
deserializing request!"), for unary, server-streaming and client-streaming methods, through a real server."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from rl_service.transport.decode_guard import DecodeGuard, find_fault
from rl_service_proto.v1 import policy_pb2 as ppb
from rl_service_proto.v1 import training_pb2 as pb
from tests.conftest import ServerHandle
from tests.support.grpc_errors import field_violations

INVALID = grpc.StatusCode.INVALID_ARGUMENT
TRAINING = "/rl_service.v1.TrainingService/"
POLICY = "/rl_service.v1.PolicyService/"


def _refused(call: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, timeout=10)
        if isinstance(result, Iterator):
            list(result)
    return info.value


def test_the_issue_reproduction_is_invalid_argument_naming_run_id(server: ServerHandle) -> None:
    error = _refused(server.channel.unary_unary(TRAINING + "GetTrainingStatus"), bytes.fromhex("0a05"))
    assert error.code() == INVALID
    assert error.details().startswith("run_id: a length runs past the end")
    assert "rl_service.v1.RunRequest" in error.details()
    assert field_violations(error) == ["run_id"]


@pytest.mark.parametrize(("method", "data", "field"), [
    ("GetTrainingStatus", b"\x0a\x02\xff\xfe", "run_id"),  # invalid UTF-8 in a string field
    ("GetTrainingStatus", b"\x0a", "run_id"),  # a tag with no length
    ("GetTrainingStatus", b"\xff\xff\xff", "request"),  # a truncated tag
    ("GetTrainingStatus", b"\x0f", "run_id"),  # wire type 7
    # A map entry's key (hyperparameters is field 6 of StartTrainingRequest): the path goes into the entry.
    ("StartTraining", pb.StartTrainingRequest(algorithm="PPO").SerializeToString() + b"\x32\x03\x0a\x01\xc3",
     "hyperparameters.key"),
])
def test_undecodable_unary_requests_name_the_field(server: ServerHandle, method: str, data: bytes,
                                                   field: str) -> None:
    error = _refused(server.channel.unary_unary(TRAINING + method), data)
    assert error.code() == INVALID, error.details()
    assert field_violations(error) == [field]


def test_undecodable_request_of_a_server_stream_is_invalid_argument(server: ServerHandle) -> None:
    error = _refused(server.channel.unary_stream(TRAINING + "WatchTraining"), b"\x0a\x01\x80")
    assert error.code() == INVALID
    assert field_violations(error) == ["run_id"]


@pytest.mark.parametrize("bad_at", [0, 1])
def test_undecodable_chunk_of_a_client_stream_is_invalid_argument(server: ServerHandle, bad_at: int) -> None:
    from rl_service_proto.v1 import policy_pb2_grpc

    # The policy exists, so a good first chunk passes the owner check and the bad second one is what is refused.
    policy_pb2_grpc.PolicyServiceStub(server.channel).CreatePolicy(
        ppb.CreatePolicyRequest(policy_id="p", spec=ppb.PolicySpec(observation_shape=[2], discrete_n=2)), timeout=30)
    good = ppb.TrainingBatch(policy_id="p", states=[0.0, 1.0], actions=[0.0], rewards=[1.0],
                             dones=[True]).SerializeToString()
    chunks = [good, good]
    chunks[bad_at] = b"\x0a\x01\xff"  # policy_id, invalid UTF-8
    error = _refused(server.channel.stream_unary(POLICY + "SendTrainingBatchStream"), iter(chunks))
    assert error.code() == INVALID, error.details()
    assert field_violations(error) == ["policy_id"]


def test_valid_bytes_still_reach_the_servicer(server: ServerHandle) -> None:
    error = _refused(server.channel.unary_unary(TRAINING + "GetTrainingStatus"),
                     pb.RunRequest(run_id="run-nope").SerializeToString())
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_the_walk_finds_no_fault_in_valid_messages() -> None:
    message = pb.StartTrainingRequest(algorithm="PPO", env_id="CartPole-v1", hyperparameters={"n_steps": "é"},
                                      seed=-1, total_timesteps=2**62)
    assert find_fault(pb.StartTrainingRequest.DESCRIPTOR, message.SerializeToString()) is None


class _Sum:
    """Behaviours no error_mapping.guarded wraps: the guard alone must refuse undecodable requests for them."""

    @staticmethod
    def unary(request: pb.RunRequest, context: grpc.ServicerContext) -> pb.RunRequest:
        return request

    @staticmethod
    def client_stream(requests: Iterator[pb.RunRequest], context: grpc.ServicerContext) -> pb.RunRequest:
        return pb.RunRequest(run_id="".join(r.run_id for r in requests))

    @staticmethod
    def bidi(requests: Iterator[pb.RunRequest], context: grpc.ServicerContext) -> Iterator[pb.RunRequest]:
        yield from requests


@pytest.fixture(scope="module")
def bare_server() -> Iterator[grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[DecodeGuard()])
    decode, encode = pb.RunRequest.FromString, pb.RunRequest.SerializeToString
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Bare", {
        "Unary": grpc.unary_unary_rpc_method_handler(_Sum.unary, decode, encode),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_Sum.client_stream, decode, encode),
        "Bidi": grpc.stream_stream_rpc_method_handler(_Sum.bidi, decode, encode),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    channel.close()
    server.stop(grace=None)


@pytest.mark.parametrize("kind", ["Unary", "ClientStream", "Bidi"])
def test_the_guard_needs_no_servicer_cooperation(bare_server: grpc.Channel, kind: str) -> None:
    good = pb.RunRequest(run_id="a").SerializeToString()
    bad = b"\x0a\x01\xff"
    if kind == "Unary":
        assert bare_server.unary_unary("/test.Bare/Unary")(good, timeout=10) == good
        error = _refused(bare_server.unary_unary("/test.Bare/Unary"), bad)
    elif kind == "ClientStream":
        assert bare_server.stream_unary("/test.Bare/ClientStream")(iter([good, good]), timeout=10) == \
            pb.RunRequest(run_id="aa").SerializeToString()
        error = _refused(bare_server.stream_unary("/test.Bare/ClientStream"), iter([good, bad]))
    else:
        error = _refused(bare_server.stream_stream("/test.Bare/Bidi"), iter([good, bad]))
    assert error.code() == INVALID
    assert field_violations(error) == ["run_id"]


def test_each_method_is_guarded_once_not_per_call() -> None:
    # The metrics and auth interceptors outside the guard cache their wrappers by the handler they receive: a new
    # guarded handler per call would make every interceptor rebuild its wrapper on every call.
    registered = grpc.unary_unary_rpc_method_handler(lambda request, context: request,
                                                     request_deserializer=pb.RunRequest.FromString,
                                                     response_serializer=pb.RunRequest.SerializeToString)

    class Details:
        method = TRAINING + "GetTrainingStatus"

    guard = DecodeGuard()
    first = guard.intercept_service(lambda details: registered, Details())
    assert first is not registered
    assert guard.intercept_service(lambda details: registered, Details()) is first
    replaced = registered._replace(unary_unary=lambda request, context: None)
    assert guard.intercept_service(lambda details: replaced, Details()) is not first  # a new handler: re-guarded
