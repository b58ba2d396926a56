"""Hostile uploads: hypothesis strategies that corrupt a valid bundle at every layer, and
runners that push one case through the coordinator's own upload path.

Layers: the manifest (fields, types, sizes, raw JSON), its schema (every field made huge,
nested, duplicated, of the wrong type, given an extra sibling key, or a number that is not
finite in float32), a safetensors file (header length,
offsets, dtypes, shapes, tensor names, bytes), the tar archive (member names with path
separators, links, devices, duplicates, lying sizes, truncation) and the byte stream
(truncated, reordered or misplaced chunks, a lying size or expert id). Used by
tests/coordinator/test_fuzz.py and bench/fuzz.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from coordinator.intake.uploads import Uploads
from coordinator.store.experts import ExpertRecord
from protocol.bundle import ADAPTER, GATES, MANIFEST, BaseSpec, load_bundle, save_bundle
from protocol.errors import GaggleError
from routing.synthetic import random_bundle
from tests.harness.bundles import archive_id, archive_name

# What a hostile upload may be answered with: the client's fault, never the server's.
CLIENT_ERRORS = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE",
                           "RESOURCE_EXHAUSTED", "NOT_FOUND"})
HOSTILE_NAMES = ("../escape", "../../index.sqlite", "/etc/passwd", "a/b", "a\\b", "x\x00y",
                 "line\nbreak", "tab\there", "\x1b[31mred", "..", ".", "", " ", "é" * 70,
                 "a" * 300, "CON", "\u202egnp.exe", "manifest.json/", "./manifest.json",
                 "model.layers.0.self_attn.q_proj/../../x", "\x7f", "null\x00")
SAFE_TAR_NAMES = tuple(n for n in HOSTILE_NAMES if "\x00" not in n and n)
DTYPES = ("F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "XYZ", "", 5, None)
HUGE = (2**63 - 1, 2**64, 2**40, 10**30, -1, -(2**63))


def json_values(max_leaves: int = 8) -> st.SearchStrategy:
    """Any JSON value, with the awkward ones up front: huge ints, inf, hostile strings."""
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE + (10**400,)),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
        st.sampled_from(HOSTILE_NAMES))
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=max_leaves)


@dataclass(frozen=True)
class Case:
    """One hostile upload: what is declared, and the chunks actually sent."""

    layer: str  # what was corrupted: manifest, safetensors, tar, stream
    what: str  # the mutation, for the counts
    size_bytes: int  # declared archive size
    expert_id: str  # declared expert id (the manifest's sha256)
    name: str  # declared upload name
    chunks: tuple[tuple[int, bytes], ...]  # (offset, data) in sending order

    def __repr__(self) -> str:  # short: failure reports must not print megabytes
        sent = [(offset, len(data)) for offset, data in self.chunks][:6]
        return (f"Case({self.layer}/{self.what}, size={self.size_bytes}, "
                f"id={self.expert_id[:12]!r}, name={self.name[:20]!r}, chunks={sent}...)")


def valid_files(spec: BaseSpec, folder: Path) -> list[dict[str, bytes]]:
    """The files of two valid bundles (LoRA and (IA)^3) for `spec`: what mutations start from."""
    out = []
    for method, seed in (("lora", 1), ("ia3", 2)):
        bundle_dir = save_bundle(random_bundle(spec, f"fuzz-{method}", method=method, seed=seed,
                                               rank=2), folder / method, overwrite=True)
        out.append({p.name: p.read_bytes() for p in sorted(bundle_dir.iterdir())})
    return out


# -- safetensors -------------------------------------------------------------------------

def split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def join_safetensors(header: dict, data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


@st.composite
def corrupt_safetensors(draw, blob: bytes) -> tuple[str, bytes]:
    """(mutation name, corrupted file) of a valid safetensors file."""
    header, data = split_safetensors(blob)
    keys = sorted(k for k in header if k != "__metadata__")
    key = draw(st.sampled_from(keys))
    entry = header[key]
    what = draw(st.sampled_from((
        "header_length", "offsets_out_of_range", "offsets_reversed", "offsets_overlap",
        "dtype", "dtype_same_bytes", "shape", "tensor_name", "drop_field", "metadata",
        "truncate", "append", "nan", "header_garbage", "late_duplicate")))
    if what == "header_length":
        return what, join_safetensors(header, data, draw(st.sampled_from(
            (2**63 - 1, 2**40, len(json.dumps(header)) + 4096, 0, 1, 7))))
    if what == "offsets_out_of_range":
        entry["data_offsets"] = [entry["data_offsets"][0],
                                 len(data) + draw(st.integers(1, 2**40))]
    elif what == "offsets_reversed":
        entry["data_offsets"] = entry["data_offsets"][::-1]
    elif what == "offsets_overlap":
        other = header[draw(st.sampled_from(keys))]
        entry["data_offsets"] = list(other["data_offsets"])
    elif what == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPES))
    elif what == "dtype_same_bytes":  # a consistent file whose dtype is simply not float32
        entry["dtype"] = draw(st.sampled_from(("I32", "U32")))
    elif what == "shape":
        entry["shape"] = draw(st.one_of(st.sampled_from(
            ([2**40, 2**40], [-1], [0], ["a"], [[1]], None, [2**64])),
            st.lists(st.integers(0, 64), max_size=4)))
    elif what == "tensor_name":
        header[draw(st.sampled_from(HOSTILE_NAMES))] = header.pop(key)
    elif what == "drop_field":
        entry.pop(draw(st.sampled_from(("dtype", "shape", "data_offsets"))))
    elif what == "metadata":
        header["__metadata__"] = draw(json_values())
    elif what == "truncate":
        full = join_safetensors(header, data)
        return what, full[:draw(st.integers(0, len(full) - 1))]
    elif what == "append":
        return what, join_safetensors(header, data) + draw(st.binary(min_size=1, max_size=64))
    elif what == "nan":
        position = draw(st.integers(0, len(data) // 4 - 1)) * 4
        pattern = draw(st.sampled_from((b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f",
                                        b"\x00\x00\x80\xff")))
        data = data[:position] + pattern + data[position + 4:]
    elif what == "late_duplicate":  # many metadata keys, the first one again at the end
        text = json.dumps(header | {"__metadata__": {f"k{i}": "" for i in range(150_000)}})
        text = text[:-2] + ', "k0": "x"}}'
        return what, struct.pack("<Q", len(text)) + text.encode() + data
    elif what == "header_garbage":
        text = json.dumps(header).encode()
        noise = draw(st.binary(min_size=len(text), max_size=len(text)))
        return what, struct.pack("<Q", len(text)) + noise + data
    return what, join_safetensors(header, data)


# -- manifest ----------------------------------------------------------------------------

_FIELD_PATHS = ("name", "method", "format_version", "base_model", "base_model.name",
                "base_model.fingerprint", "peft", "peft.rank", "peft.scaling", "peft.alpha",
                "modules", "modules.0", "modules.0.name", "modules.0.kind", "modules.0.d_in",
                "modules.0.d_out", "training", "training.expert_steps", "training.note",
                "files", "files.adapter.safetensors", "extra")


def _set_path(manifest: dict, path: str, value, delete: bool) -> None:
    parts = path.split(".", 1) if not path.startswith("files.") else ["files", path[6:]]
    target = manifest
    if len(parts) == 2 and parts[0] != "files" and "." in parts[1] and parts[0] == "modules":
        index, rest = parts[1].split(".", 1)
        target, parts = manifest["modules"][int(index)], [rest]
    elif len(parts) == 2 and parts[0] == "modules":
        target, parts = manifest["modules"], [int(parts[1])]
    elif len(parts) == 2:
        target, parts = manifest.setdefault(parts[0], {}), [parts[1]]
        if not isinstance(target, dict):
            return
    if delete:
        if isinstance(target, list):
            target.pop(parts[0])
        else:
            target.pop(parts[0], None)
    else:
        target[parts[0]] = value


@st.composite
def corrupt_manifest(draw, blob: bytes) -> tuple[str, bytes]:
    """(mutation name, corrupted manifest.json)."""
    what = draw(st.sampled_from(("set", "set", "set", "delete", "hostile_name",
                                 "hostile_module", "raw")))
    manifest = json.loads(blob)
    if what == "set":
        _set_path(manifest, draw(st.sampled_from(_FIELD_PATHS)), draw(json_values()), False)
    elif what == "delete":
        _set_path(manifest, draw(st.sampled_from(_FIELD_PATHS)), None, True)
    elif what == "hostile_name":
        manifest["name"] = draw(st.sampled_from(HOSTILE_NAMES))
    elif what == "hostile_module":
        module = manifest["modules"][draw(st.integers(0, len(manifest["modules"]) - 1))]
        module[draw(st.sampled_from(("name", "kind", "d_in", "d_out")))] = draw(st.one_of(
            st.sampled_from(HOSTILE_NAMES), st.sampled_from(HUGE), st.just(True)))
    else:
        raw = draw(st.sampled_from(("deep", "utf8", "truncated", "bom", "huge", "root",
                                    "empty", "huge_int", "escaped_quotes", "late_duplicate")))
        return f"raw_{raw}", _raw_manifest(raw, blob, draw)
    try:
        return what, json.dumps(manifest, indent=1).encode()
    except (ValueError, OverflowError):
        return what, blob  # the value cannot be written as JSON: nothing corrupted


# -- manifest, schema-aware ---------------------------------------------------------------

SCHEMA_MUTATIONS = ("huge", "nested", "duplicated", "wrong_type", "extra_key",
                    "non_finite_after_cast")
# Values that are finite as float64 but not once cast to float32, or not numbers JSON allows.
NON_FINITE_AFTER_CAST = (1e39, -1e39, 3.5e38, 2**64, 2**128, 10**40)


def schema_paths(manifest: dict) -> list[tuple]:
    """Every field of a manifest as a key path: ("peft", "rank"), ("modules", 0, "d_in")..."""
    paths: list[tuple] = []

    def walk(node, path: tuple) -> None:
        if path:
            paths.append(path)
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, path + (key,))
        elif isinstance(node, list):
            for index, value in enumerate(node[:2]):  # two entries of a list stand for all
                walk(value, path + (index,))

    walk(manifest, ())
    return paths


def _replace(manifest: dict, path: tuple, value) -> None:
    target = manifest
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _lookup(manifest: dict, path: tuple):
    for key in path:
        manifest = manifest[key]
    return manifest


@st.composite
def corrupt_schema(draw, blob: bytes) -> tuple[str, bytes]:
    """(mutation name, manifest.json) with one field of the schema broken in one way."""
    manifest = json.loads(blob)
    path = draw(st.sampled_from(schema_paths(manifest)))
    what = draw(st.sampled_from(SCHEMA_MUTATIONS))
    value = _lookup(manifest, path)
    label = f"{what}:{'.'.join(str(p) for p in path[:2])}"
    if what == "huge":
        _replace(manifest, path, draw(st.sampled_from((
            "x" * 100_000, [1.0] * 20_000, {f"k{i}": i for i in range(5_000)}))))
    elif what == "nested":
        depth = draw(st.sampled_from((4, 50, 300, 600)))
        _replace(manifest, path, json.loads("[" * depth + json.dumps(value) + "]" * depth))
    elif what == "wrong_type":
        _replace(manifest, path, draw(st.sampled_from((
            "1", [value], {"v": value}, True, None, 1.5, -1))))
    elif what == "extra_key":
        parent = _lookup(manifest, path[:-1]) if isinstance(path[-1], str) else manifest
        parent[draw(st.sampled_from(("note", "text", "x" * 300, "__proto__")))] = \
            draw(st.sampled_from(("secret text", 1, [1], {"a": 1})))
    elif what == "non_finite_after_cast":
        _replace(manifest, path, draw(st.sampled_from(NON_FINITE_AFTER_CAST)))
    text = json.dumps(manifest)
    if what == "duplicated":  # the same key twice in one object: parsers disagree on which
        key = json.dumps(path[-1]) if isinstance(path[-1], str) else '"name"'
        text = text.replace(f"{key}: ", f"{key}: {json.dumps(draw(json_values(2)))}, "
                            f"{key}: ", 1)
    return label, text.encode()


def _raw_manifest(kind: str, blob: bytes, draw) -> bytes:
    if kind == "deep":
        depth = draw(st.sampled_from((1000, 100_000)))
        return b"[" * depth + b"]" * depth
    if kind == "utf8":
        return blob[:20] + b"\xff\xfe\x80" + blob[20:]
    if kind == "truncated":
        return blob[:draw(st.integers(0, len(blob) - 1))]
    if kind == "bom":
        return b"\xef\xbb\xbf" + blob
    if kind == "huge":  # over the manifest size cap, still valid JSON
        return blob[:-2] + b" " * (4 * 1024 * 1024) + blob[-2:]
    if kind == "huge_int":
        return blob.replace(b'"format_version": 1', b'"format_version": ' + b"9" * 5000)
    if kind == "escaped_quotes":  # a string that never closes: a backtracking scan is quadratic
        return b'{"name": "' + b'\\"' * (1900 * 1024)
    if kind == "late_duplicate":  # 150k keys, the first one again at the end
        keys = b", ".join(b'"k%d": 1' % i for i in range(150_000))
        return blob[:-1] + b", " + keys + b', "k0": 2}'
    if kind == "root":
        return draw(st.sampled_from((b"[]", b"null", b"1", b'"x"', b"{}")))
    return b""


# -- tar archive -------------------------------------------------------------------------

@dataclass
class Member:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""


def write_tar(members: list[Member], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type, info.linkname, info.mode = member.type, member.linkname, 0o644
            info.size = len(member.data) if member.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(member.data) if info.size else None)
    return buffer.getvalue()


def _lie_about_size(archive: bytes, size: int) -> bytes:
    """Rewrite the first header's size field (and its checksum) to `size`."""
    header = bytearray(archive[:512])
    header[124:136] = f"{size:011o}\x00".encode()[-12:].rjust(12, b"0")
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\x00 ".encode()
    return bytes(header) + archive[512:]


