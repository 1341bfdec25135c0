"""The audit trail: one structured log line per state-changing call, and per call refused for its credentials.

A line names who (the token's name, never the token), from where (the peer), what (the RPC and the run or policy
it touched) and how it ended (the status code the client got).
"""

from __future__ import annotations

from typing import Any

import grpc

from rl_service.infra.logging_setup import get_logger

TARGET_FIELDS = ("run_id", "policy_id")  # the fields naming what a call acts on, in the request or the reply
MAX_TARGET_CHARS = 128  # a client's id is repeated in the log at most this long
REFUSALS = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


def target_of(*messages: Any) -> dict[str, str]:
    """{'run_id': ...} or {'policy_id': ...}: the first such field set in the messages (request, then reply)."""
    for message in messages:
        fields = getattr(getattr(message, "DESCRIPTOR", None), "fields_by_name", {})
        for name in TARGET_FIELDS:
            if name in fields:
                value = getattr(message, name)
                if value:
                    return {name: value[:MAX_TARGET_CHARS]}
    return {}


class AuditLog:
    """Writes audit lines through the project's structlog logger ('audit')."""

    def __init__(self, logger: Any = None) -> None:
        self._log = logger  # None: the configured logger at each line, so a later configure_logging applies

    def record(self, principal: str, peer: str, rpc: str, code: grpc.StatusCode, target: dict[str, str]) -> None:
        """One line; refusals at WARNING, so they show even where INFO is filtered out."""
        log = self._log if self._log is not None else get_logger("audit")
        write = log.warning if code in REFUSALS else log.info
        write("audit", principal=principal, peer=peer, rpc=rpc, code=code.name, **target)
