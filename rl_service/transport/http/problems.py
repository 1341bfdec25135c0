"""Errors as RFC 9457 problem JSON: an aborted call with the HTTP status of its gRPC code (error_mapping), a body
FastAPI could not validate as INVALID_ARGUMENT naming its field, and a request body over the size cap."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rl_service.core.errors import MAX_QUOTED
from rl_service.transport.error_mapping import HTTP_STATUS_BY_CODE, fit_message, http_status_for
from rl_service.transport.http.calls import CallAborted

PROBLEM_JSON = "application/problem+json"
_CODE_BY_HTTP_STATUS = {status: code for code, status in reversed(HTTP_STATUS_BY_CODE.items())}


def problem(code: grpc.StatusCode, message: str, field: str | None = None,
            headers: dict[str, str] | None = None, status: int | None = None) -> JSONResponse:
    """The problem response for a gRPC code: status (the code's unless given), title, detail, and the `code` and
    `field` extensions."""
    status = http_status_for(code) if status is None else status
    body: dict[str, Any] = {"type": "about:blank", "title": _title(status), "status": status,
                            "detail": fit_message(message), "code": code.name}
    if field:
        body["field"] = field
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # 499, nginx's "client closed request", is not in the standard library's table
        return "Client Closed Request"


def install_problem_handlers(app: FastAPI) -> None:
    """Every error the app answers, as problem JSON."""

    async def aborted(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, CallAborted)
        headers = {"WWW-Authenticate": "Bearer"} if exc.code == grpc.StatusCode.UNAUTHENTICATED else None
        return problem(exc.code, exc.message, exc.field, headers)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        # loc is ("body", "total_timesteps") or ("query", "limit"): the field is what follows its place. A body
        # that is not JSON at all is ("body", <character offset>): the field is then the body itself.
        parts = [str(p) for p in first.get("loc", ())[1:]]
        field = "body" if first.get("type") == "json_invalid" else ".".join(parts) or "body"
        # pydantic's message is its own sentence (it does not repeat the value); the field a client named is cut.
        reason = str(first.get("msg", "invalid value"))[:200]
        return problem(grpc.StatusCode.INVALID_ARGUMENT, f"{field[:MAX_QUOTED]}: {reason}", field[:MAX_QUOTED])

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _CODE_BY_HTTP_STATUS.get(exc.status_code, grpc.StatusCode.UNKNOWN)
        return problem(code, str(exc.detail), status=exc.status_code)  # 405 and friends keep their own status

    app.add_exception_handler(CallAborted, aborted)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _TooLarge(Exception):
    """The body passed the cap while it was read."""


class BodySizeCap:
    """ASGI middleware: a request body over `limit` bytes is refused 413 (RESOURCE_EXHAUSTED), declared or not."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: int) -> None:
        self._app = app
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._limit:
            await self._refuse(scope, receive, send)
            return
        seen = 0
        over = False
        started = False

        async def counted_receive() -> Message:
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self._limit:
                over = True
                raise _TooLarge()
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's own answer to the failed read (FastAPI: 400) gives way to the 413 below
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_TooLarge):  # FastAPI may also catch it, and answer 400: dropped above
            await self._app(scope, counted_receive, tracked_send)
        if over and not started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"body: the request body exceeds MAX_MESSAGE_BYTES={self._limit} bytes", "body",
                           status=413)
        await response(scope, receive, send)
