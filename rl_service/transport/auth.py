"""Authentication and roles: a gRPC server interceptor that admits each call by its bearer token and the RPC table,
hands the principal to servicers, and audit-logs state-changing calls; `require_owner` for the owner rules.

Without AUTH_TOKENS_FILE every call is made by ANONYMOUS (an admin whose runs and policies have owner ""), as
before authentication existed; state-changing calls are still audit-logged.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from rl_service.core.errors import PermissionDenied
from rl_service.infra.auth_tokens import Role, TokenTable, load_tokens
from rl_service.infra.logging_setup import get_logger
from rl_service.infra.settings import Settings
from rl_service.transport.audit import AuditLog, target_of
from rl_service.transport.rpc_roles import RPC_ROLES, is_audited, rpc_name

BEARER = "bearer"
AUTHORIZATION = "authorization"


@dataclass(frozen=True)
class Principal:
    """Who makes a call: a token's name and role, or ANONYMOUS on a server without tokens."""

    name: str
    role: Role
    authenticated: bool = True

    @property
    def owner(self) -> str:
        """What runs and policies it creates record as their owner ('' without authentication)."""
        return self.name if self.authenticated else ""


ANONYMOUS = Principal("anonymous", Role.ADMIN, authenticated=False)
_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("rl_service_principal", default=None)


def current_principal() -> Principal:
    """The principal of the call this thread serves (set by AuthInterceptor; RuntimeError outside a call)."""
    principal = _current.get()
    if principal is None:  # fail closed: a servicer reached without the interceptor has nobody to act for
        raise RuntimeError("no principal: the call did not pass through AuthInterceptor")
    return principal


def require_owner(principal: Principal, owner: str, what: str) -> None:
    """PermissionDenied unless the principal owns `what` (e.g. "run 'run-1'") or is an admin."""
    if principal.role >= Role.ADMIN or principal.owner == owner:
        return
    whose = repr(owner) if owner else "nobody (it was created without authentication)"
    raise PermissionDenied(f"{what} belongs to {whose}; only its owner or an admin may change it, and "
                           f"{principal.name!r} is a {principal.role.label}")


