"""Protocol-level calls a hostile or careless client makes, against a real `serve` process
with the bare generated stubs: role changes, version ids, failed authentications from a
shared host, and cancelling uploads."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from contributor.cli import main as contributor_cli
from coordinator.service.auth import TokenBook
from coordinator.store.experts import Store
from coordinator.store.layout import Layout
from coordinator.store.versions import CHAMPION
from protocol.gaggle.v1 import gaggle_pb2 as pb
from protocol.gaggle.v1 import gaggle_pb2_grpc
from tests.harness.bundles import archive_id, archive_of, make_bundle
from tests.harness.servers import add_token, seed_base_spec, start_coordinator, wait_for

MAX_UPLOADS = 2
MAX_FAILURES = 10  # the server's default: failed authentications per host and minute


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_spec):
    root = tmp_path_factory.mktemp("hostile-calls")
    config = root / "serve.toml"
    config.write_text(f"max_concurrent_uploads = {MAX_UPLOADS}\n")
    seed_base_spec(root / "store", tiny_spec)
    process = start_coordinator(root / "store", extra_args=("--no-assembly", "--config",
                                                            str(config)))
    store = Store(root / "store")
    admin = TokenBook(store).add("ops", role="admin")
    store.close()
    yield process, admin
    log = process.log()
    process.stop()
    # Every call in this module is answered with a status, none with a crash.
    assert "Traceback" not in log and "StatusCode.INTERNAL" not in log, log[-4000:]


def _meta(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_token_roles_change_only_explicitly(server):
    process, admin = server
    with process.channel() as channel:
        stub = gaggle_pb2_grpc.AdminStub(channel)

        def add(name: str, *, admin_role: bool = False, rotate: bool = False):
            return stub.AddToken(pb.AddTokenRequest(name=name, admin=admin_role,
                                                    rotate=rotate),
                                 metadata=_meta(admin), timeout=10)

        assert add("carol").role == "contributor"
        # Asking a contributor token for an admin's name used to hand out an admin token.
        assert _code(lambda: add("ops")) == grpc.StatusCode.ALREADY_EXISTS
        assert _code(lambda: add("ops", rotate=True)) == grpc.StatusCode.FAILED_PRECONDITION
        assert _code(lambda: add("carol", admin_role=True, rotate=True)) == \
            grpc.StatusCode.FAILED_PRECONDITION
        rotated = add("ops", admin_role=True, rotate=True)
        assert rotated.role == "admin" and rotated.token != admin
        holders = {h.name: h for h in stub.ListTokens(pb.ListTokensRequest(),
                                                      metadata=_meta(admin)).holders}
    assert (holders["carol"].role, holders["carol"].live_tokens) == ("contributor", 1)
    assert (holders["ops"].role, holders["ops"].live_tokens) == ("admin", 2)


@pytest.mark.parametrize("version", ["../../x", "../versions/CHAMPION", "/etc", "ABCDEF",
                                     "0" * 17, "x" * 10_000, "",
                                     "0123456789abcdef\n", "abc\n"])
def test_promote_refuses_what_is_not_a_version_id(server, version):
    process, admin = server
    with process.channel() as channel:
        stub = gaggle_pb2_grpc.AdminStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Promote(pb.PromoteRequest(version=version, force=True),
                         metadata=_meta(admin), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert len(info.value.details().encode()) <= 1024
    assert not (Layout(process.store).versions / CHAMPION).exists()


def test_a_valid_token_passes_whatever_else_its_host_sent(server):
    process, _ = server
    token = add_token(process.store, "shared-nat")
    bad = "gg_000000000000_" + "A" * 43
    with process.channel() as channel:
        stub = gaggle_pb2_grpc.CoordinatorStub(channel)
        codes = [_code(lambda: stub.GetFederation(pb.GetFederationRequest(),
                                                  metadata=_meta(bad), timeout=10))
                 for _ in range(3 * MAX_FAILURES)]
        federation = stub.GetFederation(pb.GetFederationRequest(), metadata=_meta(token),
                                        timeout=10)
    assert codes[:MAX_FAILURES] == [grpc.StatusCode.UNAUTHENTICATED] * MAX_FAILURES
    assert set(codes[MAX_FAILURES:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert federation.contributor == "shared-nat"  # right after 30 failures from its host
    # Past the limit, failures are not logged one by one.
    assert process.log().count("refused call from") == MAX_FAILURES


def test_cancel_frees_the_slot_at_once_and_only_for_the_owner(server):
    process, _ = server
    alice, mallory = add_token(process.store, "alice-c"), add_token(process.store, "mallory")
    with process.channel() as channel:
        stub = gaggle_pb2_grpc.CoordinatorStub(channel)

        def start(token: str) -> pb.StartUploadResponse:
            return stub.StartUpload(pb.StartUploadRequest(
                size_bytes=4096, expert_id=secrets.token_hex(32), name="e"),
                metadata=_meta(token), timeout=10)

        uploads = [start(alice).upload_id for _ in range(MAX_UPLOADS)]
        assert _code(lambda: start(alice)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        cancel = pb.CancelUploadRequest(upload_id=uploads[0])
        # Another contributor learns nothing: the same answer as for an unknown id.
        assert _code(lambda: stub.CancelUpload(cancel, metadata=_meta(mallory), timeout=10)) \
            == grpc.StatusCode.NOT_FOUND
        stub.CancelUpload(cancel, metadata=_meta(alice), timeout=10)
        assert not (process.store / "uploads" / f"{uploads[0]}.part").exists()
        assert _code(lambda: stub.QueryUpload(pb.QueryUploadRequest(upload_id=uploads[0]),
                                              metadata=_meta(alice), timeout=10)) \
            == grpc.StatusCode.NOT_FOUND
        assert start(alice).upload_id  # the slot is free at once, not after the idle hour
        assert _code(lambda: stub.CancelUpload(cancel, metadata=_meta(alice), timeout=10)) \
            == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("upload_id", ["", "../uploads", "x" * 100_000, "\0"])
def test_cancel_of_what_is_not_an_upload_id_is_not_found_briefly(server, upload_id):
    process, _ = server
    token = add_token(process.store, "canceller-" + secrets.token_hex(4))
    with process.channel() as channel:
        stub = gaggle_pb2_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.CancelUpload(pb.CancelUploadRequest(upload_id=upload_id),
                              metadata=_meta(token), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
    assert len(info.value.details().encode()) <= 1024
    assert str(process.store) not in info.value.details()


def test_start_upload_refuses_an_expert_id_with_a_trailing_newline(server):
    process, _ = server
    token = add_token(process.store, "newliner")
    request = pb.StartUploadRequest(size_bytes=4096, expert_id=secrets.token_hex(32) + "\n",
                                    name="e")
    with process.channel() as channel:
        stub = gaggle_pb2_grpc.CoordinatorStub(channel)
        code = _code(lambda: stub.StartUpload(request, metadata=_meta(token), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_contributor_cancel_abandons_the_live_upload_of_a_bundle(server, tmp_path, tiny_spec,
                                                                 capsys):
    process, _ = server
    token = add_token(process.store, "canceller")
    bundle = make_bundle(tmp_path / "b", tiny_spec, "e")
    archive = archive_of(bundle)
    with process.channel() as channel:  # an upload interrupted after its first chunk
        stub = gaggle_pb2_grpc.CoordinatorStub(channel)
        start = stub.StartUpload(pb.StartUploadRequest(
            size_bytes=len(archive), expert_id=archive_id(archive), name="e"),
            metadata=_meta(token), timeout=10)
        stub.WriteUpload(iter([pb.WriteUploadRequest(upload_id=start.upload_id, offset=0,
                                                     data=archive[:1024])]),
                         metadata=_meta(token), timeout=10)
    argv = ["cancel", str(bundle), "--coordinator", process.address, "--token", token]
    assert contributor_cli(argv) == 0
    assert f"cancelled upload {start.upload_id}" in capsys.readouterr().out
    assert not (process.store / "uploads" / f"{start.upload_id}.part").exists()


def test_ctrl_c_during_submit_says_how_to_resume_or_cancel(server, tmp_path, tiny_spec, capsys):
    process, _ = server
    token = add_token(process.store, "interrupted")
    bundle = make_bundle(tmp_path / "b", tiny_spec, "e")
    uploads = process.store / "uploads"
    before = set(uploads.glob("*.part"))
    submit = subprocess.Popen(
        [str(Path(sys.executable).parent / "gaggle-contributor"), "submit", str(bundle),
         "--coordinator", process.address, "--token", token, "--limit-rate", "2000",
         "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a test run started in the background (`make test &`) ignores SIGINT, and so would
        # the child; a contributor at a terminal has it on
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: set(uploads.glob("*.part")) - before, 60, "no upload started")
        submit.send_signal(signal.SIGINT)
        _, err = submit.communicate(timeout=30)
    finally:
        submit.kill()
    assert submit.returncode == 130, err
    assert f"gaggle-contributor cancel {bundle}" in err and "Traceback" not in err
    argv = ["cancel", str(bundle), "--coordinator", process.address, "--token", token]
    assert contributor_cli(argv) == 0
    assert "cancelled upload" in capsys.readouterr().out
    assert set(uploads.glob("*.part")) == before
