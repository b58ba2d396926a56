"""No set of contributors within their limits starves the others, against a real `serve`:
four contributors hold every upload stream they may, each dripping a byte a second, while
health and a fifth contributor's calls are answered at once; empty messages keep no stream
alive, and a stream below the minimum rate is cancelled and can resume."""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protocol.gaggle.v1 import gaggle_pb2 as pb
from protocol.gaggle.v1 import gaggle_pb2_grpc
from tests.harness.bundles import archive_id, archive_name, archive_of, make_bundle
from tests.harness.servers import add_token, seed_base_spec, start_coordinator

CONFIG = """\
stream_idle_timeout_s = 6.0
upload_rate_grace_s = 4.0
min_upload_rate = 1000.0
"""


def _meta(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def _start(stub, token: str, archive: bytes) -> str:
    started = stub.StartUpload(pb.StartUploadRequest(
        size_bytes=len(archive), expert_id=archive_id(archive), name=archive_name(archive)),
        metadata=_meta(token), timeout=10)
    return started.upload_id


def _stream(stub, token: str, upload_id: str, messages, outcomes: list, stop: threading.Event):
    """WriteUpload from a generator of (offset, data) until `stop` or the server ends it."""
    def requests():
        for offset, data in messages:
            if stop.is_set():
                return
            yield pb.WriteUploadRequest(upload_id=upload_id, offset=offset, data=data)
            time.sleep(1.0)
    began = time.monotonic()
    try:
        stub.WriteUpload(requests(), metadata=_meta(token), timeout=120)
        outcomes.append(("OK", time.monotonic() - began))
    except grpc.RpcError as err:
        outcomes.append((err.code().name, time.monotonic() - began))


def test_slow_streams_of_four_contributors_starve_no_one(tmp_path, tiny_spec):
    root = tmp_path / "store"
    seed_base_spec(root, tiny_spec)
    names = ("c1", "c2", "c3", "c4", "other")
    tokens = {name: add_token(root, name) for name in names}
    (tmp_path / "serve.toml").write_text(CONFIG)
    server = start_coordinator(root, extra_args=("--config", str(tmp_path / "serve.toml"),
                                                 "--no-assembly"))
    stop, outcomes, threads = threading.Event(), [], []
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = gaggle_pb2_grpc.CoordinatorStub(channel)
            for n, name in enumerate(names[:4]):
                for i in range(4):  # the most calls a contributor may hold
                    archive = archive_of(make_bundle(tmp_path / f"{name}-{i}", tiny_spec,
                                                     f"{name}-{i}", seed=10 * n + i))
                    upload = _start(stub, tokens[name], archive)
                    drip = ((k, archive[k:k + 1]) for k in range(len(archive)))
                    threads.append(threading.Thread(target=_stream, args=(
                        stub, tokens[name], upload, drip, outcomes, stop)))
            for thread in threads:
                thread.start()
            time.sleep(2.0)  # every stream is open and dripping
            health = health_pb2_grpc.HealthStub(channel)
            began = time.monotonic()
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - began < 1.0
            began = time.monotonic()
            federation = stub.GetFederation(pb.GetFederationRequest(),
                                            metadata=_meta(tokens["other"]), timeout=5)
            assert federation.contributor == "other" and time.monotonic() - began < 2.0
            for thread in threads:
                thread.join(60)
        # streams past the server-wide cap were refused at once, to be retried; the rest
        # were cancelled for their rate once the grace period was over
        codes = sorted(code for code, _ in outcomes)
        assert len(codes) == 16 and set(codes) == {"CANCELLED", "UNAVAILABLE"}, outcomes
        assert codes.count("UNAVAILABLE") == 16 - 12
        assert max(seconds for code, seconds in outcomes if code == "CANCELLED") < 30
    finally:
        stop.set()
        assert server.stop() == 0, server.log()[-3000:]
    assert "under the minimum" in server.log()


def test_empty_messages_keep_no_stream_alive_and_a_cut_upload_resumes(tmp_path, tiny_spec):
    root = tmp_path / "store"
    seed_base_spec(root, tiny_spec)
    token = add_token(root, "alice")
    (tmp_path / "serve.toml").write_text(CONFIG)
    server = start_coordinator(root, extra_args=("--config", str(tmp_path / "serve.toml"),
                                                 "--no-assembly"))
    stop, outcomes = threading.Event(), []
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = gaggle_pb2_grpc.CoordinatorStub(channel)
            archive = archive_of(make_bundle(tmp_path / "b", tiny_spec, "b", seed=1))
            upload = _start(stub, token, archive)
            empty = ((0, b"") for _ in range(60))  # a message a second, no byte in any
            _stream(stub, token, upload, empty, outcomes, stop)
            code, seconds = outcomes[-1]
            assert code == "CANCELLED" and seconds < 6.0 + 5.0, outcomes  # idle: 6 s + sweep
            requests = iter([pb.WriteUploadRequest(upload_id=upload, offset=0, data=archive)])
            stub.WriteUpload(requests, metadata=_meta(token), timeout=30)  # it resumes
            done = stub.FinishUpload(pb.FinishUploadRequest(upload_id=upload),
                                     metadata=_meta(token), timeout=30)
            assert done.expert.expert_id == archive_id(archive)
    finally:
        stop.set()
        assert server.stop() == 0, server.log()[-3000:]