class _Refused(Exception):
    """A call refused before its handler ran."""

    def __init__(self, code: grpc.StatusCode, message: str, principal: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.principal = principal


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer TOKEN` entry; None when there is none; _Refused when malformed."""
    values = [value for key, value in metadata or () if key.lower() == AUTHORIZATION]
    if not values:
        return None
    if len(values) > 1:
        raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "send one authorization metadata entry, not several", "-")
    value = values[0]
    scheme, _, token = (value if isinstance(value, str) else "").strip().partition(" ")
    if scheme.lower() != BEARER or not token.strip():
        raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be `Bearer TOKEN`", "-")
    return token.strip()


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Admits every call by RPC_ROLES: open, or a token whose role is high enough; then runs it as that principal."""

    def __init__(self, tokens: TokenTable | None, audit: AuditLog | None = None,
                 roles: Mapping[str, Role | None] = RPC_ROLES) -> None:
        self._tokens = tokens
        self._audit = audit or AuditLog()
        self._roles = roles
        # Wrapped once per method: the credentials come from each call's context, not from the wrapper.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        """The handler, wrapped so that its call is admitted first (open RPCs pass unwrapped)."""
        handler = continuation(details)
        method = details.method
        if handler is None or (method in self._roles and self._roles[method] is None):
            return handler  # unknown methods get gRPC's UNIMPLEMENTED; health stays open to probes
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, _wrapped(handler, _Call(self, method)))
            self._wrapped[method] = cached  # a race builds the same wrapper twice: harmless
        return cached[1]

    def admit(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> Principal:
        """The principal making the call, or _Refused: UNAUTHENTICATED, or PERMISSION_DENIED naming what is needed."""
        rpc = rpc_name(method)
        if method not in self._roles:
            get_logger("auth").error("RPC without a row in RPC_ROLES refused", rpc=method)
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, f"{rpc} has no role in the server's RPC table", "-")
        needed = self._roles[method]
        assert needed is not None  # open methods are never wrapped
        if self._tokens is None:
            return ANONYMOUS
        token = bearer_token(metadata)
        if token is None:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "this server needs a bearer token: send metadata "
                           "`authorization: Bearer TOKEN` (rl-service --token or $RL_SERVICE_TOKEN)", "-")
        entry = self._tokens.lookup(token)
        if entry is None:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "unknown token", "-")
        if entry.role < needed:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, f"{rpc} needs role {needed.label} or higher; "
                           f"{entry.name!r} has role {entry.role.label}", entry.name)
        return Principal(entry.name, entry.role)

    def call(self, method: str) -> _Call:
        """Admission, principal and audit for calls of one RPC that reach a servicer another way (the HTTP API):
        the same table, tokens and audit lines as gRPC's."""
        return _Call(self, method)

    def audited(self, method: str) -> bool:
        """Whether calls of this RPC get an audit line even when admitted."""
        return is_audited(self._roles.get(method))

    def audit(self, principal: str, context: grpc.ServicerContext, method: str, code: grpc.StatusCode,
              target: dict[str, str]) -> None:
        """One audit line."""
        self._audit.record(principal, context.peer(), rpc_name(method), code, target)


Describe = Callable[[Any], dict[str, str]]  # the reply (None when there is none) -> what the call acted on


@dataclass
class _Call:
    """Calls of one RPC going through the interceptor: admitted, run as their principal, audited when they change
    state."""

    interceptor: AuthInterceptor
    method: str

    def admit(self, context: grpc.ServicerContext, request: Any) -> Principal:
        """The principal, or the call ends here with its code (audited: a refusal is always worth a line)."""
        try:
            return self.interceptor.admit(self.method, context.invocation_metadata())
        except _Refused as refused:
            self.interceptor.audit(refused.principal, context, self.method, refused.code, target_of(request))
            context.abort(refused.code, refused.message)
            raise AssertionError("unreachable: context.abort raises") from None

    def finish(self, principal: Principal, context: grpc.ServicerContext, fallback: grpc.StatusCode,
               target: dict[str, str]) -> None:
        """Audit the outcome: the code the handler set or aborted with, else `fallback`."""
        if self.interceptor.audited(self.method):
            self.interceptor.audit(principal.name, context, self.method, context.code() or fallback, target)

    def run(self, principal: Principal, context: grpc.ServicerContext, call: Callable[[], Any],
            describe: Describe) -> Any:
        """Call a handler that answers once, as the principal, and audit how it ended."""
        token = _current.set(principal)
        try:
            response = call()
        except BaseException:
            self.finish(principal, context, grpc.StatusCode.UNKNOWN, describe(None))
            raise
        finally:
            _current.reset(token)
        self.finish(principal, context, grpc.StatusCode.OK, describe(response))
        return response

    def stream(self, principal: Principal, context: grpc.ServicerContext, call: Callable[[], Any],
               describe: Describe) -> Iterator[Any]:
        """Run a handler that answers with a stream: each step runs as the principal; audited once it ends."""
        token = _current.set(principal)
        try:
            responses = iter(call())  # a generator's code runs only at next(), below
        except BaseException:
            self.finish(principal, context, grpc.StatusCode.UNKNOWN, describe(None))
            raise
        finally:
            _current.reset(token)
        return self._steps(principal, context, responses, describe)

    def _steps(self, principal: Principal, context: grpc.ServicerContext, responses: Iterator[Any],
               describe: Describe) -> Iterator[Any]:
        ended = grpc.StatusCode.UNKNOWN
        try:
            while True:
                token = _current.set(principal)  # set and reset within one step: each step is one thread's
                try:
                    item = next(responses)
                except StopIteration:
                    ended = grpc.StatusCode.OK
                    return
                finally:
                    _current.reset(token)
                yield item
        except GeneratorExit:  # the client went away
            ended = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.finish(principal, context, ended, describe(None))


class _FirstMessage:
    """A request stream that remembers its first message (it names the target of a client-streaming call)."""

    def __init__(self, messages: Iterator[Any]) -> None:
        self._messages = messages
        self.first: Any = None

    def __iter__(self) -> _FirstMessage:
        return self

    def __next__(self) -> Any:
        message = next(self._messages)
        if self.first is None:
            self.first = message
        return message


def _wrapped(handler: grpc.RpcMethodHandler, call: _Call) -> grpc.RpcMethodHandler:
    """The same handler (kind, (de)serializers) with its behaviour admitted and run through `call`."""
    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            principal = call.admit(context, request)
            return call.run(principal, context, lambda: inner_uu(request, context),
                            lambda reply: target_of(request, reply))
        return grpc.unary_unary_rpc_method_handler(unary_unary, **codec)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        def unary_stream(request: Any, context: grpc.ServicerContext) -> Any:
            principal = call.admit(context, request)
            return call.stream(principal, context, lambda: inner_us(request, context),
                               lambda reply: target_of(request))
        return grpc.unary_stream_rpc_method_handler(unary_stream, **codec)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            principal = call.admit(context, None)
            recorded = _FirstMessage(requests)
            return call.run(principal, context, lambda: inner_su(recorded, context),
                            lambda reply: target_of(recorded.first, reply))
        return grpc.stream_unary_rpc_method_handler(stream_unary, **codec)
    inner_ss = handler.stream_stream

    def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        principal = call.admit(context, None)
        recorded = _FirstMessage(requests)
        return call.stream(principal, context, lambda: inner_ss(recorded, context),
                           lambda reply: target_of(recorded.first))
    return grpc.stream_stream_rpc_method_handler(stream_stream, **codec)


def auth_interceptors(settings: Settings) -> list[grpc.ServerInterceptor]:
    """The server's interceptors: AUTH_TOKENS_FILE read once (TokenFileError stops the start-up), or none set."""
    # Nothing is logged here: a refusal later in start-up must print its one line alone. The "server started"
    # line says whether authentication is on.
    if settings.auth_tokens_file is None:
        return [AuthInterceptor(None)]
    return [AuthInterceptor(load_tokens(settings.auth_tokens_file))]
