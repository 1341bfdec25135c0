"""The Session stream read ahead: each request is checked and started as it arrives, answers go back in order.

Used by the reference server over a ProcessBatch (env-server --processes P > 1): a reader thread starts each
request as soon as the workers it concerns are idle, even while an earlier answer is still being computed, so two
pipelined group steps on different workers run at the same time. The handler yields the answers strictly in
request order. A request refused when it is checked or started (RpcAbort) ends the stream with its status after
the answers before it, and nothing after it is read, as handling one request at a time would.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import grpc

from rl_service_proto.v1 import environment_pb2 as pb

# start(request, abandon): RpcAbort if refused; else a call that waits for the answer (None: `abandon` was set
# while the request waited for its workers, so it never started).
Start = Callable[[pb.SessionRequest, threading.Event], Callable[[], pb.SessionResponse] | None]
_Entry = Callable[[], pb.SessionResponse] | Exception | None


class RpcAbort(Exception):
    """End the call with this status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def session_reading_ahead(requests: Iterator[pb.SessionRequest], context: grpc.ServicerContext, start: Start,
                          wake: Callable[[], None]) -> Iterator[pb.SessionResponse]:
    """The Session handler: a reader thread starts the requests, this generator yields their answers in order.

    `wake` is called when the stream ends, so a request waiting for busy workers notices and is not started.
    """
    started: queue.SimpleQueue[_Entry] = queue.SimpleQueue()
    ended = threading.Event()
    reader = threading.Thread(target=_read_ahead, args=(requests, start, started, ended),
                              name="env-session-reader", daemon=True)
    reader.start()
    try:
        while (entry := started.get()) is not None:
            try:
                if isinstance(entry, Exception):
                    raise entry  # a refusal (RpcAbort, below) or a bug
                yield entry()
            except RpcAbort as abort:
                context.abort(abort.code, abort.message)
    finally:
        ended.set()  # the reader starts nothing more
        wake()


def _read_ahead(requests: Iterator[pb.SessionRequest], start: Start, started: queue.SimpleQueue[_Entry],
                ended: threading.Event) -> None:
    """Start each request in turn and queue how to wait for its answer, or the refusal that ends the stream;
    always end the queue with None."""
    try:
        for request in requests:
            if ended.is_set():
                return
            try:
                answer = start(request, ended)
            except RpcAbort as abort:
                started.put(abort)
                return
            if answer is None:
                return
            started.put(answer)
    except grpc.RpcError:
        return  # the client cancelled, or the call ended: the handler ends at None
    except Exception as exc:  # a bug: the handler raises it (UNKNOWN), as it would handling the request itself
        started.put(exc)
    finally:
        started.put(None)
