"""The one table from domain errors to gRPC status codes. Clients never see a traceback.

A domain error whose code says the request itself is malformed (INVALID_ARGUMENT) also names the field at fault
the standard way: a `google.rpc.BadRequest` with one FieldViolation in the `google.rpc.Status` that grpcio-status
sends in the `grpc-status-details-bin` trailer (read it with `grpc_status.rpc_status.from_call(error)`). The
status message stays the same human sentence either way.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from rl_service.core import errors
from rl_service.infra.logging_setup import get_logger

STATUS_BY_ERROR: tuple[tuple[type[errors.ServiceError], grpc.StatusCode], ...] = (
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.RunNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ModelNotReady, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.RunStateConflict, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ExportUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.CapacityExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ServiceShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.EnvironmentUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.PolicyNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.CheckpointNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.VersionConflict, grpc.StatusCode.ABORTED),
    (errors.NonFiniteUpdate, grpc.StatusCode.INVALID_ARGUMENT),  # the client's values overflowed float32
)

# The HTTP API answers with the status Google's mapping gives each gRPC code (google/rpc/code.proto), so that the
# table above decides both transports' codes; the problem JSON body names the gRPC code too.
HTTP_STATUS_BY_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

# google.rpc.BadRequest describes the syntactic faults of a request: it goes with these codes only. A field named
# by an error of another code (run_id of NOT_FOUND, expected_version of ABORTED) stays in its message.
FIELD_VIOLATION_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})
# The details travel in the trailers next to grpc-message, and repeat the message: a client drops trailers over
# its metadata limit (8 KiB by default, RESOURCE_EXHAUSTED instead of the real code). So the copies are capped and
# the details are left out when the message alone would bring the two trailers near that limit.
MAX_FIELD_CHARS = 128
MAX_DESCRIPTION_CHARS = 1024
MAX_TRAILER_BYTES = 6144

_log = get_logger("transport")
F = TypeVar("F", bound=Callable[..., Any])


def status_for(error: errors.ServiceError) -> grpc.StatusCode:
    """The status code for a domain error (a subclass takes its nearest listed base's code)."""
    for cls, code in STATUS_BY_ERROR:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def http_status_for(code: grpc.StatusCode) -> int:
    """The HTTP status the HTTP API answers for a gRPC code."""
    return HTTP_STATUS_BY_CODE.get(code, 500)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def fit_message(message: str, limit: int = MAX_TRAILER_BYTES) -> str:
    """The message cut (marked with "…") so that grpc-message stays within `limit` bytes on the wire.

    A last guard: errors quote at most a short prefix of a client's value (errors.quoted), but one that does not
    must still reach the client with its own code rather than a metadata-size error.
    """
    if len(message) * 12 <= limit:  # even 4 UTF-8 bytes a character, each percent-encoded, it fits
        return message
    cost = 0
    for index, char in enumerate(message):
        cost += _wire_bytes(char)
        if cost > limit - 9:  # room for the marker
            return message[:index] + "…"
    return message


def _wire_bytes(char: str) -> int:
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in char.encode("utf-8", "surrogatepass"))


def _trailer_bytes(message: str, status: status_pb2.Status) -> int:
    """A pessimistic size of grpc-message (percent-encoded) plus grpc-status-details-bin (base64) on the wire."""
    encoded = message.encode("utf-8")
    message_bytes = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in encoded)
    return message_bytes + 4 * ((int(status.ByteSize()) + 2) // 3)


def rich_status(error: errors.ServiceError) -> grpc.Status | None:
    """The error's status with a BadRequest naming its field, or None when it has none to send (plain abort)."""
    code = status_for(error)
    if not error.field or code not in FIELD_VIOLATION_CODES:
        return None
    violation = error_details_pb2.BadRequest.FieldViolation(
        field=_clip(error.field, MAX_FIELD_CHARS), description=_clip(error.message, MAX_DESCRIPTION_CHARS))
    status = status_pb2.Status(code=code.value[0], message=error.message)
    status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    if _trailer_bytes(error.message, status) > MAX_TRAILER_BYTES:
        return None
    result: grpc.Status = rpc_status.to_status(status)
    return result


def _abort(context: grpc.ServicerContext, rpc: str, exc: Exception) -> NoReturn:
    if isinstance(exc, errors.ServiceError):
        status = rich_status(exc)
        if status is not None:
            context.abort_with_status(status)
        context.abort(status_for(exc), fit_message(exc.message))
    _log.exception("unexpected error", rpc=rpc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {rpc}: {type(exc).__name__}")
    raise AssertionError("unreachable: context.abort raises")


def guarded(method: F) -> F:
    """Wrap a servicer method: domain errors end the RPC with their code; anything else INTERNAL, logged.

    Servicer methods raise ServiceError and never call context.abort themselves. Server-streaming methods
    (generators) end the same way after the messages they yielded; client-streaming ones are plain functions.
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
