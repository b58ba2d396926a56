"""GaggleError <-> gRPC status: every error class survives the round trip with its message."""

from __future__ import annotations

import grpc
import pytest

from protocol import errors
from protocol.status import (
    ERROR_CLASS_KEY,
    ERROR_FIELD_KEY,
    MAX_MESSAGE_BYTES,
    from_rpc_error,
    public_message,
    status_code,
)

CLASSES = [c for c in vars(errors).values()
           if isinstance(c, type) and issubclass(c, errors.GaggleError)]


class FailedCall(grpc.RpcError):
    """What a grpc stub raises, reduced to the three things from_rpc_error reads."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers=()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_error_round_trips_with_its_class_status_and_field(cls):
    err = cls("what went wrong and how to fix it", field="some.field")
    code = status_code(err)
    assert code.name == cls.status
    back = from_rpc_error(FailedCall(code, str(err), (
        (ERROR_CLASS_KEY, cls.__name__), (ERROR_FIELD_KEY, "some.field"))))
    assert type(back) is cls
    assert str(back) == "what went wrong and how to fix it" and back.field == "some.field"


def test_fingerprint_mismatch_is_failed_precondition():
    assert status_code(errors.FingerprintMismatch("x")) == grpc.StatusCode.FAILED_PRECONDITION


def test_transport_failures_get_a_typed_error_and_a_hint():
    back = from_rpc_error(FailedCall(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert isinstance(back, errors.Unavailable)
    assert "connection refused" in str(back) and "--coordinator" in str(back)
    unknown = from_rpc_error(FailedCall(grpc.StatusCode.DATA_LOSS, ""))
    assert type(unknown) is errors.GaggleError and "DATA_LOSS" in str(unknown)


def test_public_message_hides_server_paths_and_keeps_the_rest():
    err = errors.InvalidBundle("/srv/gaggle/store/staging/u1/adapter.safetensors: bad header; "
                               "see models:/gaggle-router and alice/sentiment (/tmp/x)")
    assert public_message(err) == ("<path>: bad header; see models:/gaggle-router and "
                                   "alice/sentiment (<path>)")


def test_public_message_is_cut_to_its_byte_limit_on_a_character_boundary():
    message = public_message(errors.InvalidArgument("\u00e9" * 5000))
    assert len(message.encode("utf-8")) <= MAX_MESSAGE_BYTES and message.endswith(" ...")
    assert message.startswith("\u00e9" * 100)