@st.composite
def corrupt_tar(draw, files: dict[str, bytes]) -> tuple[str, bytes]:
    """(mutation name, archive) with a hostile tar structure around valid files."""
    members = [Member(name, data) for name, data in sorted(files.items())]
    what = draw(st.sampled_from((
        "hostile_name", "extra_member", "drop_member", "duplicate", "symlink", "hardlink",
        "directory", "fifo", "chardev", "reorder", "size_lie", "truncate", "flip", "garbage",
        "gzip", "pax")))
    index = draw(st.integers(0, len(members) - 1))
    if what == "hostile_name":
        members[index].name = draw(st.sampled_from(SAFE_TAR_NAMES))
    elif what == "extra_member":
        members.append(Member(draw(st.sampled_from(SAFE_TAR_NAMES + ("notes.txt",))), b"x"))
    elif what == "drop_member":
        members.pop(index)
    elif what == "duplicate":
        members.append(Member(members[index].name, b"{}"))
    elif what in ("symlink", "hardlink"):
        members[index] = Member(members[index].name, type=tarfile.SYMTYPE if what == "symlink"
                                else tarfile.LNKTYPE,
                                linkname=draw(st.sampled_from(("/etc/passwd",
                                                               "../../index.sqlite",
                                                               "manifest.json"))))
    elif what in ("directory", "fifo", "chardev"):
        members[index] = Member(members[index].name, type={
            "directory": tarfile.DIRTYPE, "fifo": tarfile.FIFOTYPE,
            "chardev": tarfile.CHRTYPE}[what])
    elif what == "reorder":
        members = draw(st.permutations(members))
    archive = write_tar(members, tarfile.PAX_FORMAT if what == "pax" else tarfile.GNU_FORMAT)
    if what == "size_lie":
        archive = _lie_about_size(archive, draw(st.sampled_from((2**33 - 1, 10**9,
                                                                  len(archive) * 2))))
    elif what == "truncate":
        archive = archive[:draw(st.integers(1, len(archive) - 1))]
    elif what == "flip":
        position = draw(st.integers(0, min(len(archive), 2048) - 1))
        archive = (archive[:position] + bytes([archive[position] ^ draw(st.integers(1, 255))])
                   + archive[position + 1:])
    elif what == "garbage":
        archive = draw(st.binary(min_size=1, max_size=4096))
    elif what == "gzip":
        archive = gzip.compress(archive)
    return what, archive


