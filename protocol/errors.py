"""Typed errors with their gRPC status, shared by the contributor and the coordinator.

Only the coordinator's servicer turns these into `context.abort`; the client maps a status
back to a message. Each message names what was wrong and how to fix it.
"""

from __future__ import annotations


class GaggleError(Exception):
    """Root of every error gaggle raises on purpose.

    `status` is the name of a `grpc.StatusCode` member, kept as a string so that this module
    does not import grpc (the routing side never needs it).
    """

    status: str = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(GaggleError):
    """The request or bundle is malformed: fix the input and send it again."""

    status = "INVALID_ARGUMENT"


class InvalidBundle(InvalidArgument):
    """A bundle breaks the format: a missing file, a bad tensor, a hash mismatch..."""


class TrainingDiverged(GaggleError):
    """A training loss became NaN or Inf: lower the learning rate."""

    status = "INVALID_ARGUMENT"


class FingerprintMismatch(GaggleError):
    """The bundle was trained on another base model than the federation's."""

    status = "FAILED_PRECONDITION"


class FailedPrecondition(GaggleError):
    """The request is well formed but the system is not in a state to accept it."""

    status = "FAILED_PRECONDITION"


class Unauthenticated(GaggleError):
    status = "UNAUTHENTICATED"


class PermissionDenied(GaggleError):
    status = "PERMISSION_DENIED"


class NotFound(GaggleError):
    status = "NOT_FOUND"


class AlreadyExists(GaggleError):
    status = "ALREADY_EXISTS"


class ResourceExhausted(GaggleError):
    """A limit was hit: upload size, concurrent uploads, store quota, rate limit."""

    status = "RESOURCE_EXHAUSTED"


class OutOfRange(GaggleError):
    """An upload chunk was sent at an offset other than the committed one."""

    status = "OUT_OF_RANGE"


class DeadlineExceeded(GaggleError):
    status = "DEADLINE_EXCEEDED"


class Unavailable(GaggleError):
    status = "UNAVAILABLE"
