"""Request bytes that do not decode are the client's mistake: INVALID_ARGUMENT naming the field, not INTERNAL.

gRPC calls a method's request deserializer before any servicer code runs, and answers INTERNAL ("Exception
deserializing request!") when it raises: corrupt protobuf, a truncated length, invalid UTF-8 in a string field.
DecodeGuard, a server interceptor, rebuilds every method handler with a deserializer that never raises: it
returns an Undecodable marker instead, and the handler's behaviour ends the RPC with INVALID_ARGUMENT (and a
google.rpc.BadRequest naming the field at fault) when it meets one, for unary and streamed requests alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from rl_service.core.errors import InvalidRequest
from rl_service.transport.error_mapping import rich_status

MAX_DEPTH = 100  # protobuf's own recursion limit for nested messages

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LENGTH, _WIRE_FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Undecodable:
    """What the guarded deserializer returns for bytes the real one refused: the error to answer with."""

    error: InvalidRequest


class DecodeGuard(grpc.ServerInterceptor):  # type: ignore[misc]
    """Wraps each method handler so undecodable requests end INVALID_ARGUMENT (see the module docstring)."""

    def __init__(self) -> None:
        # method -> (the handler wrapped, its guarded twin). Built once per method, not per call: the interceptors
        # outside this one cache their wrappers by the handler they receive, so a new object per call would make
        # them rebuild theirs on every call too.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """The next handler, its deserializer guarded (None and handlers without a deserializer pass through)."""
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, guard_handler(handler))
            self._guarded[method] = cached  # a race builds the same wrapper twice: harmless
        return cached[1]


def guard_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same method with a deserializer that never raises and a behaviour that refuses its markers."""
    deserialize = _guarded_deserializer(handler.request_deserializer)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_unary_request(handler.unary_unary, False), deserialize,
                                                   serialize)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_unary_request(handler.unary_stream, True), deserialize,
                                                    serialize)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_stream_request(handler.stream_unary, False), deserialize,
                                                    serialize)
    return grpc.stream_stream_rpc_method_handler(_stream_request(handler.stream_stream, True), deserialize,
                                                 serialize)


def _guarded_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    # Generated stubs pass the message class's bound FromString; its class names the type and its fields.
    message_class = getattr(deserialize, "__self__", None)
    descriptor: Descriptor | None = getattr(message_class, "DESCRIPTOR", None)

    def guarded(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # whatever the parser raises (DecodeError, RecursionError, ...) is about these bytes
            return Undecodable(undecodable_error(descriptor, data))
    return guarded


def undecodable_error(descriptor: Descriptor | None, data: bytes) -> InvalidRequest:
    """The error for bytes that are not a valid message of `descriptor`, naming the field at fault if found."""
    type_name = descriptor.full_name if descriptor is not None else "request"
    fault = find_fault(descriptor, data) if descriptor is not None else None
    field, reason = fault if fault is not None else ("request", "malformed protobuf")
    return InvalidRequest(f"{field}: {reason}; the request is not a valid {type_name} message (send bytes a "
                          "protobuf library encoded from the published .proto)", field=field)


def find_fault(descriptor: Descriptor, data: bytes, prefix: str = "", depth: int = 0) -> tuple[str, str] | None:
    """(field path, what is wrong) for the first fault a walk of the wire format finds, or None.

    Follows only what the parser checks: tags, lengths, UTF-8 of string fields, nested messages (map entries
    included). Each byte is read once, so the walk costs no more than the parse that failed.
    """
    if depth > MAX_DEPTH:
        return prefix.rstrip(".") or "request", f"messages nest deeper than {MAX_DEPTH} levels"
    position, end = 0, len(data)
    while position < end:
        tag, position = _varint(data, position)
        if tag is None:
            return prefix.rstrip(".") or "request", "a field's tag is truncated"
        number, wire_type = tag >> 3, tag & 7
        field = descriptor.fields_by_number.get(number)
        path = prefix + (field.name if field is not None else f"field {number}")
        if number == 0:
            return prefix.rstrip(".") or "request", "field number 0 is not valid"
        if wire_type == _WIRE_VARINT:
            value, position = _varint(data, position)
            if value is None:
                return path, "a varint is truncated"
        elif wire_type in (_WIRE_FIXED64, _WIRE_FIXED32):
            position += 8 if wire_type == _WIRE_FIXED64 else 4
            if position > end:
                return path, "a fixed-size value is truncated"
        elif wire_type == _WIRE_LENGTH:
            length, position = _varint(data, position)
            if length is None or position + length > end:
                return path, "a length runs past the end of the message"
            fault = _length_delimited_fault(field, path, data[position:position + length], depth)
            if fault is not None:
                return fault
            position += length
        else:  # groups (3, 4) are proto2-only and unused here; 6 and 7 do not exist
            return path, f"wire type {wire_type} is not accepted"
    return None


def _length_delimited_fault(field: FieldDescriptor | None, path: str, chunk: bytes, depth: int
                            ) -> tuple[str, str] | None:
    if field is None:
        return None  # unknown fields are kept unparsed
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            return path, "a string field holds bytes that are not valid UTF-8"
        return None
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
        return find_fault(field.message_type, chunk, path + ".", depth + 1)
    return None


def _varint(data: bytes, position: int) -> tuple[int | None, int]:
    """A base-128 varint at `position` (at most 10 bytes) and where it ends; None when truncated or too long."""
    value = shift = 0
    for index in range(position, min(position + 10, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    return None, len(data)


def _refuse(context: grpc.ServicerContext, marker: Undecodable) -> NoReturn:
    status = rich_status(marker.error)
    if status is not None:
        context.abort_with_status(status)
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, marker.error.message)
    raise AssertionError("unreachable: context.abort raises")


def _unary_request(behaviour: Callable[..., Any], response_streaming: bool) -> Callable[..., Any]:
    if response_streaming:
        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            if isinstance(request, Undecodable):
                _refuse(context, request)
            yield from behaviour(request, context)
        return streaming

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            _refuse(context, request)
        return behaviour(request, context)
    return unary


class _Requests:
    """A request stream that raises the marker's InvalidRequest where the servicer would read it, and keeps it.

    A servicer wrapped by error_mapping.guarded turns that into INVALID_ARGUMENT itself; for any other one (or
    one that answered otherwise), the behaviour's wrapper below ends the RPC with it.
    """

    def __init__(self, requests: Iterator[Any]) -> None:
        self._requests = requests
        self.refused: Undecodable | None = None

    def __iter__(self) -> _Requests:
        return self

    def __next__(self) -> Any:
        request = next(self._requests)
        if isinstance(request, Undecodable):
            self.refused = request
            raise request.error
        return request


def _stream_request(behaviour: Callable[..., Any], response_streaming: bool) -> Callable[..., Any]:
    if response_streaming:
        def streaming(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            requests = _Requests(request_iterator)
            try:
                yield from behaviour(requests, context)
            except Exception:
                if requests.refused is not None:
                    _refuse(context, requests.refused)
                raise
        return streaming

    def unary(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        requests = _Requests(request_iterator)
        try:
            return behaviour(requests, context)
        except Exception:
            if requests.refused is not None:
                _refuse(context, requests.refused)
            raise
    return unary


def server_interceptors() -> list[grpc.ServerInterceptor]:
    """The interceptors every server runs, outermost first (a list the composition root may extend)."""
    return [DecodeGuard()]
