"""Schemathesis against the server's own /openapi.json: requests generated from the document (valid and not) never
get a 5xx. Bounded: a few derandomised examples per operation, so the default suite stays quick and repeatable."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.conftest import ServerHandle, start_server

EXAMPLES_PER_OPERATION = 15


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    # One run slot, none queued: a generated body that happens to be a valid run cannot pile up training.
    handle = start_server(tmp_path_factory.mktemp("schemathesis"), http_enabled=True, max_concurrent_runs=1,
                          max_queued_runs=1, max_total_timesteps=2048)
    yield handle
    handle.stop()


def test_no_generated_request_gets_a_server_error(http_server: ServerHandle) -> None:
    base = f"http://127.0.0.1:{http_server.running.http_port}"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # runs, policies, algorithms, health, metrics: the document lists them all
    calls: list[int] = []
    for operation in operations:

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def no_server_error(case: schemathesis.Case) -> None:
            response = case.call_and_validate(base_url=base, checks=[not_a_server_error], timeout=60)
            calls.append(response.status_code)

        no_server_error()
    assert len(calls) >= 5 * len(operations)  # the generator really sent requests to every operation
    assert {status // 100 for status in calls} >= {2, 4}  # and both accepted and refused ones
