"""The gaggle.v1.Coordinator servicer: decode, delegate to the store, map errors to statuses.

Handlers stay thin: the upload logic lives in coordinator.intake.uploads, the index in
coordinator.store.experts, and every GaggleError becomes its status in protocol.status.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from coordinator import metrics
from coordinator.intake.uploads import UploadLimits, Uploads
from coordinator.intake.writer import UploadState
from coordinator.service.auth import current_identity
from coordinator.store.experts import ExpertRecord
from protocol import status
from protocol.bundle import FORMAT_VERSION, METHODS
from protocol.errors import GaggleError, InvalidArgument
from protocol.gaggle.v1 import gaggle_pb2 as pb
from protocol.gaggle.v1 import gaggle_pb2_grpc

log = logging.getLogger(__name__)
SERVER_VERSION = "0.1.0"
CHUNK_BYTES = 1 << 20  # the upload chunk clients are asked to send (gRPC's limit is 4 MiB)

OnAccepted = Callable[[ExpertRecord], None]


_SUBMISSION_CALLS = ("StartUpload", "WriteUpload", "FinishUpload")


def handles_errors(method: Callable) -> Callable:
    """Turn GaggleError into its status, and anything unexpected into INTERNAL, logged; count
    the refusals of upload calls by their status."""
    @functools.wraps(method)
    def call(self, request, context: grpc.ServicerContext):
        try:
            return method(self, request, context)
        except GaggleError as err:
            if method.__name__ in _SUBMISSION_CALLS:
                metrics.refused(err.status)
            status.abort(context, err)
        except Exception as err:
            if isinstance(err, grpc.RpcError) or not context.is_active():
                raise  # the client went away or we already aborted
            log.exception("internal error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL,
                          f"internal error ({type(err).__name__}); see the coordinator log")
    return call


def expert_message(record: ExpertRecord) -> pb.Expert:
    return pb.Expert(
        expert_id=record.expert_id, name=record.name, contributor=record.contributor,
        method=record.method, size_bytes=record.size_bytes, created_at=record.created_at,
        num_modules=record.num_modules, quarantine=record.quarantine or "",
    )


def upload_message(state: UploadState) -> pb.UploadStatus:
    return pb.UploadStatus(upload_id=state.upload_id, committed_bytes=state.committed_bytes,
                           size_bytes=state.size_bytes)


class CoordinatorServicer(gaggle_pb2_grpc.CoordinatorServicer):
    """gaggle.v1.Coordinator over an Uploads (and its Store)."""

    def __init__(self, uploads: Uploads, on_accepted: OnAccepted | None = None) -> None:
        self.uploads = uploads
        self.store = uploads.store
        self.limits: UploadLimits = uploads.limits
        self.on_accepted = on_accepted
        # One worker: the hook runs after the RPC answers, in acceptance order.
        self._hooks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="on-accepted")

    def close(self) -> None:
        self._hooks.shutdown(wait=True)

    @handles_errors
    def GetFederation(self, request, context):
        base = self.uploads.base
        return pb.Federation(
            base_model=base.name, base_fingerprint=base.fingerprint, methods=list(METHODS),
            max_bundle_bytes=self.limits.max_bundle_bytes, chunk_bytes=CHUNK_BYTES,
            max_concurrent_uploads=self.limits.max_concurrent_uploads,
            server_version=SERVER_VERSION, bundle_format_version=FORMAT_VERSION,
            contributor=current_identity().contributor,
        )

    @handles_errors
    def StartUpload(self, request, context):
        started = self.uploads.start(current_identity().contributor, request.size_bytes,
                                     request.expert_id, request.name)
        if isinstance(started, ExpertRecord):
            return pb.StartUploadResponse(existing=expert_message(started))
        return pb.StartUploadResponse(upload_id=started.upload_id,
                                      committed_bytes=started.committed_bytes)

    @handles_errors
    def WriteUpload(self, request_iterator: Iterator[pb.WriteUploadRequest], context):
        with self.uploads.opening(context.cancel):  # a silent stream must not hold a thread
            first = next(request_iterator, None)
        if first is None or not first.upload_id:
            raise InvalidArgument("the first WriteUpload message must carry the upload_id "
                                  "from StartUpload", field="upload_id")
        contributor = current_identity().contributor
        with self.uploads.writer(first.upload_id, contributor, context.cancel) as writer:
            writer.append(first.offset, first.data)
            for chunk in request_iterator:
                writer.append(chunk.offset, chunk.data)
        return pb.UploadStatus(upload_id=first.upload_id, committed_bytes=writer.offset,
                               size_bytes=writer.state.size_bytes)

    @handles_errors
    def QueryUpload(self, request, context):
        return upload_message(self.uploads.status(request.upload_id,
                                                  current_identity().contributor))

    @handles_errors
    def FinishUpload(self, request, context):
        result = self.uploads.finish(request.upload_id, current_identity().contributor)
        if not result.already_stored:
            metrics.accepted()
        if not result.already_stored and self.on_accepted is not None:
            self._hooks.submit(self._run_hook, result.expert)
        return pb.FinishUploadResponse(expert=expert_message(result.expert),
                                       already_stored=result.already_stored)

    @handles_errors
    def CancelUpload(self, request, context):
        self.uploads.cancel(request.upload_id, current_identity().contributor)
        return pb.CancelUploadResponse()

    @handles_errors
    def ListExperts(self, request, context):
        records = self.store.list_experts(request.contributor or None)
        return pb.ListExpertsResponse(experts=[expert_message(r) for r in records])

    @handles_errors
    def GetExpert(self, request, context):
        return expert_message(self.store.get_expert(request.expert_id))

    def _run_hook(self, record: ExpertRecord) -> None:
        try:
            self.on_accepted(record)
        except Exception:
            log.exception("the on-accepted hook failed for expert %s", record.expert_id)
