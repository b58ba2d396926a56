"""`submit --limit-rate`: the archive goes out in messages of a tenth of a second's worth, so
the pace is even instead of a whole file (up to one upload chunk) in each burst."""

from __future__ import annotations

from contributor.client import _Upload
from protocol.archive import BundleArchive
from tests.harness.bundles import make_bundle


def _messages(bundle, limit_rate):
    archive = BundleArchive.of(bundle)
    upload = _Upload(None, archive, "id", "e", chunk_bytes=1 << 20, limit_rate=limit_rate,
                     progress=False)
    return archive, list(upload._chunks("upload-1", 0))


def test_a_paced_upload_sends_a_tenth_of_a_second_per_message(tmp_path, tiny_spec):
    bundle = make_bundle(tmp_path / "b", tiny_spec, "e")
    archive, paced = _messages(bundle, limit_rate=100_000)  # 10,000 bytes per message
    assert archive.size < 1 << 20  # one chunk would have held it all
    assert len(paced) >= 2 and all(0 < len(m.data) <= 10_000 for m in paced)
    ends = [m.offset + len(m.data) for m in paced]
    assert [m.offset for m in paced] == [0, *ends[:-1]] and ends[-1] == archive.size
    assert b"".join(m.data for m in paced) == b"".join(archive.blocks(0))
    _, unpaced = _messages(bundle, limit_rate=None)
    assert len(unpaced[0].data) > 10_000  # unpaced, the first file goes in one message
    assert b"".join(m.data for m in unpaced) == b"".join(m.data for m in paced)
