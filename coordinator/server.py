"""`gaggle-coordinator serve`: the gRPC server with TLS, token auth, health and reflection.

Settings come from a TOML file (`--config`, keys named like ServerConfig's fields) and are
overridden by command-line flags. SIGTERM or SIGINT drains in-flight calls and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator import metrics
from coordinator.checks.evaluation import EvaluationConfig
from coordinator.intake.uploads import UploadLimits, Uploads
from coordinator.ray_cluster import RayConfig, ensure_ray, shutdown_ray
from coordinator.service.admin import AdminServicer
from coordinator.service.auth import AuthInterceptor, FailureLimiter, TokenBook
from coordinator.service.health import CoordinatorHealth
from coordinator.service.servicer import CoordinatorServicer, OnAccepted
from coordinator.store.experts import Store
from coordinator.versions.assembler import SHUTDOWN_S, Assembler, start_assembler
from coordinator.versions.status import federation_status
from protocol.errors import InvalidArgument, Unavailable
from protocol.gaggle.v1 import gaggle_pb2, gaggle_pb2_grpc
from routing.device import check_names, set_serving_placement

log = logging.getLogger(__name__)
SERVICE_NAME = gaggle_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
ADMIN_SERVICE_NAME = gaggle_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


@dataclass(frozen=True)
class ServerConfig:
    """Everything `serve` needs; flags and the TOML file map onto these fields."""

    store: Path  # the store folder (created if missing)
    base: str  # the federation's base model: 'tiny-llama', 'smollm2-135m' or a folder
    host: str = "127.0.0.1"  # address to bind; loopback unless you mean to expose it
    port: int = 50051  # 0 picks a free port (printed on start)
    tls_cert: Path | None = None  # server certificate (PEM); enables TLS
    tls_key: Path | None = None  # its private key (PEM)
    tls_client_ca: Path | None = None  # when set, clients must present a cert signed by it
    # The upload limits, under the names a config file uses; their defaults and meanings
    # are UploadLimits' (the `limits` property maps them).
    max_bundle_bytes: int = UploadLimits.max_bundle_bytes
    max_concurrent_uploads: int = UploadLimits.max_concurrent_uploads
    upload_idle_timeout_s: float = UploadLimits.idle_timeout_s
    stream_idle_timeout_s: float = UploadLimits.stream_idle_timeout_s
    min_upload_rate: float = UploadLimits.min_stream_rate
    upload_rate_grace_s: float = UploadLimits.rate_grace_s
    store_quota_bytes: int | None = UploadLimits.quota_bytes
    max_update_ratio: float = UploadLimits.max_update_ratio
    max_workers: int = 16  # concurrent RPCs (threads)
    # upload streams in flight at once, all contributors: each holds a thread while it
    # runs, so the rest stay free for health and short calls (default max_workers - 4)
    max_streams: int | None = None
    grace_s: float = 10.0  # how long SIGTERM waits for in-flight calls
    tracking_uri: str | None = None  # MLflow tracking server (used by version tracking)
    ray_address: str | None = None  # Ray cluster to join (used by assembly)
    ray_resources: tuple[str, ...] = ()  # NAME=AMOUNT custom Ray resources its Ray work asks for
    assembly: bool = True  # after each accepted expert: assemble a version, track in MLflow
    device: str = "auto"  # where evaluation and the usage check run the base (routing.device)
    dtype: str = "auto"  # and in which dtype (auto: bf16 on a GPU, else float32)
    eval_config: Path | None = None  # evaluation config file: evaluate each new version
    auth_max_failures: int = 10  # failed authentications per host and window, then refused
    auth_window_s: float = 60.0  # how long a failed authentication counts against its host
    max_calls_per_contributor: int = 4  # one contributor's calls in flight (each holds a thread)
    metrics_port: int | None = None  # Prometheus metrics on this port (None: off; 0: any)
    metrics_host: str = "127.0.0.1"  # where the metrics listen: loopback unless you mean it
    metrics_contributors: bool = False  # contributor names as labels (cardinality)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("TLS needs both --tls-cert and --tls-key", field="tls")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidArgument("--tls-client-ca needs --tls-cert and --tls-key",
                                  field="tls_client_ca")
        check_names(self.device, self.dtype)
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"port {self.port} is out of range 0-65535", field="port")
        if self.max_streams is not None and not 1 <= self.max_streams < self.max_workers:
            raise InvalidArgument(f"max_streams must be from 1 to max_workers - 1 "
                                  f"({self.max_workers - 1}), got {self.max_streams}: threads "
                                  "must stay free for health and short calls",
                                  field="max_streams")
        if self.max_calls_per_contributor < 1:
            raise InvalidArgument("max_calls_per_contributor must be at least 1",
                                  field="max_calls_per_contributor")
        if self.auth_max_failures < 1 or self.auth_window_s <= 0:
            raise InvalidArgument("auth_max_failures must be at least 1 and auth_window_s "
                                  "positive", field="auth_max_failures")

    @property
    def limits(self) -> UploadLimits:
        return UploadLimits(max_bundle_bytes=self.max_bundle_bytes,
                            max_concurrent_uploads=self.max_concurrent_uploads,
                            idle_timeout_s=self.upload_idle_timeout_s,
                            stream_idle_timeout_s=self.stream_idle_timeout_s,
                            min_stream_rate=self.min_upload_rate,
                            rate_grace_s=self.upload_rate_grace_s,
                            quota_bytes=self.store_quota_bytes,
                            max_update_ratio=self.max_update_ratio)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        """The TOML file's settings (if any), overridden by the flags that were given."""
        settings: dict = {}
        if getattr(args, "config", None):
            with open(args.config, "rb") as handle:
                settings = {k.replace("-", "_"): v for k, v in tomllib.load(handle).items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise InvalidArgument(f"{args.config}: unknown settings {unknown}; known: "
                                  f"{sorted(known)}", field="config")
        for name in known:
            value = getattr(args, name, None)
            if value is not None:
                settings[name] = value
        missing = [n for n in ("store", "base") if not settings.get(n)]
        if missing:
            raise InvalidArgument(f"serve needs {', '.join('--' + m for m in missing)} "
                                  "(as flags or in --config)", field=missing[0])
        if settings.get("ray_resources") is not None:
            settings["ray_resources"] = tuple(settings["ray_resources"])
        for name in ("store", "tls_cert", "tls_key", "tls_client_ca", "eval_config"):
            if settings.get(name) is not None:
                settings[name] = Path(settings[name])
        return cls(**settings)


class CoordinatorServer:
    """A started gRPC server and what it owns; `stop()` drains and closes it."""

    def __init__(self, config: ServerConfig, on_accepted: OnAccepted | None = None) -> None:
        self.config = config
        self.store = Store(config.store)
        base = self.store.base_spec(config.base)
        self.store.recover(base)
        self.uploads = Uploads(self.store, base, config.limits)
        self.uploads.expire()
        self.servicer = CoordinatorServicer(self.uploads, on_accepted)
        self.health = CoordinatorHealth((SERVICE_NAME,))
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=config.max_workers),
            interceptors=[AuthInterceptor(
                TokenBook(self.store), max_calls=config.max_calls_per_contributor,
                max_streams=config.max_streams or max(1, config.max_workers - 4),
                limiter=FailureLimiter(config.auth_max_failures, config.auth_window_s))],
            # One server per port: without this, a second server would silently share it.
            options=[("grpc.so_reuseport", 0)],
        )
        gaggle_pb2_grpc.add_CoordinatorServicer_to_server(self.servicer, self.server)
        gaggle_pb2_grpc.add_AdminServicer_to_server(
            AdminServicer(self.store, config.tracking_uri, tracking=config.assembly),
            self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server)
        self.port = self._bind()
        self._stopped = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="upload-expiry", daemon=True)

    def _bind(self) -> int:
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.config.tls_cert is None:
                port = self.server.add_insecure_port(address)
            else:
                port = self.server.add_secure_port(address, self._tls_credentials())
        except RuntimeError:
            port = 0
        if port == 0:
            raise Unavailable(f"cannot listen on {address}: is another server using it? "
                              "Choose another --port (0 picks a free one)", field="port")
        return port

    def _tls_credentials(self) -> grpc.ServerCredentials:
        client_ca = self.config.tls_client_ca.read_bytes() if self.config.tls_client_ca \
            else None
        return grpc.ssl_server_credentials(
            [(self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes())],
            root_certificates=client_ca, require_client_auth=client_ca is not None)

    def start(self) -> None:
        self.server.start()
        for service in self.health.services:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._sweeper.start()
        scheme = "tls" if self.config.tls_cert else "insecure"
        log.info("serving %s on %s:%d (%s), store %s", self.uploads.base.name,
                 self.config.host, self.port, scheme, self.store.root)

    def stop(self) -> None:
        """Report NOT_SERVING, let in-flight calls finish (up to grace_s), then close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.config.grace_s).wait()
        self.servicer.close()
        self.store.close()

    def wait(self) -> None:
        self.server.wait_for_termination()

    def _sweep(self) -> None:
        interval = min(30.0, self.config.upload_idle_timeout_s / 4,
                       self.config.stream_idle_timeout_s / 4,
                       self.config.upload_rate_grace_s / 4)
        while not self._stopped.wait(interval):
            try:
                self.uploads.cancel_stalled()
                self.uploads.expire()
            except Exception:
                log.exception("upload expiry failed; will retry")


def start_assembly(config: ServerConfig) -> Assembler | None:
    """The assembler that runs after each newly accepted expert (off the RPC path, in order):
    it builds a router version on Ray, checks it and tracks it in MLflow. None with
    `assembly = false` (--no-assembly): experts are then only stored.

    Call it from the main thread: it starts Ray there (Ray started in another thread cannot
    set up its signal handling). A bad evaluation config is an error here, at start.
    """
    set_serving_placement(config.device, config.dtype)  # before Ray starts: workers inherit it
    if not config.assembly:
        return None
    # Ray's failure signal handler would turn the SIGTERM that `serve` handles (graceful
    # shutdown) into an abort when the process exits.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    eval_config = EvaluationConfig.from_file(config.eval_config) if config.eval_config \
        else None
    try:
        ensure_ray(RayConfig(ray_address=config.ray_address))
    except Exception as err:  # the assembler thread retries; accepting must not wait on Ray
        log.warning("Ray did not start (%s); assembly will retry in the background", err)
    return start_assembler(Store(config.store), tracking_uri=config.tracking_uri,
                           ray_address=config.ray_address, eval_config=eval_config,
                           base=config.base, ray_resources=config.ray_resources)


def serve(config: ServerConfig, assembler: Assembler | None = None) -> None:
    """Run the coordinator until SIGTERM or SIGINT, then stop cleanly: drain the calls in
    flight, stop the assembler (an assembly in flight is abandoned at its next step and made
    again on start), stop this process's Ray, exit."""
    server = CoordinatorServer(config, assembler.on_accepted if assembler else None)
    done = threading.Event()

    def shutdown(signum: int, _frame) -> None:
        log.info("received %s: draining", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    server.start()
    if config.metrics_port is not None:
        port = metrics.serve_metrics(config.metrics_port, config.metrics_host,
                                     lambda: store_gauges(server), config.metrics_contributors)
        print(f"metrics on http://{config.metrics_host}:{port}/metrics", flush=True)
    # Printed for people and scripts alike: with --port 0 this is how to learn the port.
    print(f"gaggle-coordinator serving on {config.host}:{server.port}", flush=True)
    while not done.wait(1.0):  # a timed wait keeps the main thread responsive to signals
        pass
    server.stop()
    if assembler is not None:
        assembler.close(SHUTDOWN_S)
        running = assembler.alive()
    shutdown_ray()
    log.info("stopped")
    if assembler is not None and running:
        # A thread still inside native code when the interpreter exits is torn down in the
        # middle of it, which aborts the process: leave without waiting for it instead.
        log.warning("threads %s did not stop in %.0f s; leaving them", running, SHUTDOWN_S)
        logging.shutdown()
        os._exit(0)


def store_gauges(server: CoordinatorServer) -> dict[str, float]:
    """The figures read from the store at each scrape (coordinator.metrics.StoreGauges)."""
    return federation_status(server.store, streams=server.uploads.streams())
