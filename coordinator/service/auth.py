"""Contributor tokens: issued once, stored only as a hash, checked by a server interceptor.

A token reads `gg_<token_id>_<secret>`. The index keeps the public token id (for lookup) and
the sha256 of the whole token; the check compares hashes in constant time. The identity a
handler sees comes from the token, never from anything the contributor sends.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from coordinator import metrics
from coordinator.store.experts import Store
from protocol.errors import (
    AlreadyExists,
    FailedPrecondition,
    GaggleError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from protocol.names import check_name, preview
from protocol.status import abort

log = logging.getLogger(__name__)

_TOKEN_RE = re.compile(r"gg_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
ROLES = ("contributor", "admin")
# Methods callable without a token: health checks come from load balancers and probes.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                          "/grpc.health.v1.Health/List"})
ADMIN_PREFIX = "/gaggle.v1.Admin/"  # every method of this service needs an admin token


@dataclass(frozen=True)
class Identity:
    """Who is calling, as established by their token."""

    contributor: str
    role: str  # "contributor" or "admin"


_current: contextvars.ContextVar[Identity] = contextvars.ContextVar("gaggle_identity")


def current_identity() -> Identity:
    """The caller of the RPC being handled (set by AuthInterceptor)."""
    try:
        return _current.get()
    except LookupError:
        raise Unauthenticated("no authenticated caller for this call") from None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenBook:
    """The contributors and token hashes kept in a store's index."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, name: str, role: str | None = "contributor", *, rotate: bool = False,
            revoke_others: bool = False) -> str:
        """Create a contributor of `role` and issue its token (shown only once).

        Roles change only explicitly (`set_role`): an existing name is AlreadyExists unless
        `rotate`, which issues one more token for it (its other tokens stay valid unless
        `revoke_others`), and FailedPrecondition when `role` is not the role it holds. role
        None: the role it holds when rotating, else a contributor.
        """
        check_name(name, "contributor name", "name")
        if role is None:
            known = self.store.query("SELECT role FROM contributors WHERE name = ?", (name,))
            role = known[0][0] if known and rotate else "contributor"
        if role not in ROLES:
            raise InvalidArgument(f"role {preview(role)} is unknown: use one of {list(ROLES)}",
                                  field="role")
        token_id = secrets.token_hex(6)
        token = f"gg_{token_id}_{secrets.token_urlsafe(32)}"
        now = time.time()
        with self.store.transaction() as conn:
            row = conn.execute("SELECT role FROM contributors WHERE name = ?",
                               (name,)).fetchone()
            if row is not None:
                _check_rotation(name, held=row[0], asked=role, rotate=rotate)
            else:
                conn.execute("INSERT INTO contributors (name, role, created_at) "
                             "VALUES (?, ?, ?)", (name, role, now))
            if revoke_others:
                conn.execute("UPDATE tokens SET revoked_at = ? WHERE contributor = ? AND "
                             "revoked_at IS NULL", (now, name))
            conn.execute("INSERT INTO tokens (token_id, contributor, token_hash, created_at) "
                         "VALUES (?, ?, ?, ?)", (token_id, name, _hash(token), now))
        return token

    def set_role(self, name: str, role: str) -> str:
        """Give `name` another role (its tokens carry it from the next call); returns the role
        it held. NotFound for an unknown name."""
        if role not in ROLES:
            raise InvalidArgument(f"role {preview(role)} is unknown: use one of {list(ROLES)}",
                                  field="role")
        held = self.role(name)
        with self.store.transaction() as conn:
            conn.execute("UPDATE contributors SET role = ? WHERE name = ?", (role, name))
        return held

    def role(self, name: str) -> str:
        """The role `name` holds; NotFound when there is no such name."""
        rows = self.store.query("SELECT role FROM contributors WHERE name = ?", (name,))
        if not rows:
            raise NotFound(f"no contributor {preview(name)}", field="name")
        return rows[0][0]

    def revoke(self, name: str) -> int:
        """Revoke every live token of `name`; return how many were revoked."""
        with self.store.transaction() as conn:
            known = conn.execute("SELECT 1 FROM contributors WHERE name = ?",
                                 (name,)).fetchone()
            if known is None:
                raise NotFound(f"no contributor {name!r}: see `gaggle-coordinator token list`",
                               field="name")
            cursor = conn.execute("UPDATE tokens SET revoked_at = ? WHERE contributor = ? "
                                  "AND revoked_at IS NULL", (time.time(), name))
            return cursor.rowcount

    def list(self) -> list[tuple[str, str, int, int]]:
        """(name, role, live tokens, revoked tokens) per contributor."""
        rows = self.store.query(
            "SELECT c.name, c.role, "
            "SUM(CASE WHEN t.token_id IS NOT NULL AND t.revoked_at IS NULL THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN t.revoked_at IS NOT NULL THEN 1 ELSE 0 END) "
            "FROM contributors c LEFT JOIN tokens t ON t.contributor = c.name "
            "GROUP BY c.name ORDER BY c.name")
        return [(r[0], r[1], int(r[2] or 0), int(r[3] or 0)) for r in rows]

    def verify(self, token: str) -> Identity:
        """The identity behind a live token; Unauthenticated otherwise."""
        match = _TOKEN_RE.fullmatch(token)
        row = None
        if match:
            rows = self.store.query(
                "SELECT t.token_hash, t.revoked_at, c.name, c.role FROM tokens t "
                "JOIN contributors c ON c.name = t.contributor WHERE t.token_id = ?",
                (match.group(1),))
            row = rows[0] if rows else None
        # Compare even when the id is unknown, so timing does not tell ids apart.
        expected = row["token_hash"] if row else "0" * 64
        if not hmac.compare_digest(_hash(token), expected) or row is None:
            raise Unauthenticated("the token is not valid: check --token or $GAGGLE_TOKEN, "
                                  "or ask the coordinator's operator for a new one",
                                  field="authorization")
        if row["revoked_at"] is not None:
            raise Unauthenticated("the token was revoked: ask the coordinator's operator "
                                  "for a new one", field="authorization")
        return Identity(row["name"], row["role"])


