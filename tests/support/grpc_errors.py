"""Reading a failed call's status the way a client does: its code, message and BadRequest field violations."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def field_violations(error: grpc.RpcError) -> list[str]:
    """The fields named by the BadRequest in the error's rich status ([] when it carries none)."""
    status = rpc_status.from_call(error)  # also checks that its code and message match the call's
    if status is None:
        return []
    found: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.extend(v.field for v in bad.field_violations)
    return found
