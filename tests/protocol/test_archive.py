"""The archive read straight from a bundle's files, and parsed and hashed as it streams in."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
import torch

from protocol.archive import (
    ArchiveDigest,
    BundleArchive,
    extract_members,
    pack_bundle_bytes,
)
from protocol.bundle import ADAPTER, GATES, MANIFEST, load_bundle, save_bundle
from protocol.errors import InvalidBundle
from routing.synthetic import random_bundle


@pytest.fixture
def bundle_dir(tiny_spec, tmp_path):
    bundle = random_bundle(tiny_spec, "expert", with_activations=True)
    return save_bundle(bundle, tmp_path / "bundle")


def tar_of(bundle_dir) -> bytes:
    """The archive as tarfile itself writes it: the reference `BundleArchive` must match."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(bundle_dir.iterdir()):
            info = tarfile.TarInfo(path.name)
            info.size, info.mode = path.stat().st_size, 0o644
            with open(path, "rb") as handle:
                tar.addfile(info, handle)
    return buffer.getvalue()


def digest_of(archive: bytes, chunk: int) -> ArchiveDigest:
    digest = ArchiveDigest()
    for start in range(0, len(archive), chunk):
        digest.update(archive[start:start + chunk])
    return digest


def test_archive_read_from_the_files_is_the_tarfile_archive(bundle_dir):
    reference = tar_of(bundle_dir)
    archive = BundleArchive.of(bundle_dir)
    assert archive.size == len(reference)
    assert pack_bundle_bytes(bundle_dir) == reference


@pytest.mark.parametrize("offset", [0, 1, 511, 512, 513, 5000, -1])
@pytest.mark.parametrize("block_bytes", [7, 512, 4096, 1 << 20])
def test_blocks_resume_at_any_offset_and_never_exceed_the_block(bundle_dir, offset,
                                                                 block_bytes):
    reference = tar_of(bundle_dir)
    start = offset % len(reference)
    blocks = list(BundleArchive.of(bundle_dir).blocks(start, block_bytes))
    assert b"".join(blocks) == reference[start:]
    assert all(0 < len(block) <= block_bytes for block in blocks)


def test_blocks_refuse_a_file_that_shrank_after_hashing(bundle_dir):
    archive = BundleArchive.of(bundle_dir)
    (bundle_dir / GATES).write_bytes(b"short")
    with pytest.raises(InvalidBundle, match="shrank"):
        list(archive.blocks())


@pytest.mark.parametrize("chunk", [1, 100, 512, 4096, 1 << 20])
def test_digest_hashes_each_file_whatever_the_chunking(bundle_dir, chunk):
    archive = tar_of(bundle_dir)
    digest = digest_of(archive, chunk)
    assert digest.covers(len(archive))
    members = digest.members(max_bytes=len(archive))
    assert [m.name for m in members] == sorted(p.name for p in bundle_dir.iterdir())
    for member in members:
        content = (bundle_dir / member.name).read_bytes()
        assert archive[member.offset:member.offset + member.size] == content
        assert member.sha256 == hashlib.sha256(content).hexdigest()


def test_a_copied_digest_continues_on_its_own(bundle_dir):
    archive = tar_of(bundle_dir)
    digest = digest_of(archive[:700], 100)
    copy = digest.copy()
    copy.update(archive[700:])
    digest.update(b"something else")
    assert copy.covers(len(archive)) and not digest.covers(len(archive))
    assert copy.members(len(archive)) == digest_of(archive, 4096).members(len(archive))


def _tar(members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT,
         kind=tarfile.REGTYPE) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


HOSTILE = {
    "unknown name": (_tar([("notes.txt", b"x")]), "only regular files"),
    "path": (_tar([("../" + MANIFEST, b"x")]), "only regular files"),
    "long name (GNU)": (_tar([("a" * 150, b"x")], tarfile.GNU_FORMAT), "only regular files"),
    "pax header": (_tar([("é", b"x")], tarfile.PAX_FORMAT), "only regular files"),
    "symlink": (_tar([(MANIFEST, b"")], kind=tarfile.SYMTYPE), "only regular files"),
    "duplicate": (_tar([(MANIFEST, b"{}"), (MANIFEST, b"{}")]), "twice"),
    "truncated": (_tar([(ADAPTER, b"x" * 3000)])[:2000], "ends inside adapter"),
    "bad checksum": (b"\x01" + _tar([(MANIFEST, b"{}")])[1:], "checksum"),
    "data after the end": (_tar([(MANIFEST, b"{}")]) + b"\x01", "after its end"),
    "garbage": (b"\xff" * 4096, "checksum"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_digest_refuses_what_is_not_a_plain_bundle_archive(case):
    archive, message = HOSTILE[case]
    digest = digest_of(archive, 1000)
    assert digest.covers(len(archive))  # fed to the end all the same
    with pytest.raises(InvalidBundle, match=message):
        digest.members(max_bytes=1 << 20)


def test_digest_accepts_another_tar_dialect_and_enforces_the_size_cap(bundle_dir):
    files = [(p.name, p.read_bytes()) for p in sorted(bundle_dir.iterdir())]
    archive = _tar(files, tarfile.GNU_FORMAT)
    members = digest_of(archive, 4096).members(max_bytes=len(archive))
    assert [m.name for m in members] == [name for name, _ in files]
    with pytest.raises(InvalidBundle, match="over the 100 limit"):
        digest_of(archive, 4096).members(max_bytes=100)


def test_extracted_files_are_the_hashed_bytes_and_load(bundle_dir, tiny_spec, tmp_path):
    archive = tar_of(bundle_dir)
    (tmp_path / "upload.part").write_bytes(archive)
    members = digest_of(archive, 4096).members(max_bytes=len(archive))
    out = extract_members(tmp_path / "upload.part", members, tmp_path / "staged")
    for member in members:
        assert (out / member.name).read_bytes() == (bundle_dir / member.name).read_bytes()
    known = {m.name: m.sha256 for m in members}
    mapped = load_bundle(out, tiny_spec, known_sha256=known, mapped=True)
    read = load_bundle(bundle_dir, tiny_spec)
    assert mapped.expert_id == read.expert_id
    assert all(torch.equal(mapped.adapter[k], read.adapter[k]) for k in read.adapter)


def test_load_bundle_checks_known_hashes_against_the_manifest(bundle_dir, tiny_spec):
    with pytest.raises(InvalidBundle, match="sha256 does not match"):
        load_bundle(bundle_dir, tiny_spec, known_sha256={ADAPTER: "0" * 64})
