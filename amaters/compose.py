"""The composition root: the one place the server's object graph and service tree are built.

:func:`build_service` builds, in dependency order and without I/O, every component a running
server has, handing each its collaborators in its constructor::

    live config, lifecycle ─┐
    backend (retry wrapper) → pools → executor (query cache around it, server admin beside it)
      → one QueryPipeline with its whole stage list
      → front ends given the pipeline and the authenticator: the native listener, the ops site
        with the admin API
    reloader ← every reloadable component, registered here

then adds the services to the root once, in start order (stop order is the reverse)::

    logging, pools, storage, flusher, [snapshots], web, audit, auth, fhe, lagmonitor, [tracing],
    metrics, [grpc], protection, listener, [certwatch], reloader

The ops site starts before the listener and stops after it, so ``/readyz`` answers 503 while the
listener drains; the metrics, tracing and lag services stop after the listener, so the last
requests are still counted and their spans exported.  No component receives the root service;
:class:`Components` is what the root, the entry points and tests can look at.

:func:`load_server_config` loads a configuration with every check a start runs (the auth files
it names included); the entry points, the CLI and the reloader use it.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer, error
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from amaters import PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS
from amaters.auth.audit import AuditService
from amaters.auth.principal import Authenticator, default_authenticator
from amaters.auth.service import AuthService
from amaters.auth.settings import auth_problems
from amaters.config import Check, Config, LiveConfig, Sources, cache_settings, load_config
from amaters.fhe.service import build_fhe
from amaters.interfaces import IPipelineStage, IStorageBackend
from amaters.ops.admin import ServerAdmin
from amaters.ops.lag import LagMonitor
from amaters.ops.logging import LoggingService
from amaters.ops.metrics import Metrics
from amaters.ops.observability import (
    LAG_PROBE_INTERVAL,
    MeteredFactory,
    MetricsService,
    counting_authenticator,
)
from amaters.ops.reload import Reloader, ReloaderService
from amaters.ops.stages import ACCESS_LOG_NAMESPACE, AccessLogStage, MetricsStage, TracingStage
from amaters.ops.tlsreload import CertificateWatcher, TLSReloader
from amaters.ops.tracing import TracingService
from amaters.protect.cache import CachingExecutor, QueryCache
from amaters.protect.compression import BlobCompressionStage, FrameCompressionPolicy
from amaters.protect.connlimit import ConnectionLimiter, ConnectionLimitFactory
from amaters.protect.metrics import ProtectionCollector
from amaters.protect.ratelimit import RateLimiter, RateLimitStage
from amaters.protect.shedding import LoadShedder
from amaters.protect.wiring import ListenerLimits, Protection, ProtectionService
from amaters.protocols.grpc_service import GrpcService
from amaters.protocols.server import ListenerService
from amaters.query import operations as ops
from amaters.query.executor import CAPABILITIES, QueryExecutor
from amaters.query.pipeline import QueryPipeline
from amaters.service import AsyncMultiService, Lifecycle, SerialThreadService, ThreadPoolService
from amaters.storage import build_backend, innermost
from amaters.storage.flusher import FlusherService
from amaters.storage.s3 import S3Store
from amaters.storage.service import StorageService
from amaters.storage.snapshot import SnapshotScheduler
from amaters.web.admin import AdminAPI
from amaters.web.ops import OpsAPI, OpsService

#: Checks a server's configuration must pass beyond the config file itself.
SERVER_CHECKS: tuple[Check, ...] = (auth_problems,)


def load_server_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Config:
    """:func:`amaters.config.load_config` with every check a server start runs (raises ConfigError)."""
    return load_config(path, overrides, environ, checks=SERVER_CHECKS)


def _load_sources(sources: Sources, environ: Mapping[str, str]) -> Config:
    return load_server_config(sources.path, sources.overrides, environ)


# -- the root and the pools ----------------------------------------------------------------------


def _exit_with(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class PoolsService(AsyncMultiService):
    """The thread pools for blocking and CPU-heavy work, started first and stopped last."""

    name = "pools"

    def __init__(self, reactor: Any, synchronous: bool = False) -> None:
        super().__init__()
        #: fsync and other blocking file I/O (group commit waits here, not on the reactor).
        self.io = ThreadPoolService(reactor, "io", 0, 4, synchronous)
        #: CPU-heavy work: compression of large blobs, snapshots, FHE evaluation.
        self.cpu = ThreadPoolService(reactor, "cpu", 0, 2, synchronous)
        #: The write-ahead log's fsyncs (group commit), one at a time on a thread of their own.
        self.wal = SerialThreadService(reactor, "wal", synchronous)
        self.io.setServiceParent(self)
        self.cpu.setServiceParent(self)
        self.wal.setServiceParent(self)


@attrs.frozen
class Components:
    """Everything :func:`build_service` built, by role (for the entry points and for tests)."""

    live: LiveConfig
    lifecycle: Lifecycle
    pools: PoolsService
    backend: IStorageBackend
    executor: Any
    pipeline: QueryPipeline
    authenticate: Authenticator
    audit: AuditService
    auth: AuthService
    metrics: Metrics
    logging: LoggingService
    lag: LagMonitor
    tracing: TracingService | None
    protection: Protection
    reloader: Reloader
    listener: ListenerService
    grpc: GrpcService | None
    web: OpsService | None
    services: tuple[service.IService, ...]


class AmatersService(AsyncMultiService):
    """The root of the service tree.  Ready when every child has started and no stop has begun.

    It moves its :class:`~amaters.service.Lifecycle` through the states the probes report; with
    ``exit_on_failure`` (twistd) a failed start or stop makes the process exit 1, and a drain that
    finished cleanly after SIGTERM/SIGINT exits 0.
    """

    _log = Logger()

    def __init__(self, components: Components, reactor: Any) -> None:
        self.components = components
        self.lifecycle = components.lifecycle
        super().__init__()
        self.reactor = reactor
        for child in components.services:
            child.setServiceParent(self)

    # AsyncMultiService keeps its state in ``self.state``: here it is the lifecycle's.
    @property
    def state(self) -> str:
        return self.lifecycle.state

    @state.setter
    def state(self, value: str) -> None:
        self.lifecycle.state = value

    @property
    def config(self) -> Config:
        """The configuration in effect (a reload replaces it)."""
        return self.components.live.current

    @property
    def ready(self) -> bool:
        return self.lifecycle.ready

    @property
    def draining(self) -> bool:
        return self.lifecycle.draining

    @property
    def started_at(self) -> float | None:
        return self.lifecycle.started_at

    #: Set by makeService: a start failure stops the reactor and the process exits 1.
    exit_on_failure = False

    def startService(self) -> Any:
        self.lifecycle.started_at = self.reactor.seconds()
        if self.exit_on_failure:
            # After the reactor has installed its own handlers (it does so while starting up).
            self.reactor.callWhenRunning(self._handle_exit_signals)
        d = super().startService()
        d.addErrback(self._start_failed)
        return d

    def _handle_exit_signals(self) -> None:
        """SIGTERM and SIGINT stop the reactor, which drains the tree.

        twistd's own handlers make the process kill itself with the signal after shutdown, so the
        exit status would say "killed" even after a clean drain; ours leave the exit status to the
        outcome of the stop (0 when it finished cleanly, 1 when it did not).
        """
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_exit_signal)

    def _on_exit_signal(self, signum: int, frame: Any) -> None:
        # Signal context: do nothing but hand the work to the reactor thread.
        self.reactor.callFromThread(self._stop_on_signal, signum)

    def _stop_on_signal(self, signum: int) -> None:
        self._log.info("Received {signal}, shutting down", signal=signal.Signals(signum).name)
        try:
            self.reactor.stop()
        except error.ReactorNotRunning:
            pass  # a stop is already under way

    def _start_failed(self, failure: Failure) -> None:
        self._log.critical("amaters failed to start: {error}", error=failure.getErrorMessage())
        self._fail_process()

    def _fail_process(self) -> None:
        if not self.exit_on_failure:
            return
        self.exit_on_failure = False  # once
        # twistd exits 0 after the reactor stops; make a failed start or stop exit 1.
        atexit.register(_exit_with, 1)
        if self.reactor.running:
            self.reactor.callLater(0, self._stop_reactor)

    def _stop_reactor(self) -> None:
        """Stop the reactor unless it is already stopping (a failed stop happens during shutdown)."""
        try:
            self.reactor.stop()
        except error.ReactorNotRunning:
            pass

    def stopService(self) -> Any:
        """Stop every child in reverse order, bounded by ``server.shutdown_timeout``."""
        d = super().stopService()
        timeout = self.config.server.shutdown_timeout
        if timeout > 0:
            d.addTimeout(timeout, self.reactor)

        def failed(failure: Failure) -> None:
            if failure.check(defer.TimeoutError):
                self._log.error(
                    "Shutdown did not finish within server.shutdown_timeout={timeout}s",
                    timeout=timeout,
                )
            else:
                self._log.error("Shutdown failed: {error}", error=failure.getErrorMessage())
            self._fail_process()

        d.addErrback(failed)
        return d


# -- building ------------------------------------------------------------------------------------


def _stages(*stages: IPipelineStage | None) -> Sequence[IPipelineStage]:
    return [stage for stage in stages if stage is not None]


def build_service(
    config: Config,
    reactor: Any = None,
    sources: Sources | None = None,
    *,
    synchronous_pools: bool = False,
    environ: Mapping[str, str] | None = None,
) -> AmatersService:
    """Build the whole server for ``config``.  No I/O happens until it starts.

    ``sources`` are what a reload reads again (default: the config's own file);
    ``synchronous_pools`` runs pool work inline (unit tests on fake reactors); ``environ`` is what a
    reload reads environment overrides from (default: the process environment).
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor

    live = LiveConfig(config, sources)
    lifecycle = Lifecycle(reactor)

    # Observability that everything else reports to.
    logging_service = LoggingService(config.logging)
    metrics = Metrics(max_collections=config.web.metrics_max_collections)
    lag = LagMonitor(reactor, LAG_PROBE_INTERVAL, warn_above=lambda: live.current.web.liveness_max_lag)
    lag.add_observer(metrics.reactor_lag.set)

    # Storage and the pools its blocking work runs in.
    pools = PoolsService(reactor, synchronous_pools)
    backend = build_backend(config, reactor, pools)
    storage = StorageService(backend)
    flusher = FlusherService.from_config(backend, config.storage, reactor)
    flusher.add_stats_observer(metrics.storage.update)
    committer = storage.group_commit
    if committer is not None:
        committer.add_observer(metrics.storage_synced)
    cluster = None
    if config.storage.backend == "etcd":
        from amaters.cluster.service import build_cluster_service

        cluster = build_cluster_service(config, reactor, innermost(backend))
    snapshots: SnapshotScheduler | None = None
    if config.storage.backend == "rocksdb" and config.snapshot.interval > 0:
        uploader = None
        if config.snapshot.upload:
            uploader = S3Store.from_config(config.snapshot.s3)
        snapshots = SnapshotScheduler(backend, config, pools, reactor, uploader=uploader)

    # Login and audit.
    audit = AuditService(config.audit, config.data_dir, reactor)
    auth = AuthService(config, reactor, audit, collections=backend)
    reloader = Reloader(live, audit, environ, _load_sources)
    authenticate: Authenticator = auth.authenticate if config.auth.enabled else default_authenticator(False)
    authenticate = counting_authenticator(authenticate, metrics)

    # Homomorphic FILTER and UPDATE: key registry, circuit cache and worker processes.
    fhe = build_fhe(config, reactor, pools, metrics)

    # The executor, with the query cache around it and the server's administration beside it.
    connection_limiter = ConnectionLimiter(config.limits, reactor)
    admin = ServerAdmin(
        live,
        lifecycle,
        backend,
        pools,
        reloader,
        lambda: connection_limiter.total,
        cluster=cluster,
        fhe=fhe,
    )

    def server_info() -> ops.ServerInfoResult:
        return ops.ServerInfoResult(
            PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS, CAPABILITIES, int(lifecycle.uptime())
        )

    def health() -> ops.HealthResult:
        if lifecycle.draining:
            return ops.HealthResult(False, "shutting down")
        if lifecycle.ready or lifecycle.state == "stopped":
            return ops.HealthResult(True, "serving")
        return ops.HealthResult(False, "starting")

    cache_config = cache_settings(config)  # off in clustered mode
    cache = QueryCache(cache_config.max_bytes, cache_config.max_entry_bytes)
    executor = CachingExecutor(
        QueryExecutor(
            backend,
            auto_create_collections=config.storage.auto_create_collections,
            range_chunk_size=config.storage.range_chunk_size,
            server_info=server_info,
            health=health,
            admin=admin,
            fhe=fhe,
            fhe_max_rows=config.fhe.max_rows_per_query,
            fhe_query_timeout=config.fhe.query_timeout,
            clock=reactor,
        ),
        cache,
    )

    # Policy: the one pipeline every front end uses, in stage order.
    tracing = TracingService(config.tracing, pools.io) if config.tracing.enabled else None
    shedder = LoadShedder(config.limits, lag.current_lag, reactor)
    limiter = RateLimiter(config.rate_limit, reactor)
    blobs = BlobCompressionStage(config.compression, config.limits, pools.cpu)
    access_log = AccessLogStage(
        reactor,
        config.logging.slow_request_ms,
        partial(logging_service.controller.enabled_for, LogLevel.debug, ACCESS_LOG_NAMESPACE),
    )
    logging_service.controller.watch(access_log.logging_changed)
    pipeline = QueryPipeline(
        executor,
        config.limits,
        _stages(
            # The span covers every other stage.
            TracingStage(tracing.tracer, reactor) if tracing is not None else None,
            # Cheap refusals that protect the server come first ...
            shedder,
            RateLimitStage(limiter),
            # ... then RBAC, before any work is done for a request that will be denied ...
            auth.authorization if config.auth.enabled else None,
            auth.audit_stage,
            blobs,
            # ... and the observers of every outcome last.
            MetricsStage(metrics, reactor),
            access_log,
        ),
    )
    pipeline.add_rejection_observer(metrics.request_rejected)

    # Front ends: each only translates its wire form into pipeline operations.
    frames = FrameCompressionPolicy(config.compression)
    listener = ListenerService(
        config,
        reactor,
        pipeline,
        authenticate,
        wrap_factory=MeteredFactory.wrapper(metrics),
        gate_factory=ConnectionLimitFactory.wrapper(connection_limiter),
        frame_compression=frames,
    )
    probes = {"storage": storage, "flusher": flusher, "listener": listener, "cluster": cluster}
    web: OpsService | None = None
    if config.web.enabled:
        api = OpsAPI(
            live,
            lifecycle,
            reactor,
            probes.get,
            metrics=metrics,
            lag=lag,
            admin=AdminAPI(pipeline, authenticate, live, reactor),
        )
        web = OpsService(config, reactor, api)

    grpc: GrpcService | None = None
    if config.grpc.enabled:
        grpc = GrpcService(config, reactor, pipeline, authenticate, lambda: lifecycle.ready)
        grpc.observe(metrics.registry)

    protection = Protection(
        cache,
        limiter,
        shedder,
        connection_limiter,
        frames,
        blobs,
        ProtectionCollector(cache, limiter, shedder, connection_limiter),
    )
    metrics_service = MetricsService(metrics, backend)

    # What a reload reaches, all or nothing.
    for component in (
        logging_service,
        storage,
        metrics_service,
        auth,
        ListenerLimits(listener.factory),
        limiter,
        shedder,
        connection_limiter,
        cache,
        frames,
        blobs,
        TLSReloader(listener),
        grpc,
    ):
        if component is None:
            continue
        reloader.register(component)
    watcher = None
    if config.tls.enabled and config.tls.watch:
        watcher = CertificateWatcher(lambda: live.current, reloader.reload, reactor)

    services = tuple(
        child
        for child in (
            logging_service,  # first up, last down
            pools,
            storage,
            cluster,  # registers the node once storage is open; leaves before it closes
            flusher,
            snapshots,  # stops (awaiting a running snapshot) before the storage closes
            web,  # up before the listener, down after it: /readyz says 503 while it drains
            audit,
            auth,  # keys and roles are read when it starts
            fhe,  # FHE workers: up before the front ends, stopped after they drained
            lag,
            tracing,
            metrics_service,
            grpc,  # stops after the native listener: calls in flight finish, then GOAWAY
            listener,
            ProtectionService(metrics.registry, protection.collector),
            watcher,
            ReloaderService(reloader, reactor),  # SIGHUP reloads only while everything else runs
        )
        if child is not None
    )
    components = Components(
        live=live,
        lifecycle=lifecycle,
        pools=pools,
        backend=backend,
        executor=executor,
        pipeline=pipeline,
        authenticate=authenticate,
        audit=audit,
        auth=auth,
        metrics=metrics,
        logging=logging_service,
        lag=lag,
        tracing=tracing,
        protection=protection,
        reloader=reloader,
        listener=listener,
        grpc=grpc,
        web=web,
        services=services,
    )
    return AmatersService(components, reactor)


__all__ = [
    "SERVER_CHECKS",
    "AmatersService",
    "Components",
    "PoolsService",
    "build_service",
    "load_server_config",
]
