"""Abuse: slow drips, per-contributor upload limits, the store quota, admin-only calls and
rate-limited failed authentications, against real servers."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contributor.client import Connection, CoordinatorClient
from coordinator.cli import main as coordinator_cli
from coordinator.server import CoordinatorServer, ServerConfig
from coordinator.service.auth import FailureLimiter, TokenBook
from coordinator.store.experts import Store
from coordinator.store.versions import VersionStore
from protocol.gaggle.v1 import gaggle_pb2 as pb
from protocol.gaggle.v1 import gaggle_pb2_grpc
from routing.version import VersionManifest
from tests.harness.bundles import archive_id, archive_name, archive_of, make_bundle, store_snapshot
from tests.harness.servers import add_token, seed_base_spec, start_coordinator


def _meta(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def test_failure_limiter_counts_per_host_in_a_sliding_window():
    limiter = FailureLimiter(max_failures=3, window_s=10)
    for second in range(3):
        assert not limiter.blocked("ipv4:10.0.0.1:5000", now=second)
        limiter.record(f"ipv4:10.0.0.1:{5000 + second}", now=second)  # any port: same host
    assert limiter.blocked("ipv4:10.0.0.1:6000", now=3)
    assert not limiter.blocked("ipv4:10.0.0.2:5000", now=3)
    assert not limiter.blocked("ipv4:10.0.0.1:6000", now=10.5)  # the first one left


@pytest.fixture
def in_process(tmp_path, tiny_spec):
    """A started in-process server (assembly off) with a contributor and an admin token."""
    store = Store(tmp_path / "store")
    store.cache_base_spec(tiny_spec)
    book = TokenBook(store)
    tokens = {"alice": book.add("alice"), "ops": book.add("ops", role="admin")}
    store.close()
    server = CoordinatorServer(ServerConfig(store=tmp_path / "store", base="tiny-llama",
                                            port=0, assembly=False, auth_max_failures=3))
    server.start()
    yield server, tokens
    server.stop()


def test_failed_authentications_are_logged_with_the_peer_and_rate_limited(in_process,
                                                                         caplog):
    server, tokens = in_process
    caplog.set_level(logging.WARNING, logger="coordinator.service.auth")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = gaggle_pb2_grpc.CoordinatorStub(channel)
        for forged in ("gg_000000000000_" + "x" * 43, "nonsense", None):
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetFederation(pb.GetFederationRequest(), timeout=10,
                                   metadata=_meta(forged) if forged else None)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Three failures from this host: further failures are limited, not logged...
        with pytest.raises(grpc.RpcError) as limited:
            stub.GetFederation(pb.GetFederationRequest(), metadata=_meta("nonsense"),
                               timeout=10)
        assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many failed authentications" in limited.value.details()
        # ...and a good token from the same host still passes: it may be a shared NAT.
        federation = stub.GetFederation(pb.GetFederationRequest(),
                                        metadata=_meta(tokens["alice"]), timeout=10)
        assert federation.contributor == "alice"
    refusals = [r.getMessage() for r in caplog.records if "refused call from" in r.getMessage()]
    assert len(refusals) == 3 and all("127.0.0.1" in line for line in refusals)


def _commit_fake_version(root, version_id: str) -> None:
    VersionStore(root).commit(VersionManifest(version_id=version_id, base_model="tiny-llama",
                                              fingerprint="0" * 64, experts=(),
                                              created_at="2026-01-01T00:00:00Z"))


def test_health_watch_answers_only_for_served_names_and_keeps_no_entry_for_others(in_process):
    server, _ = in_process
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        for i in range(20):  # no token needed, and each name is new
            with pytest.raises(grpc.RpcError) as err:
                next(stub.Watch(health_pb2.HealthCheckRequest(service=f"made-up-{i}" * 500),
                                timeout=10))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert f"has no service 'made-up-{i}" in err.value.details()
            assert len(err.value.details()) < 300
    # grpc's servicer keeps a callback table keyed by watched name: only served names are in it
    assert set(server.health._send_response_callbacks) <= server.health.services


def test_a_failing_token_store_gives_a_bounded_unavailable_and_logs_the_cause(
        in_process, monkeypatch, caplog):
    server, tokens = in_process
    caplog.set_level(logging.ERROR, logger="coordinator.service.auth")

    def locked(self, token):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(TokenBook, "verify", locked)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = gaggle_pb2_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetFederation(pb.GetFederationRequest(), metadata=_meta(tokens["alice"]),
                               timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "could not check your token just now" in err.value.details()
    assert "database is locked" not in err.value.details()  # the cause stays in the log
    assert "database is locked" in caplog.text


def test_admin_calls_need_an_admin_token(in_process):
    server, tokens = in_process
    _commit_fake_version(server.store.root, "abcdef0123456789")
    calls = (("AddToken", pb.AddTokenRequest(name="mallory", admin=True)),
             ("RevokeToken", pb.RevokeTokenRequest(name="ops")),
             ("ListTokens", pb.ListTokensRequest()),
             ("Promote", pb.PromoteRequest(version="abcdef")))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        admin = gaggle_pb2_grpc.AdminStub(channel)
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as denied:
                getattr(admin, method)(request, metadata=_meta(tokens["alice"]), timeout=10)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
            assert "--admin" in denied.value.details()
        assert VersionStore(server.store.root).champion_id() is None
        assert [h.name for h in admin.ListTokens(pb.ListTokensRequest(),
                                                 metadata=_meta(tokens["ops"]),
                                                 timeout=10).holders] == ["alice", "ops"]
        issued = admin.AddToken(pb.AddTokenRequest(name="bob"), metadata=_meta(tokens["ops"]),
                                timeout=10)
        assert issued.role == "contributor"
        coordinator = gaggle_pb2_grpc.CoordinatorStub(channel)
        assert coordinator.GetFederation(pb.GetFederationRequest(), timeout=10,
                                         metadata=_meta(issued.token)).contributor == "bob"
        promoted = admin.Promote(pb.PromoteRequest(version="abcdef"),
                                 metadata=_meta(tokens["ops"]), timeout=10)
        assert promoted.version_id == "abcdef0123456789" and promoted.sequence == 1
        assert VersionStore(server.store.root).champion_id() == "abcdef0123456789"
        assert admin.RevokeToken(pb.RevokeTokenRequest(name="bob"), timeout=10,
                                 metadata=_meta(tokens["ops"])).revoked == 1
        with pytest.raises(grpc.RpcError) as revoked:
            coordinator.GetFederation(pb.GetFederationRequest(), timeout=10,
                                      metadata=_meta(issued.token))
        assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_silent_streams_are_cancelled_and_one_contributor_holds_few_calls(tmp_path, tiny_spec):
    # Two streams that never send their first message hold two of alice's calls; her third
    # is refused at the cap while bob is served, and the stall timer frees her slots.
    store = Store(tmp_path / "store")
    store.cache_base_spec(tiny_spec)
    book = TokenBook(store)
    alice, bob = book.add("alice"), book.add("bob")
    store.close()
    server = CoordinatorServer(ServerConfig(
        store=tmp_path / "store", base="tiny-llama", port=0, assembly=False,
        stream_idle_timeout_s=1.0, max_calls_per_contributor=2))
    server.start()
    hold, outcomes = threading.Event(), []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = gaggle_pb2_grpc.CoordinatorStub(channel)

            def silent():
                def nothing():
                    hold.wait(30)
                    yield from ()
                try:
                    stub.WriteUpload(nothing(), metadata=_meta(alice), timeout=30)
                except grpc.RpcError as err:
                    outcomes.append(err.code())

            threads = [threading.Thread(target=silent) for _ in range(2)]
            began = time.monotonic()
            for thread in threads:
                thread.start()
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as capped:
                stub.GetFederation(pb.GetFederationRequest(), metadata=_meta(alice), timeout=10)
            assert capped.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "alice has 2 calls in flight already" in capped.value.details()
            assert stub.GetFederation(pb.GetFederationRequest(), metadata=_meta(bob),
                                      timeout=10).contributor == "bob"
            for thread in threads:
                thread.join(15)
            assert outcomes == [grpc.StatusCode.CANCELLED] * 2
            assert time.monotonic() - began < 10  # the 1 s stall timer, not the 30 s hold
            assert stub.GetFederation(pb.GetFederationRequest(), metadata=_meta(alice),
                                      timeout=10).contributor == "alice"
    finally:
        hold.set()
        server.stop()


def test_token_add_admin_issues_an_admin_token(tmp_path, capsys):
    assert coordinator_cli(["token", "add", "ops", "--admin", "--store", str(tmp_path)]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    store = Store(tmp_path)
    try:
        assert TokenBook(store).verify(token).role == "admin"
    finally:
        store.close()


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory, tiny_spec):
    """A server process with a 1 s stream idle timeout, 2 worker threads, 2 uploads per
    contributor and a store quota of about three archives."""
    root = tmp_path_factory.mktemp("abuse")
    archives = [archive_of(make_bundle(root / f"b{i}", tiny_spec, f"b{i}", seed=i))
                for i in range(4)]
    quota = int(3.5 * max(len(a) for a in archives))
    config = root / "serve.toml"
    config.write_text(f"stream_idle_timeout_s = 1.0\nmax_workers = 2\n"
                      f"max_concurrent_uploads = 2\nstore_quota_bytes = {quota}\n")
    seed_base_spec(root / "store", tiny_spec)
    server = start_coordinator(root / "store", extra_args=("--no-assembly", "--config",
                                                           str(config)))
    yield server, archives, root
    server.stop()


def _start(stub, token: str, archive: bytes) -> pb.StartUploadResponse:
    return stub.StartUpload(pb.StartUploadRequest(
        size_bytes=len(archive), expert_id=archive_id(archive), name=archive_name(archive)),
        metadata=_meta(token), timeout=10)


def test_slow_drips_time_out_free_their_threads_and_stay_within_the_limits(strict_server):
    server, archives, root = strict_server
    dripper, alice = add_token(server.store, "dripper"), add_token(server.store, "alice")
    outcomes: list[grpc.StatusCode] = []
    with server.channel() as channel:
        stub = gaggle_pb2_grpc.CoordinatorStub(channel)
        uploads = [_start(stub, dripper, archives[i]) for i in (0, 1)]

        def drip(upload_id: str, archive: bytes) -> None:
            def chunks():
                yield pb.WriteUploadRequest(upload_id=upload_id, data=archive[:10])
                time.sleep(30)  # and then nothing: both worker threads are held
            try:
                stub.WriteUpload(chunks(), metadata=_meta(dripper), timeout=60)
            except grpc.RpcError as err:
                outcomes.append(err.code())

        threads = [threading.Thread(target=drip, args=(u.upload_id, archives[i]))
                   for i, u in enumerate(uploads)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        # Of the server's two threads one may hold an upload stream: the drip holds it (the
        # other drip is refused at once, UNAVAILABLE, to be retried), alice's stream is
        # refused until the stall timeout gives the thread back, and her client retries.
        with CoordinatorClient(Connection(server.address, alice, timeout_s=20)) as client:
            client.submit(root / "b2")
        assert time.monotonic() - began < 15
        for thread in threads:
            thread.join(10)
        assert sorted(code.name for code in outcomes) == ["CANCELLED", "UNAVAILABLE"]
        # The drips' uploads stay open: the contributor is at its limit of two...
        with pytest.raises(grpc.RpcError) as limited:
            _start(stub, dripper, archives[3])
        assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "unfinished uploads" in limited.value.details()
        # ...and the store quota (two open uploads + one expert, of ~3.5) refuses a fourth.
        before = store_snapshot(server.store)
        with pytest.raises(grpc.RpcError) as full:
            _start(stub, alice, archives[3])
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "quota" in full.value.details()
        assert store_snapshot(server.store) == before
        # A drip can still be resumed from where it stopped and finished.
        committed = {u.upload_id: stub.QueryUpload(
            pb.QueryUploadRequest(upload_id=u.upload_id), metadata=_meta(dripper),
            timeout=10).committed_bytes for u in uploads}
        assert sorted(committed.values()) == [0, 10]
        first = next(upload for upload, size in committed.items() if size == 10)
        archive = archives[[u.upload_id for u in uploads].index(first)]
        stub.WriteUpload(iter([pb.WriteUploadRequest(upload_id=first, offset=10,
                                                     data=archive[10:])]),
                         metadata=_meta(dripper), timeout=10)
        done = stub.FinishUpload(pb.FinishUploadRequest(upload_id=first),
                                 metadata=_meta(dripper), timeout=30)
        assert done.expert.contributor == "dripper"
    assert server.process.poll() is None
