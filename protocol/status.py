"""The one place that maps GaggleError to gRPC status codes and back.

The coordinator's servicer aborts with `abort(context, err)`; the client turns a failed call
back into the same typed error with `from_rpc_error(err)`. The error's class name travels in
trailing metadata so that, for instance, a fingerprint mismatch comes back as
FingerprintMismatch rather than as a generic FAILED_PRECONDITION.
"""

from __future__ import annotations

import re
from typing import NoReturn

import grpc

from protocol import errors
from protocol.errors import GaggleError

ERROR_CLASS_KEY = "gaggle-error"  # trailing metadata: the GaggleError subclass name
ERROR_FIELD_KEY = "gaggle-field"  # trailing metadata: the offending field, when known

# Every GaggleError subclass, by name, so the client can rebuild the exact type.
_CLASSES: dict[str, type[GaggleError]] = {
    cls.__name__: cls for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, GaggleError)
}
# The class a bare status becomes when no class name came with it (transport errors).
_DEFAULT_FOR_STATUS: dict[str, type[GaggleError]] = {}
for _cls in reversed(list(_CLASSES.values())):
    _DEFAULT_FOR_STATUS[_cls.status] = _cls
_DEFAULT_FOR_STATUS.update({
    "INVALID_ARGUMENT": errors.InvalidArgument,
    "FAILED_PRECONDITION": errors.FailedPrecondition,
    "UNAVAILABLE": errors.Unavailable,
})

# A message goes back in gRPC metadata (8 KiB limit by default) and into the sender's terminal:
# messages quote at most a short preview of any value, and this caps what is left.
MAX_MESSAGE_BYTES = 1024
# An absolute filesystem path: never shown to a remote caller (it would map the server's disk).
_SERVER_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\",;:()\[\]]+")


def public_message(err: GaggleError) -> str:
    """`err`'s message as a remote caller may see it: server paths replaced, at most
    MAX_MESSAGE_BYTES of UTF-8."""
    text = _SERVER_PATH.sub("<path>", str(err))
    data = text.encode("utf-8", errors="replace")
    if len(data) <= MAX_MESSAGE_BYTES:
        return text
    return data[:MAX_MESSAGE_BYTES - 4].decode("utf-8", errors="ignore") + " ..."


def status_code(err: GaggleError) -> grpc.StatusCode:
    """The gRPC status code a GaggleError is answered with."""
    return getattr(grpc.StatusCode, err.status, grpc.StatusCode.INTERNAL)


def abort(context: grpc.ServicerContext, err: GaggleError) -> NoReturn:
    """End the RPC with `err`'s status, message, class and field. Raises, never returns."""
    trailers = [(ERROR_CLASS_KEY, type(err).__name__)]
    if err.field:
        trailers.append((ERROR_FIELD_KEY, err.field[:100]))
    context.set_trailing_metadata(tuple(trailers))
    context.abort(status_code(err), public_message(err))
    raise AssertionError("context.abort returned")  # grpc always raises; keeps typing honest


def from_rpc_error(err: grpc.RpcError) -> GaggleError:
    """Turn a failed call back into the typed error the server raised, with its message."""
    code: grpc.StatusCode = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or ""
    trailers = dict(err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else {}
    cls = _CLASSES.get(trailers.get(ERROR_CLASS_KEY, ""))
    if cls is None:
        cls = _DEFAULT_FOR_STATUS.get(code.name, GaggleError)
        details = _explain_transport(code, details)
    return cls(details, field=trailers.get(ERROR_FIELD_KEY))


def _explain_transport(code: grpc.StatusCode, details: str) -> str:
    """A message for statuses that came from the transport, not from gaggle's handlers."""
    hints = {
        grpc.StatusCode.UNAVAILABLE: "the coordinator is unreachable: check --coordinator "
                                     "HOST:PORT, that it is running, and TLS settings "
                                     "(--tls-ca for a TLS coordinator)",
        grpc.StatusCode.UNAUTHENTICATED: "the coordinator refused the token: pass --token or "
                                         "set GAGGLE_TOKEN",
        grpc.StatusCode.DEADLINE_EXCEEDED: "the coordinator did not answer in time",
        grpc.StatusCode.UNIMPLEMENTED: "the coordinator does not offer this call: it runs an "
                                       "older or newer gaggle",
    }
    hint = hints.get(code)
    text = f"{code.name}: {details}" if details else code.name
    return f"{text} ({hint})" if hint else text
