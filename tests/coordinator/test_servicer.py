"""The servicer in a real in-process gRPC server: the on-accepted hook, lookups, status codes."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from contributor.client import Connection, CoordinatorClient
from coordinator.server import CoordinatorServer, ServerConfig
from coordinator.service.auth import TokenBook
from coordinator.store.experts import ExpertRecord, Store
from protocol.bundle import GATES, load_bundle
from protocol.errors import NotFound
from protocol.gaggle.v1 import gaggle_pb2 as pb
from protocol.gaggle.v1 import gaggle_pb2_grpc
from tests.harness.bundles import (
    archive_id,
    archive_of,
    make_bundle,
    raw_upload,
    staging_is_empty,
    store_snapshot,
    tamper,
)


@pytest.fixture
def running(tmp_path, tiny_spec):
    """A started CoordinatorServer whose on-accepted hook records what it is given."""
    store = Store(tmp_path / "store")
    store.cache_base_spec(tiny_spec)
    token = TokenBook(store).add("alice")
    store.close()
    accepted: list[ExpertRecord] = []
    called = threading.Event()

    def hook(record: ExpertRecord) -> None:
        accepted.append(record)
        called.set()
        if record.name == "explodes":
            raise RuntimeError("a failing hook must not fail the submission")

    server = CoordinatorServer(ServerConfig(store=tmp_path / "store", base="tiny-llama",
                                            port=0), on_accepted=hook)
    server.start()
    yield server, token, accepted, called
    server.stop()


def test_on_accepted_gets_each_new_expert_once_after_commit(running, tmp_path, tiny_spec):
    server, token, accepted, called = running
    bundle = make_bundle(tmp_path / "b", tiny_spec, "hooked", seed=5)
    with CoordinatorClient(Connection(f"127.0.0.1:{server.port}", token)) as client:
        result = client.submit(bundle)
        assert called.wait(10)
        again = client.submit(bundle)
    time.sleep(0.2)  # a second (wrong) call would have landed by now
    assert again.already_stored and again.expert_id == result.expert_id
    [record] = accepted
    assert (record.expert_id, record.name, record.contributor) == \
        (result.expert_id, "hooked", "alice")
    folder = server.store.bundle_folder(record.expert_id)  # committed before the hook
    assert load_bundle(folder).expert_id == record.expert_id
    assert server.store.get_expert(record.expert_id) == record


def test_a_failing_hook_does_not_fail_the_submission(running, tmp_path, tiny_spec):
    server, token, accepted, called = running
    with CoordinatorClient(Connection(f"127.0.0.1:{server.port}", token)) as client:
        result = client.submit(make_bundle(tmp_path / "b", tiny_spec, "explodes"))
        assert called.wait(10)
        assert client.get_expert(result.expert_id).name == "explodes"


def test_lookups_of_unknown_things_are_not_found(running):
    server, token, _, _ = running
    with CoordinatorClient(Connection(f"127.0.0.1:{server.port}", token)) as client:
        with pytest.raises(NotFound, match="gaggle-coordinator experts"):
            client.get_expert("0" * 64)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = gaggle_pb2_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.QueryUpload(pb.QueryUploadRequest(upload_id="nope"),
                             metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_upload_with_a_zero_gate_is_invalid_argument_and_leaves_no_trace(running, tmp_path,
                                                                             tiny_spec):
    """An untrained gate would break routing for every later version: refused on arrival."""
    server, token, accepted, _ = running
    bundle = make_bundle(tmp_path / "b", tiny_spec, "untrained", seed=6)
    module = "model.layers.1.self_attn.v_proj"

    def zero_gate(tensors):
        tensors[module] = tensors[module].clone().zero_()

    tamper(bundle, GATES, zero_gate)
    before = store_snapshot(server.store.root)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        outcome = raw_upload(channel, token, archive_of(bundle))
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{GATES}: the gate of module {module} is all zero" in outcome.details
    assert "retrain the gate with gaggle-contributor gate" in outcome.details
    assert store_snapshot(server.store.root) == before and accepted == []
    assert staging_is_empty(server.store.root)
    assert not any(server.store.layout.uploads.iterdir())


def test_a_stream_without_upload_id_is_invalid_argument(running):
    server, token, _, _ = running
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = gaggle_pb2_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.WriteUpload(iter([pb.WriteUploadRequest(data=b"x")]),
                             metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "upload_id" in failed.value.details()


def test_a_silent_stream_is_cancelled_and_the_upload_can_resume(tmp_path, tiny_spec):
    store = Store(tmp_path / "store")
    store.cache_base_spec(tiny_spec)
    token = TokenBook(store).add("dripper")
    store.close()
    server = CoordinatorServer(ServerConfig(store=tmp_path / "store", base="tiny-llama",
                                            port=0, stream_idle_timeout_s=0.5))
    server.start()
    archive = archive_of(make_bundle(tmp_path / "b", tiny_spec, "drip"))
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = gaggle_pb2_grpc.CoordinatorStub(channel)
            start = stub.StartUpload(pb.StartUploadRequest(
                size_bytes=len(archive), expert_id=archive_id(archive),
                name="drip"), metadata=metadata, timeout=10)

            def drip():
                yield pb.WriteUploadRequest(upload_id=start.upload_id, data=archive[:100])
                time.sleep(4)  # then nothing: the server must not wait for us

            began = time.monotonic()
            with pytest.raises(grpc.RpcError) as stalled:
                stub.WriteUpload(drip(), metadata=metadata, timeout=30)
            assert stalled.value.code() == grpc.StatusCode.CANCELLED
            assert time.monotonic() - began < 3.5
            query = pb.QueryUploadRequest(upload_id=start.upload_id)
            assert stub.QueryUpload(query, metadata=metadata, timeout=10).committed_bytes == 100
            stub.WriteUpload(iter([pb.WriteUploadRequest(
                upload_id=start.upload_id, offset=100, data=archive[100:])]),
                metadata=metadata, timeout=10)
            done = stub.FinishUpload(pb.FinishUploadRequest(upload_id=start.upload_id),
                                     metadata=metadata, timeout=30)
            assert done.expert.name == "drip" and not done.already_stored
    finally:
        server.stop()
