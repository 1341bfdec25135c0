"""Running a servicer method for an HTTP request: a ServicerContext stand-in, and the caller that admits, runs,
audits and counts the call through the same AuthInterceptor and metrics as gRPC."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from rl_service.transport.audit import target_of
from rl_service.transport.auth import AuthInterceptor
from rl_service.transport.metrics import ServiceMetrics
from rl_service.transport.rpc_roles import rpc_name

_DETAILS_KEY = "grpc-status-details-bin"


class CallAborted(Exception):
    """A call ended with a non-OK code: what the gRPC client would have got (code, message, BadRequest field)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class HttpCallContext:
    """The part of grpc.ServicerContext that the servicers, the auth interceptor and the health servicer use."""

    def __init__(self, authorization: Sequence[str], peer: str) -> None:
        self._metadata = tuple(("authorization", value) for value in authorization)
        self._peer = peer
        self._code: grpc.StatusCode | None = None
        self._active = True

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The request's Authorization headers as gRPC metadata entries."""
        return self._metadata

    def peer(self) -> str:
        """Where the request came from, marked as HTTP for the audit line."""
        return self._peer

    def code(self) -> grpc.StatusCode | None:
        """The code the call aborted with (None until then)."""
        return self._code

    def set_code(self, code: grpc.StatusCode) -> None:
        """As gRPC's: the code the call ends with."""
        self._code = code

    def set_details(self, details: str) -> None:
        """Ignored: every servicer here reports through abort."""

    def is_active(self) -> bool:
        """False once the HTTP client has gone (a watch loop then ends)."""
        return self._active

    def cancel(self) -> None:
        """The client went away."""
        self._active = False

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        """End the call: raises CallAborted."""
        self._code = code
        raise CallAborted(code, details)

    def abort_with_status(self, status: grpc.Status) -> None:
        """End the call with a rich status: its BadRequest's field is kept for the problem body."""
        self._code = status.code
        raise CallAborted(status.code, status.details, _violated_field(status.trailing_metadata))


def _violated_field(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The field of the first BadRequest violation in a status's details trailer, if any."""
    for key, value in metadata or ():
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request) and bad_request.field_violations:
                return str(bad_request.field_violations[0].field)
    return None


class RpcCaller:
    """Runs servicer methods as RPCs: admitted by the token table, run as the principal, audited and counted."""

    def __init__(self, auth: AuthInterceptor, metrics: ServiceMetrics) -> None:
        self._auth = auth
        self._metrics = metrics

    def unary(self, method: str, handler: Callable[[Any, Any], Any], request: Any, context: HttpCallContext) -> Any:
        """The reply of `handler(request, context)` for the RPC `method` ('/pkg.Service/Name'); CallAborted."""
        call = self._auth.call(method)
        start = time.perf_counter()
        ended = grpc.StatusCode.UNKNOWN
        try:
            principal = call.admit(context, request)
            reply = call.run(principal, context, lambda: handler(request, context),
                             lambda reply: target_of(request, reply))
            ended = grpc.StatusCode.OK
            return reply
        finally:
            self._metrics.observe("http", rpc_name(method), context.code() or ended, time.perf_counter() - start)

    def stream(self, method: str, handler: Callable[[Any, Any], Iterator[Any]], request: Any,
               context: HttpCallContext) -> Iterator[Any]:
        """The messages of a server-streaming servicer method; admission happens here, the rest as it is read."""
        call = self._auth.call(method)
        start = time.perf_counter()
        try:
            principal = call.admit(context, request)
        except CallAborted as aborted:
            self._metrics.observe("http", rpc_name(method), aborted.code, time.perf_counter() - start)
            raise
        messages = call.stream(principal, context, lambda: handler(request, context),
                               lambda reply: target_of(request))
        return self._counted(method, messages, context, start)

    def _counted(self, method: str, messages: Iterator[Any], context: HttpCallContext,
                 start: float) -> Iterator[Any]:
        ended = grpc.StatusCode.UNKNOWN
        try:
            yield from messages
            ended = grpc.StatusCode.OK
        except GeneratorExit:
            ended = grpc.StatusCode.CANCELLED
            raise
        finally:
            self._metrics.observe("http", rpc_name(method), context.code() or ended, time.perf_counter() - start)
