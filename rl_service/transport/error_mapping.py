"""The one table from domain errors to gRPC status codes. Clients never see a traceback."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc

from rl_service.core import errors
from rl_service.infra.logging_setup import get_logger

STATUS_BY_ERROR: tuple[tuple[type[errors.ServiceError], grpc.StatusCode], ...] = (
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.RunNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ModelNotReady, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ExportUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.CapacityExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ServiceShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.EnvironmentUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.PolicyNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.CheckpointNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.VersionConflict, grpc.StatusCode.ABORTED),
    (errors.NonFiniteUpdate, grpc.StatusCode.INTERNAL),
)

_log = get_logger("transport")
F = TypeVar("F", bound=Callable[..., Any])


def status_for(error: errors.ServiceError) -> grpc.StatusCode:
    """The status code for a domain error (a subclass takes its nearest listed base's code)."""
    for cls, code in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, rpc: str, exc: Exception) -> NoReturn:
    if isinstance(exc, errors.ServiceError):
        context.abort(status_for(exc), exc.message)
    _log.exception("unexpected error", rpc=rpc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {rpc}: {type(exc).__name__}")
    raise AssertionError("unreachable: context.abort raises")


def guarded(method: F) -> F:
    """Wrap a servicer method: domain errors end the RPC with their code; anything else INTERNAL, logged.

    Servicer methods raise ServiceError and never call context.abort themselves.
    """
    rpc = method.__name__
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except Exception as exc:
                _abort(context, rpc, exc)
        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    def unary_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            _abort(context, rpc, exc)
    return unary_wrapper  # type: ignore[return-value]