# -- the whole case ----------------------------------------------------------------------

def refresh_hash(files: dict[str, bytes], name: str) -> None:
    """Put a changed tensor file's sha256 into the manifest, so the parser, not the hash
    check, meets the corruption."""
    manifest = json.loads(files[MANIFEST])
    manifest["files"][name] = hashlib.sha256(files[name]).hexdigest()
    files[MANIFEST] = json.dumps(manifest, indent=1).encode()


def chunked(archive: bytes, size: int) -> list[tuple[int, bytes]]:
    return [(i, archive[i:i + size]) for i in range(0, len(archive), size)] or [(0, b"")]


@st.composite
def stream_case(draw, layer: str, what: str, archive: bytes,
                honest: bool = False) -> Case:
    """Send `archive`, honestly or with a broken stream or declaration."""
    chunks = chunked(archive, draw(st.sampled_from((512, 4096, 1 << 20))))
    digest = archive_id(archive)
    size, name = len(archive), archive_name(archive)
    if not honest:
        layer, what = "stream", draw(st.sampled_from((
            "truncated", "reordered", "wrong_offset", "duplicate", "size_larger",
            "size_smaller", "wrong_id", "bad_id", "bad_name", "wrong_name", "oversized",
            "zero_size")))
        if what == "truncated":
            chunks = chunked(archive[:draw(st.integers(0, len(archive) - 1))], 4096)
        elif what == "reordered" and len(chunks) > 1:
            chunks = chunks[1:] + chunks[:1]
        elif what == "wrong_offset":
            i = draw(st.integers(0, len(chunks) - 1))
            offset = chunks[i][0] + draw(st.sampled_from((-1, 1, 4096, -4096, 2**40, -(2**40))))
            chunks[i] = (offset, chunks[i][1])
        elif what == "duplicate":
            i = draw(st.integers(0, len(chunks) - 1))
            chunks.insert(i + 1, chunks[i])
        elif what == "size_larger":
            size += draw(st.integers(1, 10_000))
        elif what == "size_smaller":
            size = draw(st.integers(1, len(archive) - 1))
        elif what == "wrong_id":  # well formed, but not this bundle's
            digest = hashlib.sha256(archive).hexdigest()
        elif what == "bad_id":
            digest = draw(st.sampled_from((digest.upper(), digest[:63], "", "../" * 21 + "x",
                                           digest + "0")))
        elif what == "bad_name":
            name = draw(st.sampled_from(("x\x00y", "line\nbreak", "a" * 100, "\x1b[2J")))
        elif what == "wrong_name":  # well formed, but not the manifest's
            name = draw(st.sampled_from(("fuzz", name + "-2")))
        elif what == "oversized":
            size = 2**40
        elif what == "zero_size":
            size = draw(st.sampled_from((0, -1, -(2**62))))
    return Case(layer, what, size, digest, name, tuple(chunks))


