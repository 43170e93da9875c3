"""Wiring metrics, logging, tracing and the lag monitor into the service tree (``amaters.tap``).

:func:`install_observability` is called by ``build_service`` once the listener and
``root.pipeline`` exist.  It only wires objects (no I/O) and adds these children:

- ``logging`` (:class:`~amaters.ops.logging.LoggingService`), made the *first* child so it starts
  before and stops after everything else;
- ``lagmonitor`` (:class:`~amaters.ops.lag.LagMonitor`), ``tracing`` when ``tracing.enabled``
  (:class:`~amaters.ops.tracing.TracingService`) and ``metrics`` (:class:`MetricsService`), placed
  just before the listener so they stop after it has drained (the spans of the last requests are
  still exported).

It also adds the pipeline stages (tracing first; metrics and access log last), hooks the storage
statistics and group-commit observers, counts connections and bytes with :class:`MeteredFactory`,
counts authentication failures around the listener's authenticator, and registers the reloadable
parts with ``root.reloader``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger, LogLevel
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

from amaters.config import Config
from amaters.errors import AuthError
from amaters.ops.lag import LagMonitor
from amaters.ops.logging import LoggingService
from amaters.ops.stages import ACCESS_LOG_NAMESPACE, AccessLogStage, MetricsStage, TracingStage
from amaters.ops.tracing import TracingService
from amaters.web.metrics import Metrics, auth_method_label

#: How often the lag monitor probes the reactor (seconds).
LAG_PROBE_INTERVAL = 0.5


# -- connections and bytes ---------------------------------------------------------------------


class MeteredProtocol(ProtocolWrapper):
    """Counts a connection and the bytes through it, then passes everything on unchanged."""

    factory: MeteredFactory

    def connectionMade(self) -> None:
        metrics = self.factory.metrics
        metrics.connections.inc()
        metrics.connections_active.inc()

    def dataReceived(self, data: bytes) -> None:
        self.factory.metrics.bytes_received.inc(len(data))
        super().dataReceived(data)

    def write(self, data: bytes) -> None:
        self.factory.metrics.bytes_sent.inc(len(data))
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        chunks = list(data)
        self.factory.metrics.bytes_sent.inc(sum(len(c) for c in chunks))
        super().writeSequence(chunks)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.factory.metrics.connections_active.dec()
        super().connectionLost(reason)


class ConnectionMeter:
    """The counting hooks a protocol calls itself (``AmatersServerProtocol._meter``): one shared
    by every connection of a :class:`MeteredFactory`, each hook a single counter update."""

    __slots__ = ("_active", "_connections", "closed", "received", "sent")

    def __init__(self, metrics: Metrics) -> None:
        self._connections = metrics.connections.inc
        self._active = metrics.connections_active
        self.closed = metrics.connections_active.dec
        self.received = metrics.bytes_received.inc
        self.sent = metrics.bytes_sent.inc

    def opened(self) -> None:
        self._connections()
        self._active.inc()


class MeteredFactory(WrappingFactory):
    """Wraps the native protocol's factory: ``amaters_connections_*`` and ``amaters_bytes_*``.

    Applied inside TLS, so the byte counters count frames (what clients send and receive), not
    TLS records.  A protocol with a ``_meter`` attribute (``AmatersServerProtocol``) counts for
    itself through a :class:`ConnectionMeter` and is returned unwrapped, so no wrapper layer sits
    in its data path; any other protocol is wrapped in a :class:`MeteredProtocol`.
    """

    protocol = MeteredProtocol
    noisy = False

    def __init__(self, wrapped: IProtocolFactory, metrics: Metrics) -> None:
        super().__init__(wrapped)
        self.metrics = metrics
        self.meter = ConnectionMeter(metrics)

    @classmethod
    def wrapper(cls, metrics: Metrics) -> Callable[[IProtocolFactory], MeteredFactory]:
        """A function wrapping a factory with these metrics (the listener's ``wrap_factory``)."""
        return lambda factory: cls(factory, metrics)

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            return None
        if hasattr(protocol, "_meter"):
            protocol._meter = self.meter
            return protocol
        return MeteredProtocol(self, protocol)  # type: ignore[arg-type]


# -- authentication failures -------------------------------------------------------------------


def counting_authenticator(inner: Callable[..., Any], metrics: Metrics) -> Callable[..., Any]:
    """Wrap the listener's ``authenticate(credentials, peer_certificate, source)`` hook so every
    refused handshake counts in ``amaters_auth_failures_total{method}`` (and, when the refusal
    carries ``retry_after``, in ``amaters_rate_limited_total``).  Results pass through unchanged.
    """

    def authenticate(credentials: Any, peer_certificate: Any, source: str) -> defer.Deferred[Any]:
        if credentials is not None:
            method = auth_method_label(getattr(credentials, "kind", None))
        elif peer_certificate is not None:
            method = "certificate"
        else:
            method = "none"
        d: defer.Deferred[Any] = defer.maybeDeferred(inner, credentials, peer_certificate, source)

        def refused(failure: Failure) -> Failure:
            if isinstance(failure.value, AuthError):
                metrics.auth_failures.labels(method=method).inc()
                if failure.value.retry_after_ms is not None:
                    metrics.rate_limited.inc()
            return failure

        d.addErrback(refused)
        return d

    return authenticate


# -- services ----------------------------------------------------------------------------------


class MetricsService(service.Service):
    """The ``metrics`` service: reads storage statistics once at start, so the storage gauges are
    truthful from the first scrape rather than from the flusher's first tick.
    """

    name = "metrics"
    _log = Logger()

    def __init__(self, metrics: Metrics, backend: Any) -> None:
        self.metrics = metrics
        self.backend = backend

    def startService(self) -> defer.Deferred[None]:  # type: ignore[override]
        super().startService()  # type: ignore[no-untyped-call]
        d: defer.Deferred[Any] = defer.maybeDeferred(self.backend.stats)
        d.addCallback(self.metrics.storage.update)

        def failed(failure: Failure) -> None:
            self._log.failure("Reading storage statistics for metrics failed", failure)

        d.addErrback(failed)
        return d  # type: ignore[return-value]

    def prepare_reload(self, old: Config, new: Config) -> Callable[[], None] | None:
        """``web.metrics_max_collections`` applies from the next scrape."""
        limit = new.web.metrics_max_collections
        if old.web.metrics_max_collections == limit:
            return None

        def commit() -> None:
            self.metrics.storage.max_collections = limit

        return commit


@attrs.define
class Observability:
    """What :func:`install_observability` built (tests and the admin API look here)."""

    metrics: Metrics
    logging: LoggingService
    lag: LagMonitor
    tracing: TracingService | None
    stages: list[Any]


def _insert_before(root: service.MultiService, child: service.IService, anchor: str | None) -> None:
    """Add ``child`` to ``root`` just before the child named ``anchor``; first when ``anchor`` is None
    (at the end if there is no such child).

    Start order is list order and stop order its reverse, so the position decides what is still
    running while a neighbour starts or stops.
    """
    child.setServiceParent(root)
    services: list[service.IService] = root.services
    if anchor is None:
        services.remove(child)
        services.insert(0, child)
        return
    for index, other in enumerate(services):
        if getattr(other, "name", None) == anchor:
            services.remove(child)
            services.insert(index, child)
            return


def _child(root: service.MultiService, name: str) -> Any:
    try:
        return root.getServiceNamed(name)
    except KeyError:
        return None


def install_observability(root: Any, config: Config, reactor: Any) -> Observability:
    """Wire metrics, logs, tracing and the lag monitor into ``root`` (see the module docstring)."""
    from amaters.storage import innermost

    metrics = Metrics(max_collections=config.web.metrics_max_collections)

    logging_service = LoggingService(config.logging)
    _insert_before(root, logging_service, None)
    controller = logging_service.controller

    lag = LagMonitor(reactor, LAG_PROBE_INTERVAL, warn_above=lambda: root.config.web.liveness_max_lag)
    lag.add_observer(metrics.reactor_lag.set)
    _insert_before(root, lag, "listener")

    tracing: TracingService | None = None
    if config.tracing.enabled:
        tracing = TracingService(config.tracing, root.getServiceNamed("pools").io)
        _insert_before(root, tracing, "listener")

    metrics_service = MetricsService(metrics, root.backend)
    _insert_before(root, metrics_service, "listener")

    # Storage: gauges from every stats reading, histograms from every WAL fsync.
    flusher = _child(root, "flusher")
    if flusher is not None:
        flusher.add_stats_observer(metrics.storage.update)
    committer = getattr(innermost(root.backend), "group_commit", None)
    if committer is not None:
        committer.add_observer(metrics.storage_synced)

    # Pipeline stages: the span covers every other stage; metrics and the access log see the outcome.
    stages: list[Any] = []
    pipeline = getattr(root, "pipeline", None)
    if pipeline is not None:
        pipeline.add_rejection_observer(metrics.request_rejected)
        if tracing is not None:
            first = pipeline.stages[0].name if pipeline.stages else None
            tracing_stage = TracingStage(tracing.tracer, reactor)
            pipeline.add_stage(tracing_stage, before=first)
            stages.append(tracing_stage)
        for stage in (
            MetricsStage(metrics, reactor),
            AccessLogStage(
                reactor,
                lambda: root.config.logging.slow_request_ms,
                # A partial rather than a lambda: one Python frame less on every request.
                partial(controller.enabled_for, LogLevel.debug, ACCESS_LOG_NAMESPACE),
            ),
        ):
            pipeline.add_stage(stage)
            stages.append(stage)

    # The listener: connections and bytes, authentication failures.
    # (After auth has installed its authenticator: this wraps whichever is in place.)
    listener = _child(root, "listener")
    if listener is not None:
        listener.wrap_factory = MeteredFactory.wrapper(metrics)
        listener.factory.authenticate = counting_authenticator(listener.factory.authenticate, metrics)

    web = _child(root, "web")
    if web is not None and hasattr(web, "observe"):
        web.observe(metrics, lag)

    reloader = getattr(root, "reloader", None)
    if reloader is not None:
        reloader.register(logging_service)
        reloader.register(metrics_service)

    root.metrics = metrics
    observability = Observability(metrics, logging_service, lag, tracing, stages)
    root.observability = observability
    return observability
