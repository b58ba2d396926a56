"""Talking to a coordinator: compatibility check, resumable upload, listing; `submit`/`status`.

`submit` checks the bundle against the federation (GetFederation) before sending a byte,
declares it by its expert id (the sha256 of its manifest, which holds the sha256 of every
tensor file, so no tensor is read twice), and uploads its deterministic archive in chunks
read straight from the bundle's files (no archive is written first). A dropped connection or
a restarted coordinator is survived: after a pause (exponential backoff) it asks for the
committed offset and sends only the rest. The bundle folder must stay unchanged until submit
returns: a changed file no longer matches the manifest, and the coordinator refuses the
upload.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from protocol.archive import BundleArchive
from protocol.errors import (
    FingerprintMismatch,
    GaggleError,
    InvalidArgument,
    InvalidBundle,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from protocol.gaggle.v1 import gaggle_pb2 as pb
from protocol.gaggle.v1 import gaggle_pb2_grpc
from protocol.manifest import MANIFEST, Manifest, parse_manifest
from protocol.status import from_rpc_error

# Statuses after which the upload is resumed: the connection, not the request, failed.
# OUT_OF_RANGE and NOT_FOUND mid-upload mean our view of the upload is stale: re-sync.
_RESUMABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED",
                        "UNKNOWN", "OUT_OF_RANGE"})


@dataclass(frozen=True)
class Connection:
    """How to reach a coordinator."""

    address: str  # HOST:PORT
    token: str | None  # contributor token, sent as 'authorization: Bearer TOKEN'
    tls_ca: Path | None = None  # CA that signed the coordinator's certificate; enables TLS
    tls_cert: Path | None = None  # client certificate, when the coordinator asks for one
    tls_key: Path | None = None  # its private key
    timeout_s: float = 60.0  # deadline of each non-streaming call


@dataclass(frozen=True)
class RetryPolicy:
    """How long `submit` keeps trying after dropped connections."""

    attempts: int = 8  # upload attempts in all, the first included
    first_delay_s: float = 0.5  # pause after the first failure; doubles each time
    max_delay_s: float = 8.0  # longest pause


@dataclass(frozen=True)
class SubmitResult:
    expert_id: str
    name: str
    already_stored: bool  # the coordinator had this content already; nothing was stored
    size_bytes: int  # archive size
    bytes_sent: int  # archive bytes sent over all attempts
    resumed_from: int  # offset the last attempt started from (0: not resumed)
    attempts: int
    seconds: dict[str, float] = field(default_factory=dict)  # transfer, finish


class CoordinatorClient:
    """A channel to one coordinator, with the token attached to every call."""

    def __init__(self, connection: Connection) -> None:
        if not connection.token:
            raise Unauthenticated("no token: pass --token or set GAGGLE_TOKEN (ask the "
                                  "coordinator's operator for one)", field="token")
        self.connection = connection
        self._metadata = (("authorization", f"Bearer {connection.token}"),)
        self._channel = _open_channel(connection)
        self._stub = gaggle_pb2_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata,
                                               timeout=self.connection.timeout_s)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def federation(self) -> pb.Federation:
        return self._call("GetFederation", pb.GetFederationRequest())

    def list_experts(self, contributor: str | None = None) -> list[pb.Expert]:
        request = pb.ListExpertsRequest(contributor=contributor or "")
        return list(self._call("ListExperts", request).experts)

    def get_expert(self, expert_id: str) -> pb.Expert:
        return self._call("GetExpert", pb.GetExpertRequest(expert_id=expert_id))

    def cancel(self, bundle_dir: str | Path) -> str | None:
        """Abandon the live upload of a bundle; the upload id cancelled, or None when the
        bundle is already stored. (StartUpload answers the live upload of the same bundle.)"""
        manifest = read_manifest(Path(bundle_dir))
        start = self.start_upload(BundleArchive.of(bundle_dir).size, manifest.expert_id,
                                  manifest.name)
        if start.HasField("existing"):
            return None
        self._call("CancelUpload", pb.CancelUploadRequest(upload_id=start.upload_id))
        return start.upload_id

    def start_upload(self, size_bytes: int, expert_id: str,
                     name: str) -> pb.StartUploadResponse:
        """Declare an upload: the live one of this bundle resumed, or the stored expert."""
        return self._call("StartUpload", pb.StartUploadRequest(
            size_bytes=size_bytes, expert_id=expert_id, name=name))

    def write_upload(self, chunks: Iterator[pb.WriteUploadRequest]) -> pb.UploadStatus:
        """Stream archive chunks (no deadline: a large bundle on a slow link takes long)."""
        try:
            return self._stub.WriteUpload(chunks, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def finish_upload(self, upload_id: str) -> pb.FinishUploadResponse:
        """Validate and store a fully written upload."""
        return self._call("FinishUpload", pb.FinishUploadRequest(upload_id=upload_id))

    def submit(self, bundle_dir: str | Path, *, progress: bool = False,
               limit_rate: float | None = None,
               retry: RetryPolicy = RetryPolicy()) -> SubmitResult:
        """Check and upload a bundle folder; return the expert id it is stored under."""
        manifest = read_manifest(Path(bundle_dir))
        federation = self.federation()
        check_compatible(manifest, federation)
        archive = BundleArchive.of(bundle_dir)
        if archive.size > federation.max_bundle_bytes:
            raise ResourceExhausted(
                f"the bundle's archive is {archive.size} bytes, over the coordinator's limit "
                f"of {federation.max_bundle_bytes}: use a lower rank or fewer modules",
                field="size_bytes")
        upload = _Upload(self, archive, manifest.expert_id, manifest.name,
                         federation.chunk_bytes, limit_rate, progress)
        return upload.run(retry)


class _Upload:
    """One archive's way to the coordinator, across retries."""

    def __init__(self, client: CoordinatorClient, archive: BundleArchive, expert_id: str,
                 name: str, chunk_bytes: int, limit_rate: float | None,
                 progress: bool) -> None:
        self.client, self.archive, self.expert_id = client, archive, expert_id
        self.size = archive.size
        self.name, self.chunk_bytes, self.limit_rate = name, chunk_bytes, limit_rate
        self.sent = 0
        self.resumed_from = 0
        self.progress = progress
        self.seconds: dict[str, float] = {"transfer": 0.0}
        self._bar = None

    def run(self, retry: RetryPolicy) -> SubmitResult:
        delay = retry.first_delay_s
        try:
            for attempt in range(1, retry.attempts + 1):
                try:
                    return self._attempt(attempt)
                except GaggleError as err:
                    if attempt == retry.attempts or not _resumable(err, self.sent):
                        raise
                    print(f"connection problem ({err.status}): retrying in {delay:.1f} s",
                          file=sys.stderr)
                    time.sleep(delay * random.uniform(0.8, 1.2))
                    delay = min(delay * 2, retry.max_delay_s)
            raise AssertionError("unreachable")
        finally:
            if self._bar is not None:
                self._bar.close()

    def _attempt(self, attempt: int) -> SubmitResult:
        start = self.client.start_upload(self.size, self.expert_id, self.name)
        if start.HasField("existing"):
            return self._result(start.existing, True, attempt)
        self.resumed_from = start.committed_bytes
        self._show_progress(start.committed_bytes)
        began = time.perf_counter()
        if start.committed_bytes < self.size:
            try:
                self.client.write_upload(self._chunks(start.upload_id, start.committed_bytes))
            finally:
                self.seconds["transfer"] += time.perf_counter() - began
        began = time.perf_counter()
        done = self.client.finish_upload(start.upload_id)
        self.seconds["finish"] = time.perf_counter() - began
        return self._result(done.expert, done.already_stored, attempt)

    def _show_progress(self, committed: int) -> None:
        if not self.progress:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.size, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=f"uploading {self.name}", file=sys.stderr)
        self._bar.n = committed
        self._bar.refresh()

    def _chunks(self, upload_id: str, offset: int) -> Iterator[pb.WriteUploadRequest]:
        began, sent_here = time.monotonic(), 0
        block = self.chunk_bytes
        if self.limit_rate:
            # A tenth of a second's worth per message, so the pace is even: in chunk-sized
            # messages a bundle under one chunk would go in one burst, whatever the rate.
            block = max(1, min(block, int(self.limit_rate / 10)))
        for data in self.archive.blocks(offset, block):
            if self.limit_rate:
                # Pace the stream: never ahead of limit_rate bytes per second.
                ahead = sent_here / self.limit_rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
            yield pb.WriteUploadRequest(upload_id=upload_id, offset=offset, data=data)
            offset += len(data)
            sent_here += len(data)
            self.sent += len(data)
            if self._bar is not None:
                self._bar.update(len(data))

    def _result(self, expert: pb.Expert, already: bool, attempt: int) -> SubmitResult:
        return SubmitResult(expert_id=expert.expert_id, name=expert.name,
                            already_stored=already, size_bytes=self.size,
                            bytes_sent=self.sent, resumed_from=self.resumed_from,
                            attempts=attempt, seconds=dict(self.seconds))