def _check_rotation(name: str, *, held: str, asked: str, rotate: bool) -> None:
    if not rotate:
        raise AlreadyExists(
            f"{name} already exists with role {held}: pass --rotate (AddToken rotate) to issue "
            "it another token, or choose a new name", field="name")
    if asked != held:
        raise FailedPrecondition(
            f"{name} holds role {held}, not {asked}: a rotation keeps the role; to change it, "
            f"revoke {name}'s tokens and add the role under a new name", field="role")


def bearer_token(metadata: tuple) -> str | None:
    """The token of an `authorization: Bearer TOKEN` metadata entry, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class FailureLimiter:
    """Failed authentications per peer host in a sliding window: past `max_failures`, the
    host's further failures are answered RESOURCE_EXHAUSTED (and not logged one by one) until
    its oldest failure leaves the window. Valid tokens are never refused: a host may be a NAT
    or proxy that real contributors share with whoever is failing."""

    def __init__(self, max_failures: int = 10, window_s: float = 60.0,
                 max_peers: int = 10_000) -> None:
        self.max_failures = max_failures  # failures allowed per window and host
        self.window_s = window_s  # seconds a failure counts against its host
        self.max_peers = max_peers  # hosts remembered at most (oldest forgotten first)
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, peer: str, now: float | None = None) -> bool:
        with self._lock:
            return len(self._recent(peer_host(peer), now)) >= self.max_failures

    def record(self, peer: str, now: float | None = None) -> None:
        host = peer_host(peer)
        with self._lock:
            self._recent(host, now).append(time.monotonic() if now is None else now)
            if len(self._failures) > self.max_peers:  # bounded memory under a spray of hosts
                self._failures.pop(next(iter(self._failures)))

    def _recent(self, host: str, now: float | None) -> deque[float]:
        cutoff = (time.monotonic() if now is None else now) - self.window_s
        times = self._failures.setdefault(host, deque())
        while times and times[0] < cutoff:
            times.popleft()
        return times


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string, without the port: failures count per host."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class AuthInterceptor(grpc.ServerInterceptor):
    """Check the bearer token of every RPC but health; expose the caller to handlers.

    Admin services need a token of role "admin". A failed call from a host with too many
    failures in the limiter's window is answered RESOURCE_EXHAUSTED, and so is a contributor's
    call beyond `max_calls` of its own in flight: every call holds one of the server's worker
    threads, so no one contributor may hold them all. Admin calls are not counted.
    """

    def __init__(self, book: TokenBook,
                 on_failure: Callable[[str, str], None] | None = None,
                 limiter: FailureLimiter | None = None, max_calls: int = 4,
                 max_streams: int | None = None) -> None:
        """max_streams: upload streams in flight server-wide; each holds a worker thread for
        as long as it runs, so keeping it below the server's threads leaves some for health
        and the short calls whatever the streams do (None: no cap)."""
        self.book = book
        self.max_streams = max_streams
        self._streams = 0
        # Called with (peer, reason) after each refused call: logging, rate limiting.
        self.on_failure = on_failure
        self.limiter = limiter or FailureLimiter()
        self.max_calls = max_calls
        self._in_flight: Counter[str] = Counter()  # contributor -> calls being handled
        self._lock = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_METHODS:
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        admin_only = handler_call_details.method.startswith(ADMIN_PREFIX)
        return _rebuild(handler, lambda behavior, streaming, uploading: self._guard(
            behavior, streaming, token, admin_only, uploading))

    def authorize(self, token: str | None, admin_only: bool, peer: str) -> Identity:
        """The caller's identity, or the GaggleError to answer with.

        The token is checked first (a hash and one indexed lookup), so a valid token passes
        whatever else its host sent; only failures count against the host.
        """
        try:
            if token is None:
                raise Unauthenticated(
                    "this call needs 'authorization: Bearer TOKEN' metadata: pass --token or "
                    "set GAGGLE_TOKEN", field="authorization")
            identity = self.book.verify(token)
        except Unauthenticated as err:
            if self.limiter.blocked(peer):
                raise ResourceExhausted(
                    f"too many failed authentications from {peer_host(peer)}: wait "
                    f"{self.limiter.window_s:.0f} s and check your token",
                    field="authorization") from None
            log.warning("refused call from %s: %s", peer, err)
            self.limiter.record(peer)
            if self.on_failure is not None:
                self.on_failure(peer, str(err))
            raise
        if admin_only and identity.role != "admin":
            raise PermissionDenied(
                f"{identity.contributor} holds a contributor token; this call needs an admin "
                "token (`gaggle-coordinator token add NAME --admin`)", field="authorization")
        return identity

    def count_in(self, identity: Identity) -> None:
        """Count a contributor's call in, or refuse it when `max_calls` are in flight."""
        if identity.role == "admin":
            return
        with self._lock:
            if self._in_flight[identity.contributor] >= self.max_calls:
                raise ResourceExhausted(
                    f"{identity.contributor} has {self.max_calls} calls in flight already, "
                    "the most one contributor may hold: wait for one to end", field="calls")
            self._in_flight[identity.contributor] += 1
            metrics.CALLS_IN_FLIGHT.inc()

    def count_out(self, identity: Identity) -> None:
        if identity.role == "admin":
            return
        with self._lock:
            metrics.CALLS_IN_FLIGHT.dec()
            self._in_flight[identity.contributor] -= 1
            if not self._in_flight[identity.contributor]:
                del self._in_flight[identity.contributor]

    def stream_in(self) -> None:
        """Count an upload stream in, or refuse it (UNAVAILABLE: the client retries) when
        `max_streams` run already."""
        with self._lock:
            if self.max_streams is not None and self._streams >= self.max_streams:
                raise Unavailable(
                    f"the coordinator is receiving {self.max_streams} uploads, its most at "
                    "once: retry in a few seconds (submit does, and resumes)", field="calls")
            self._streams += 1

    def stream_out(self) -> None:
        with self._lock:
            self._streams -= 1

    def _guard(self, behavior: Callable, streaming: bool, token: str | None,
               admin_only: bool, uploading: bool = False) -> Callable:
        def enter(context: grpc.ServicerContext) -> contextvars.Token:
            try:
                identity = self.authorize(token, admin_only, context.peer())
                self.count_in(identity)
                if uploading:
                    try:
                        self.stream_in()
                    except GaggleError:
                        self.count_out(identity)
                        raise
            except GaggleError as err:
                abort(context, err)
            except Exception:  # the token store failed: a bounded answer, the cause in the log
                log.exception("could not check the token of a call from %s", context.peer())
                abort(context, Unavailable(
                    "the coordinator could not check your token just now: try again shortly "
                    "(its operator's log has the cause)", field="authorization"))
            return _current.set(identity)

        def leave(reset: contextvars.Token) -> None:
            identity = _current.get()
            _current.reset(reset)
            self.count_out(identity)
            if uploading:
                self.stream_out()

        if streaming:
            # A streaming response runs after the behaviour returns its generator, so the
            # identity is set inside the generator, for as long as it runs.
            def stream(request, context):
                reset = enter(context)
                try:
                    yield from behavior(request, context)
                finally:
                    leave(reset)
            return stream

        def call(request, context):
            reset = enter(context)
            try:
                return behavior(request, context)
            finally:
                leave(reset)
        return call


def _rebuild(handler: grpc.RpcMethodHandler,
             wrap: Callable[[Callable, bool, bool], Callable]) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped (told whether its response streams and
    whether its request does: an upload), keeping its kind and serializers."""
    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
             ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for attribute, factory in kinds:
        behavior = getattr(handler, attribute)
        if behavior is not None:
            return factory(wrap(behavior, handler.response_streaming,
                                handler.request_streaming),
                           request_deserializer=handler.request_deserializer,
                           response_serializer=handler.response_serializer)
    return handler