@st.composite
def hostile_cases(draw, material: list[dict[str, bytes]]) -> Case:
    """A hostile upload: one layer corrupted (manifest, its schema, safetensors, tar or
    stream)."""
    files = dict(draw(st.sampled_from(material)))
    layer = draw(st.sampled_from(("manifest", "schema", "safetensors", "tar", "stream")))
    what = "none"
    if layer == "manifest":
        what, files[MANIFEST] = draw(corrupt_manifest(files[MANIFEST]))
    elif layer == "schema":
        what, files[MANIFEST] = draw(corrupt_schema(files[MANIFEST]))
    elif layer == "safetensors":
        target = draw(st.sampled_from((ADAPTER, GATES)))
        what, files[target] = draw(corrupt_safetensors(files[target]))
        if draw(st.integers(0, 4)):  # mostly: the hash matches, the parser must catch it
            refresh_hash(files, target)
        else:
            what += "+stale_hash"
    if layer == "tar":
        what, archive = draw(corrupt_tar(files))
    else:
        archive = write_tar([Member(n, d) for n, d in sorted(files.items())])
    return draw(stream_case(layer, what, archive, honest=layer != "stream"))


# -- running a case ----------------------------------------------------------------------

def run_in_process(uploads: Uploads, case: Case, contributor: str = "fuzzer") -> str:
    """Push a case through Uploads (start, write, finish), as the servicer does.

    Returns "OK", "ALREADY_STORED" or the status name of the GaggleError it raised; any
    other exception escapes (the servicer would answer INTERNAL: a bug). Whatever upload
    the case left open is discarded afterwards, as expiry would.
    """
    upload_id = None
    try:
        started = uploads.start(contributor, case.size_bytes, case.expert_id, case.name)
        if isinstance(started, ExpertRecord):
            return "ALREADY_STORED"
        upload_id = started.upload_id
        with uploads.writer(upload_id, contributor) as writer:
            for offset, data in case.chunks:
                writer.append(offset, data)
        uploads.finish(upload_id, contributor)
        return "OK"
    except GaggleError as err:
        return err.status
    finally:
        if upload_id is not None:
            uploads.expire(now=time.time() + 10 * uploads.limits.idle_timeout_s)


