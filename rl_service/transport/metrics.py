"""Prometheus metrics for /metrics: calls by transport, method and code with their latency, Act's latency, and
the runs and policies as they are at each scrape.

Each server has its own CollectorRegistry (a test process starts many). Calls are counted by a gRPC server
interceptor (outermost, so refusals count too) and by the HTTP API's caller; the state metrics are read from
the orchestrator and the policy manager when Prometheus scrapes, so they cannot drift from what the API says.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rl_service.core.policies.manager import PolicyManager
from rl_service.core.runs.orchestrator import Orchestrator
from rl_service.core.runs.records import RunFilter, RunState
from rl_service.transport.rpc_roles import rpc_name

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ACT_METHODS = frozenset({"Act", "ActBatch"})
# Act answers in well under a millisecond on a warm cache; RPCs in general span to seconds (exports, starts).
ACT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """The server's registry: call counters and histograms, and a collector of run and policy state."""

    def __init__(self, orchestrator: Orchestrator, policies: PolicyManager) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("transport", "method", "code")
        self._calls = Counter("rl_service_rpc_requests", "Calls answered, by transport (grpc, http), RPC and "
                              "status code", labels, registry=self.registry)
        self._latency = Histogram("rl_service_rpc_duration_seconds", "Time to answer a call (streams: until they "
                                  "end)", labels, buckets=RPC_BUCKETS, registry=self.registry)
        self._act = Histogram("rl_service_act_duration_seconds", "Time to answer Act and ActBatch calls that "
                              "succeeded", ("transport", "method"), buckets=ACT_BUCKETS, registry=self.registry)
        self.registry.register(StateCollector(orchestrator, policies))

    def observe(self, transport: str, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Count one call that ended with `code` after `seconds`."""
        self._calls.labels(transport, method, code.name).inc()
        self._latency.labels(transport, method, code.name).observe(seconds)
        if method in ACT_METHODS and code == grpc.StatusCode.OK:
            self._act.labels(transport, method).observe(seconds)

    def exposition(self) -> bytes:
        """Everything in the Prometheus text format."""
        data: bytes = generate_latest(self.registry)
        return data


class StateCollector(Collector):
    """Runs by state, the queue, each running run's speed, and each policy's accepted updates, read at scrape."""

    def __init__(self, orchestrator: Orchestrator, policies: PolicyManager) -> None:
        self._orchestrator = orchestrator
        self._policies = policies

    def collect(self) -> Iterable[Metric]:
        """The families, from the orchestrator's and manager's current answers."""
        runs = self._orchestrator.list_runs(RunFilter())
        by_state = GaugeMetricFamily("rl_service_runs", "Runs by state", labels=["state"])
        for state in RunState:
            by_state.add_metric([state.name], sum(1 for r in runs if r.state == state))
        yield by_state
        yield GaugeMetricFamily("rl_service_queue_length", "Runs waiting for a worker slot (PENDING)",
                                value=sum(1 for r in runs if r.state == RunState.PENDING))
        speed = GaugeMetricFamily("rl_service_run_steps_per_second", "Training speed of each RUNNING run",
                                  labels=["run_id", "experiment_id"])
        for record in runs:
            if record.state == RunState.RUNNING:
                speed.add_metric([record.run_id, record.experiment_id], record.metrics.steps_per_second)
        yield speed
        updates = CounterMetricFamily("rl_service_policy_updates", "Accepted updates (batches or weights) of each "
                                      "named policy since it was created", labels=["policy_id"])
        for snapshot in self._policies.list_policies():
            updates.add_metric([snapshot.policy_id], snapshot.version)
        yield updates


class MetricsInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Counts and times every gRPC call by method and the code it ended with."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        """The handler, wrapped to record its outcome (cached per method, as the auth interceptor does)."""
        handler = continuation(details)
        if handler is None:
            return None
        cached = self._wrapped.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(handler, rpc_name(details.method)))
            self._wrapped[details.method] = cached
        return cached[1]

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        record = self._metrics.observe
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}

        def once(inner: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
            def timed(request: Any, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                ended = grpc.StatusCode.UNKNOWN
                try:
                    reply = inner(request, context)
                    ended = grpc.StatusCode.OK
                    return reply
                finally:
                    record("grpc", method, _code(context, ended), time.perf_counter() - start)
            return timed

        def streamed(inner: Callable[[Any, grpc.ServicerContext], Any]
                     ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
            def timed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start = time.perf_counter()
                ended = grpc.StatusCode.UNKNOWN
                try:
                    yield from inner(request, context)
                    ended = grpc.StatusCode.OK
                except GeneratorExit:
                    ended = grpc.StatusCode.CANCELLED
                    raise
                finally:
                    record("grpc", method, _code(context, ended), time.perf_counter() - start)
            return timed

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(once(handler.unary_unary), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(once(handler.stream_unary), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streamed(handler.unary_stream), **codec)
        return grpc.stream_stream_rpc_method_handler(streamed(handler.stream_stream), **codec)


def _code(context: grpc.ServicerContext, fallback: grpc.StatusCode) -> grpc.StatusCode:
    """The code the handler aborted with or set, else `fallback` (OK when it returned, UNKNOWN when it raised)."""
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else fallback
