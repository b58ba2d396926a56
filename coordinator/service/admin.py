"""The gaggle.v1.Admin servicer: token management and promote over gRPC, for admin tokens only.

AuthInterceptor refuses every Admin call whose token is not of role "admin"
(PERMISSION_DENIED), so the handlers here only decode, delegate and encode.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from coordinator.service.auth import TokenBook, current_identity
from coordinator.service.servicer import handles_errors
from coordinator.store.experts import Store
from coordinator.tracking.tracker import Tracker
from coordinator.versions.promotion import promote_version
from protocol.gaggle.v1 import gaggle_pb2 as pb
from protocol.gaggle.v1 import gaggle_pb2_grpc

log = logging.getLogger(__name__)
_REPLAY_TRIES = 30  # promotions replayed into MLflow in the background, 1 s apart at most


class AdminServicer(gaggle_pb2_grpc.AdminServicer):
    """gaggle.v1.Admin over a store (tokens) and its router versions (promote)."""

    def __init__(self, store: Store, tracking_uri: str | None = None,
                 tracking: bool = True) -> None:
        self.store = store
        self.book = TokenBook(store)
        self.tracking_uri = tracking_uri
        self.tracking = tracking  # False: promotions move CHAMPION only, MLflow is off

    @handles_errors
    def AddToken(self, request, context):
        token = self.book.add(request.name, role="admin" if request.admin else "contributor",
                              rotate=request.rotate)
        role = self.book.role(request.name)
        log.info("%s issued a %s token for %s", current_identity().contributor, role,
                 request.name)
        return pb.AddTokenResponse(name=request.name, role=role, token=token)

    @handles_errors
    def RevokeToken(self, request, context):
        revoked = self.book.revoke(request.name)
        log.info("%s revoked %d token(s) of %s", current_identity().contributor, revoked,
                 request.name)
        return pb.RevokeTokenResponse(revoked=revoked)

    @handles_errors
    def ListTokens(self, request, context):
        return pb.ListTokensResponse(holders=[
            pb.TokenHolder(name=name, role=role, live_tokens=live, revoked_tokens=revoked)
            for name, role, live, revoked in self.book.list()])

    @handles_errors
    def Promote(self, request, context):
        version_id, sequence = promote(Path(self.store.root), request.version,
                                       force=request.force, tracking_uri=self.tracking_uri,
                                       tracking=self.tracking,
                                       by=f"{current_identity().contributor} (Admin API)")
        log.info("%s promoted version %s", current_identity().contributor, version_id)
        return pb.PromoteResponse(version_id=version_id, sequence=sequence)


def promote(root: Path, version: str, *, force: bool, tracking_uri: str | None,
            tracking: bool, by: str) -> tuple[str, int]:
    """The CLI's promotion rule (promote_version); the MLflow alias move is replayed in the
    background. (version id, sequence)."""
    tracker = Tracker(root, tracking_uri) if tracking else None
    version_id, sequence, _ = promote_version(root, version, force=force, by=by,
                                              tracker=tracker)
    if tracker is not None:
        # Off the RPC: MLflow may be slow or down; the queue keeps the call until it lands.
        threading.Thread(target=_replay_soon, args=(tracker,), name="promote-replay",
                         daemon=True).start()
    return version_id, sequence


def _replay_soon(tracker) -> None:
    for _ in range(_REPLAY_TRIES):
        try:
            result = tracker.replay()
        except Exception:
            log.exception("replaying the promotion failed; it stays queued")
            return
        if result.pending == 0 or result.error != "another replay is running":
            return
        time.sleep(1.0)
