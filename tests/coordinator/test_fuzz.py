"""Hostile input on the upload path: every corrupted upload gets a client-error status and
leaves the store as it was; the server process never crashes or hangs."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings

from coordinator.intake.uploads import UploadLimits, Uploads
from coordinator.store.experts import Store
from tests.harness.bundles import staging_is_empty, store_snapshot
from tests.harness.hostile import (
    CLIENT_ERRORS,
    check_stored,
    hostile_cases,
    run_in_process,
    run_over_grpc,
    valid_files,
)
from tests.harness.servers import add_token, seed_base_spec, start_coordinator, wait_serving

IN_PROCESS_CASES = 520
SERVER_CASES = 100
CASE_SECONDS = 20.0  # a case taking longer than this counts as a hang
def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    print_blob=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def material(tmp_path_factory, tiny_spec):
    return valid_files(tiny_spec, tmp_path_factory.mktemp("valid"))


@pytest.fixture(scope="module")
def fuzz_uploads(tmp_path_factory, tiny_spec):
    # On tmpfs when there is one: the cases fsync a dozen times each, and what is checked
    # here is validation, not the disk.
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="gaggle-fuzz-", dir=shm)) if shm.is_dir() \
        else tmp_path_factory.mktemp("fuzz")
    store = Store(root / "store")
    store.cache_base_spec(tiny_spec)
    yield Uploads(store, tiny_spec, UploadLimits(max_bundle_bytes=8 << 20))
    store.close()
    shutil.rmtree(root, ignore_errors=True)


def forget_experts(store: Store) -> None:
    """Empty the store after a case stored a valid bundle: uploads are declared by expert id,
    so a later case with the same manifest would be answered from the index at start, and
    its corrupted bytes would never be examined."""
    with store.transaction() as conn:
        conn.execute("DELETE FROM experts")
    for folder in store.layout.experts.iterdir():
        shutil.rmtree(folder)


def test_hostile_uploads_in_process_are_refused_and_change_nothing(fuzz_uploads, material,
                                                                   tiny_spec):
    seen: dict[str, int] = {}

    @fuzz_settings(IN_PROCESS_CASES)
    @given(case=hostile_cases(material))
    def check(case):
        before = store_snapshot(fuzz_uploads.store.root)
        began = time.monotonic()
        outcome = run_in_process(fuzz_uploads, case)
        assert time.monotonic() - began < CASE_SECONDS, f"{case.layer}/{case.what} hung"
        seen[outcome] = seen.get(outcome, 0) + 1
        if outcome in ("OK", "ALREADY_STORED"):
            check_stored(fuzz_uploads.store.root, tiny_spec)
            forget_experts(fuzz_uploads.store)
        else:
            assert outcome in CLIENT_ERRORS, f"{case.layer}/{case.what}: {outcome}"
            assert store_snapshot(fuzz_uploads.store.root) == before
        assert staging_is_empty(fuzz_uploads.store.root)

    check()
    assert sum(seen.values()) >= IN_PROCESS_CASES
    # A few mutations leave a valid bundle (reordered tar members, an unchecked peft field):
    # those may be stored; the rest must all be refused.
    refused = sum(n for status, n in seen.items() if status in CLIENT_ERRORS)
    assert refused >= 0.8 * IN_PROCESS_CASES, seen


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_spec):
    root = tmp_path_factory.mktemp("fuzz-server")
    config = root / "serve.toml"
    config.write_text("max_concurrent_uploads = 100000\nmax_bundle_bytes = 8388608\n")
    seed_base_spec(root / "store", tiny_spec)
    server = start_coordinator(root / "store", extra_args=("--no-assembly", "--config",
                                                           str(config)))
    yield server, add_token(server.store, "fuzzer")
    server.stop()


def test_hostile_uploads_over_grpc_never_crash_or_hang_the_server(fuzz_server, material,
                                                                  tiny_spec):
    server, token = fuzz_server
    seen: dict[str, int] = {}
    with server.channel() as channel:
        @fuzz_settings(SERVER_CASES)
        @given(case=hostile_cases(material))
        def check(case):
            before = store_snapshot(server.store)
            outcome = run_over_grpc(channel, token, case, timeout=CASE_SECONDS)
            seen[outcome] = seen.get(outcome, 0) + 1
            assert outcome in CLIENT_ERRORS | {"OK", "ALREADY_STORED"}, \
                f"{case.layer}/{case.what}: {outcome}"
            if outcome in CLIENT_ERRORS:
                assert store_snapshot(server.store) == before

        check()
    assert server.process.poll() is None, server.log()[-2000:]
    wait_serving(server, timeout=10)
    assert "Traceback" not in server.log(), server.log()[-3000:]
    check_stored(server.store, tiny_spec)
    assert sum(seen.values()) >= SERVER_CASES
    assert grpc.StatusCode.INTERNAL.name not in seen
