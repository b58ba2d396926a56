"""The committed gRPC code matches gaggle.proto under the pinned grpcio-tools."""

from __future__ import annotations

from protocol.gaggle.v1 import gaggle_pb2
from protocol.generate import main, stale_files


def test_generated_code_is_up_to_date():
    assert stale_files() == [], "run `python -m protocol.generate` and commit the result"
    assert main(["--check"]) == 0


def test_service_offers_the_documented_calls():
    service = gaggle_pb2.DESCRIPTOR.services_by_name["Coordinator"]
    assert service.full_name == "gaggle.v1.Coordinator"
    assert {m.name for m in service.methods} == {
        "GetFederation", "StartUpload", "WriteUpload", "QueryUpload", "FinishUpload",
        "CancelUpload", "ListExperts", "GetExpert"}
    write = service.methods_by_name["WriteUpload"]
    assert write.client_streaming and not write.server_streaming
