"""Domain errors: a small hierarchy of nouns whose messages say what was wrong and how to fix it.

Transport maps each class to a gRPC status code in one table (rl_service.transport.error_mapping).
"""

from __future__ import annotations

MAX_QUOTED = 64  # characters of a client's value repeated in an error message


def quoted(value: str, limit: int = MAX_QUOTED) -> str:
    """A client's value for an error message: repr of at most `limit` characters, marked when cut.

    Messages travel in gRPC trailers (8 KiB by default): a long value repeated in full would cost the client the
    real status code, and an error should never echo megabytes back.
    """
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + f"... ({len(value)} characters)"


class ServiceError(Exception):
    """Base of every error a client may see; `field` names the request field at fault, when there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidRequest(ServiceError):
    """A request field is malformed or out of range (INVALID_ARGUMENT)."""


class UnknownAlgorithm(InvalidRequest):
    """The algorithm is not in the registry."""


class UnknownEnvironment(InvalidRequest):
    """The environment id is not registered with Gymnasium."""


class InvalidHyperparameter(InvalidRequest):
    """A hyperparameter key is unknown, or its value does not parse or is out of range."""


class UnsupportedSpace(InvalidRequest):
    """The environment's observation or action space cannot be used with the chosen algorithm."""


class PathOutsideRoot(InvalidRequest):
    """A client-supplied path resolves outside its configured root directory."""


class InvalidObservation(InvalidRequest):
    """An observation has the wrong size or holds NaN or Inf."""


class RunNotFound(ServiceError):
    """No run has this id (NOT_FOUND)."""


class AlreadyExists(ServiceError):
    """The request would overwrite something that exists (ALREADY_EXISTS)."""


class ModelNotReady(ServiceError):
    """The run has no checkpoint or model yet (FAILED_PRECONDITION)."""


class RunStateConflict(ServiceError):
    """The run's state does not allow the request, e.g. resuming or deleting an active run (FAILED_PRECONDITION)."""


class UnknownExportFormat(InvalidRequest):
    """The export format is not in the registry."""


class ExportUnavailable(ServiceError):
    """The server cannot export this policy in that format: a package or support is missing (FAILED_PRECONDITION)."""


class CapacityExceeded(ServiceError):
    """A configured limit is reached, such as the run queue (RESOURCE_EXHAUSTED)."""


class ServiceShuttingDown(ServiceError):
    """The server is draining and accepts no new work (UNAVAILABLE)."""


class NonFiniteUpdate(ServiceError):
    """A training update on a client's batch produced a NaN or Inf loss or gradient; it was discarded and the
    policy kept its weights (INVALID_ARGUMENT: the batch's values are too large for float32 arithmetic)."""

    HINT = "the batch's rewards, observations or actions are too large for float32 arithmetic: scale them down"

    def __init__(self, message: str, field: str | None = "batch") -> None:
        super().__init__(message, field)


class VersionConflict(ServiceError):
    """A request's expected_version is not the policy's current version (ABORTED)."""


class PolicyNotFound(ServiceError):
    """No named policy has this id (NOT_FOUND)."""


class PermissionDenied(ServiceError):
    """The request names something this server is configured not to use, such as a host (PERMISSION_DENIED)."""


class EnvironmentUnavailable(ServiceError):
    """An external environment cannot be reached, or stopped answering in time (FAILED_PRECONDITION)."""


class EnvironmentLacksFeature(EnvironmentUnavailable):
    """The simulation does not offer what a request needs, e.g. subset steps for env_groups (FAILED_PRECONDITION)."""


class EnvironmentProtocolError(EnvironmentUnavailable):
    """An external environment answered outside the protocol: a bad spec, wrong counts or shapes, NaN or Inf."""


class CheckpointNotFound(ServiceError):
    """A named policy has no checkpoint (or kept version) by that name (NOT_FOUND)."""
