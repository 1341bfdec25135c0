"""HEALTH_PORT: grpc.health.v1 alone, in plaintext, mirroring the main port's statuses (Kubernetes' native probes)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rl_service.healthcheck_main import probe
from rl_service.transport.server_factory import HEALTH_SERVICES
from rl_service_proto.v1 import training_pb2 as pb
from rl_service_proto.v1 import training_pb2_grpc as pb_grpc
from tests.conftest import ServerHandle


def test_the_health_port_answers_health_only_and_follows_the_server(
        server_factory: Callable[..., ServerHandle]) -> None:
    handle = server_factory(health_port=0)
    port = handle.running.health_port
    assert port and port != handle.running.port
    for service in HEALTH_SERVICES:
        report = probe(f"127.0.0.1:{port}", service)
        assert report.serving, report.text
    assert not probe(f"127.0.0.1:{port}", "no.such.Service").serving
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.TrainingServiceStub(channel).ListRuns(pb.ListRunsRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, "nothing but health is served there"
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        handle.stop()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING, "stopping shows there first"
    assert not probe(f"127.0.0.1:{port}", "", timeout=2).serving, "and the port closes with the server"


def test_without_health_port_no_second_server_starts(server_factory: Callable[..., ServerHandle]) -> None:
    handle = server_factory()
    assert handle.running.health_port is None and handle.running.health_server is None


def test_a_health_port_in_use_refuses_to_start_and_frees_the_data_dir(
        server_factory: Callable[..., ServerHandle], tmp_path_factory: pytest.TempPathFactory) -> None:
    first = server_factory(tmp_path_factory.mktemp("first"), health_port=0)
    second = tmp_path_factory.mktemp("second")
    with pytest.raises(OSError, match="HEALTH_PORT"):
        server_factory(second, health_port=first.running.health_port)
    assert server_factory(second).health_status() == health_pb2.HealthCheckResponse.SERVING
