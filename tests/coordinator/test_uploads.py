"""The upload state machine and the store's crash recovery, in-process on a real store."""

from __future__ import annotations

import io
import sqlite3
import tarfile
import time

import pytest

from coordinator.intake.uploads import FinishResult, UploadLimits, Uploads
from coordinator.intake.writer import UploadState
from coordinator.store.experts import ExpertRecord, Store
from protocol.archive import ArchiveDigest, extract_members
from protocol.bundle import GATES, load_bundle
from protocol.errors import (
    FailedPrecondition,
    InvalidBundle,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from tests.harness.bundles import archive_id, archive_of, make_bundle, store_snapshot

LIMITS = UploadLimits(max_bundle_bytes=1 << 20, max_concurrent_uploads=2, idle_timeout_s=60)


@pytest.fixture
def uploads(tmp_path, tiny_spec) -> Uploads:
    store = Store(tmp_path / "store")
    yield Uploads(store, tiny_spec, LIMITS)
    store.close()


@pytest.fixture
def archive(tmp_path, tiny_spec) -> bytes:
    return archive_of(make_bundle(tmp_path / "bundle", tiny_spec, "unit", seed=7))


def begin(uploads: Uploads, archive: bytes, who: str = "alice") -> UploadState:
    state = uploads.start(who, len(archive), archive_id(archive), "unit")
    assert isinstance(state, UploadState)
    return state


def write(uploads: Uploads, state: UploadState, data: bytes, offset: int,
          who: str = "alice", chunk: int = 4096) -> int:
    with uploads.writer(state.upload_id, who) as writer:
        for start in range(0, len(data), chunk):
            writer.append(offset + start, data[start:start + chunk])
    return writer.offset


def test_upload_in_chunks_is_stored_under_its_expert_id(uploads, archive, tmp_path):
    state = begin(uploads, archive)
    assert write(uploads, state, archive, 0) == len(archive)
    result = uploads.finish(state.upload_id, "alice")
    assert isinstance(result, FinishResult) and not result.already_stored
    stored = uploads.store.bundle_folder(result.expert.expert_id)
    assert load_bundle(stored, uploads.base).expert_id == result.expert.expert_id
    assert [e.expert_id for e in uploads.store.list_experts()] == [result.expert.expert_id]
    assert uploads.store.query("SELECT COUNT(*) FROM uploads")[0][0] == 0
    assert not list(uploads.store.layout.uploads.iterdir())


def test_a_file_that_differs_from_its_manifest_hash_is_refused_and_leaves_no_trace(
        uploads, tmp_path, tiny_spec):
    # The hash compared with manifest.files is the one taken while the bytes streamed in.
    bundle = make_bundle(tmp_path / "stale", tiny_spec, "stale", seed=3)
    gates = (bundle / GATES).read_bytes()
    (bundle / GATES).write_bytes(gates[:-4] + bytes(4))  # same size, other content
    archive = archive_of(bundle)
    before = store_snapshot(uploads.store.root)
    state = begin(uploads, archive)
    write(uploads, state, archive, 0, chunk=1000)
    with pytest.raises(InvalidBundle, match=f"{GATES}: sha256 does not match"):
        uploads.finish(state.upload_id, "alice")
    assert store_snapshot(uploads.store.root) == before
    assert not list(uploads.store.layout.uploads.iterdir())
    assert not list(uploads.store.layout.staging.iterdir())


def test_an_upload_declared_under_another_name_than_its_manifest_is_refused(uploads, archive):
    # The declared name is what the coordinator logs while the bytes stream in; the stored
    # expert carries the manifest's. They must be one name.
    before = store_snapshot(uploads.store.root)
    state = uploads.start("alice", len(archive), archive_id(archive), "someone-else")
    write(uploads, state, archive, 0)
    with pytest.raises(InvalidBundle, match="started for the expert 'someone-else' but its "
                                            "manifest names 'unit'") as err:
        uploads.finish(state.upload_id, "alice")
    assert err.value.field == "name"
    assert store_snapshot(uploads.store.root) == before
    assert not list(uploads.store.layout.uploads.iterdir())


def test_chunk_at_another_offset_is_out_of_range_and_names_the_committed_one(uploads,
                                                                            archive):
    state = begin(uploads, archive)
    write(uploads, state, archive[:5000], 0)
    with pytest.raises(OutOfRange, match="resume from offset 5000"):
        write(uploads, state, archive[6000:7000], 6000)
    assert uploads.status(state.upload_id, "alice").committed_bytes == 5000


def test_finishing_an_incomplete_upload_keeps_it_resumable(uploads, archive):
    state = begin(uploads, archive)
    write(uploads, state, archive[:1000], 0)
    with pytest.raises(FailedPrecondition, match="from offset 1000"):
        uploads.finish(state.upload_id, "alice")
    write(uploads, state, archive[1000:], 1000)
    assert not uploads.finish(state.upload_id, "alice").already_stored


def test_restarted_coordinator_resumes_an_upload_from_its_committed_bytes(uploads, archive,
                                                                          tiny_spec):
    state = begin(uploads, archive)
    write(uploads, state, archive[:9000], 0)
    # A fresh store and uploads object, as after a crash: no in-memory state survives.
    restarted = Uploads(Store(uploads.store.root, recover=True), tiny_spec, LIMITS)
    again = begin(restarted, archive)
    assert (again.upload_id, again.committed_bytes) == (state.upload_id, 9000)
    write(restarted, again, archive[9000:], 9000)
    assert not restarted.finish(again.upload_id, "alice").already_stored


def test_uploads_are_private_to_their_contributor(uploads, archive):
    state = begin(uploads, archive)
    with pytest.raises(NotFound):
        uploads.status(state.upload_id, "mallory")
    with pytest.raises(NotFound):
        write(uploads, state, archive, 0, who="mallory")


def test_limits_on_concurrent_uploads_and_store_quota(uploads, tmp_path, tiny_spec):
    archives = [archive_of(make_bundle(tmp_path / f"b{i}", tiny_spec, f"b{i}", seed=i))
                for i in range(3)]
    begin(uploads, archives[0])
    begin(uploads, archives[1])
    with pytest.raises(ResourceExhausted, match="unfinished uploads"):
        begin(uploads, archives[2])
    begin(uploads, archives[2], who="bob")  # the limit is per contributor
    quota = Uploads(uploads.store, uploads.base,
                    UploadLimits(quota_bytes=uploads.store.stored_bytes() + 10))
    with pytest.raises(ResourceExhausted, match="quota"):
        begin(quota, archives[0], who="carol")


def test_idle_uploads_expire_and_free_their_slot(uploads, archive):
    state = begin(uploads, archive)
    write(uploads, state, archive[:100], 0)
    assert uploads.expire(now=time.time() + 30) == []
    assert uploads.expire(now=time.time() + LIMITS.idle_timeout_s + 1) == [state.upload_id]
    assert not uploads.part_path(state.upload_id).exists()
    with pytest.raises(NotFound, match="expired"):
        uploads.status(state.upload_id, "alice")


def test_same_content_in_another_archive_is_answered_at_start(uploads, archive):
    first = begin(uploads, archive)
    write(uploads, first, archive, 0)
    stored = uploads.finish(first.upload_id, "alice").expert
    # Same files, another tar dialect: other archive bytes, same expert id, so the stored
    # expert is the answer before a byte is sent.
    members = tarfile.open(fileobj=io.BytesIO(archive))
    other = io.BytesIO()
    with tarfile.open(fileobj=other, mode="w", format=tarfile.GNU_FORMAT) as out:
        for member in members.getmembers():
            member.mtime = 12345
            out.addfile(member, members.extractfile(member))
    other_bytes = other.getvalue()
    assert other_bytes != archive
    before = store_snapshot(uploads.store.root)
    answer = uploads.start("bob", len(other_bytes), archive_id(other_bytes), "unit")
    assert isinstance(answer, ExpertRecord) and answer.expert_id == stored.expert_id
    assert answer.contributor == "alice"
    assert store_snapshot(uploads.store.root) == before
    assert uploads.store.query("SELECT COUNT(*) FROM uploads")[0][0] == 0


def _crash_after_rename(uploads: Uploads, archive: bytes) -> str:
    """Play a commit up to the rename into experts/, then stop as a crash would."""
    state = begin(uploads, archive)
    write(uploads, state, archive, 0)
    staged = uploads.store.layout.staging / state.upload_id
    part = uploads.part_path(state.upload_id)
    digest = ArchiveDigest()  # the coordinator's own extraction path
    digest.update(part.read_bytes())
    extract_members(part, digest.members(1 << 20), staged)
    expert_id = load_bundle(staged, uploads.base).expert_id
    with uploads.store.transaction() as conn:
        conn.execute("UPDATE uploads SET committing_expert_id = ? WHERE upload_id = ?",
                     (expert_id, state.upload_id))
    staged.rename(uploads.store.layout.experts / expert_id)
    return expert_id


def test_recovery_indexes_an_expert_renamed_before_its_index_commit(uploads, archive,
                                                                    tiny_spec):
    expert_id = _crash_after_rename(uploads, archive)
    assert uploads.store.list_experts() == []
    recovered = Store(uploads.store.root)
    recovered.recover(tiny_spec)
    [record] = recovered.list_experts()
    assert (record.expert_id, record.contributor) == (expert_id, "alice")
    assert recovered.query("SELECT COUNT(*) FROM uploads")[0][0] == 0
    assert not list(recovered.layout.uploads.iterdir())


def test_recovery_removes_unclaimed_folders_orphan_parts_and_staging(uploads, archive):
    stray = uploads.store.layout.experts / ("f" * 64)
    stray.mkdir()
    (stray / "manifest.json").write_text("{}")
    (uploads.store.layout.uploads / "orphan.part").write_bytes(b"x" * 10)
    (uploads.store.layout.staging / "half").mkdir()
    live = begin(uploads, archive)
    recovered = Store(uploads.store.root, recover=True)
    assert not stray.exists()
    assert not (recovered.layout.uploads / "orphan.part").exists()
    assert not any(recovered.layout.staging.iterdir())
    assert uploads.part_path(live.upload_id).exists()  # a live upload is kept


def test_base_spec_is_cached_and_a_switch_is_refused_once_experts_exist(uploads, archive,
                                                                        tiny_spec):
    store = uploads.store
    assert store.base_spec("tiny-llama") == tiny_spec  # loaded once, then from base.json
    assert store.cached_base_spec() == tiny_spec
    state = begin(uploads, archive)
    write(uploads, state, archive, 0)
    uploads.finish(state.upload_id, "alice")
    other = type(tiny_spec)(name="other", fingerprint="0" * 64, linears=tiny_spec.linears)
    with pytest.raises(FailedPrecondition, match="--base tiny-llama"):
        store.cache_base_spec(other)


def test_a_declared_expert_id_other_than_the_manifests_is_refused_and_leaves_no_trace(
        uploads, archive):
    before = store_snapshot(uploads.store.root)
    state = uploads.start("alice", len(archive), "ab" * 32, "unit")
    write(uploads, state, archive, 0)
    with pytest.raises(InvalidBundle, match="not the declared abababababab"):
        uploads.finish(state.upload_id, "alice")
    assert store_snapshot(uploads.store.root) == before
    assert not list(uploads.store.layout.uploads.iterdir())
    assert not list(uploads.store.layout.staging.iterdir())


def test_an_index_from_before_expert_id_declarations_is_migrated(tmp_path):
    root = tmp_path / "old"
    root.mkdir()
    with sqlite3.connect(root / "index.sqlite") as conn:
        conn.executescript("""
            CREATE TABLE experts (expert_id TEXT PRIMARY KEY, name TEXT NOT NULL,
                contributor TEXT NOT NULL, method TEXT NOT NULL, archive_sha256 TEXT NOT NULL,
                size_bytes INTEGER NOT NULL, num_modules INTEGER NOT NULL,
                created_at REAL NOT NULL);
            CREATE INDEX experts_by_archive ON experts(archive_sha256);
            CREATE TABLE uploads (upload_id TEXT PRIMARY KEY, contributor TEXT NOT NULL,
                name TEXT NOT NULL, size_bytes INTEGER NOT NULL, sha256 TEXT NOT NULL,
                created_at REAL NOT NULL, updated_at REAL NOT NULL,
                committing_expert_id TEXT);
            INSERT INTO experts VALUES ('e1', 'kept', 'alice', 'lora', 'aa', 10, 2, 1.0);
            INSERT INTO uploads VALUES ('u1', 'alice', 'live', 10, 'bb', 1.0, 1.0, NULL);
        """)
    store = Store(root)
    try:
        (kept,) = store.list_experts()
        assert (kept.expert_id, kept.name, kept.size_bytes) == ("e1", "kept", 10)
        columns = {row[1] for row in store.query("PRAGMA table_info(experts)")}
        assert "archive_sha256" not in columns
        # An upload declared by archive hash can no longer be finished: it is dropped, and
        # its contributor's next submit starts afresh.
        assert store.query("SELECT COUNT(*) FROM uploads")[0][0] == 0
        assert "expert_id" in {row[1] for row in store.query("PRAGMA table_info(uploads)")}
    finally:
        store.close()
    Store(root).close()  # opening a migrated index again changes nothing