def _resumable(err: GaggleError, sent: int) -> bool:
    # NOT_FOUND after bytes went out: the upload finished or expired while we were away;
    # StartUpload tells which (the stored expert, or a fresh upload).
    return err.status in _RESUMABLE or (isinstance(err, NotFound) and sent > 0)


def _open_channel(connection: Connection) -> grpc.Channel:
    options = [("grpc.max_send_message_length", 8 << 20)]
    if connection.tls_ca is None and connection.tls_cert is None:
        return grpc.insecure_channel(connection.address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=connection.tls_ca.read_bytes() if connection.tls_ca else None,
        private_key=connection.tls_key.read_bytes() if connection.tls_key else None,
        certificate_chain=connection.tls_cert.read_bytes() if connection.tls_cert else None)
    return grpc.secure_channel(connection.address, credentials, options=options)


def read_manifest(bundle_dir: Path) -> Manifest:
    """The bundle's manifest, checked on its own (tensors are checked by the coordinator)."""
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise InvalidBundle(f"{bundle_dir} has no {MANIFEST}: is it a bundle folder written "
                            "by `gaggle-contributor train`?", field="path")
    return parse_manifest(path.read_bytes())


def check_compatible(manifest: Manifest, federation: pb.Federation) -> None:
    """Refuse locally what the coordinator would refuse: another base model or method."""
    if manifest.base_fingerprint != federation.base_fingerprint:
        raise FingerprintMismatch(
            f"this bundle was trained on {manifest.base_model!r} (fingerprint "
            f"{manifest.base_fingerprint[:12]}...), but the federation's base model is "
            f"{federation.base_model!r} ({federation.base_fingerprint[:12]}...): retrain with "
            f"--base {federation.base_model}", field="base_model.fingerprint")
    if manifest.method not in federation.methods:
        raise InvalidArgument(f"the coordinator accepts methods {list(federation.methods)}, "
                              f"not {manifest.method!r}", field="method")