def run_over_grpc(channel, token: str, case: Case, timeout: float = 30.0) -> str:
    """Push a case through a real server with the bare stub; the status name ("OK" if stored)."""
    import grpc

    from protocol.gaggle.v1 import gaggle_pb2 as pb
    from protocol.gaggle.v1 import gaggle_pb2_grpc

    stub = gaggle_pb2_grpc.CoordinatorStub(channel)
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        start = stub.StartUpload(pb.StartUploadRequest(
            size_bytes=case.size_bytes, expert_id=case.expert_id, name=case.name),
            metadata=metadata, timeout=timeout)
        if start.HasField("existing"):
            return "ALREADY_STORED"
        requests = [pb.WriteUploadRequest(upload_id=start.upload_id, offset=offset, data=data)
                    for offset, data in case.chunks]
        stub.WriteUpload(iter(requests), metadata=metadata, timeout=timeout)
        stub.FinishUpload(pb.FinishUploadRequest(upload_id=start.upload_id),
                          metadata=metadata, timeout=timeout)
    except grpc.RpcError as err:
        return err.code().name
    return "OK"


def check_stored(store_root: Path, base: BaseSpec) -> None:
    """Every indexed expert's folder loads and verifies (after a case that was accepted)."""
    import sqlite3

    with sqlite3.connect(store_root / "index.sqlite") as conn:
        ids = [row[0] for row in conn.execute("SELECT expert_id FROM experts")]
    for expert_id in ids:
        assert load_bundle(store_root / "experts" / expert_id, base).expert_id == expert_id

