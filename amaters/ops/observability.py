"""Metrics around the front ends and storage: connection and byte counts, authentication failures,
and the ``metrics`` service that reads storage statistics at start.

The composition root (:mod:`amaters.compose`) wraps the listener's factory with
:class:`MeteredFactory` and its authenticator with :func:`counting_authenticator`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

from amaters.config import Config
from amaters.errors import AuthError
from amaters.interfaces import IStorageBackend
from amaters.ops.metrics import Metrics, auth_method_label

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
    """What a protocol counts itself (``AmatersServerProtocol._meter``): one shared by every
    connection of a :class:`MeteredFactory`.

    Connections opened and closed are counter updates; the bytes of every read and write are
    added to :attr:`received` and :attr:`sent`, plain integers the protocol increments (no call on
    the data path), which every metrics collection moves into ``amaters_bytes_*_total``.
    """

    __slots__ = ("_active", "_connections", "_metrics", "closed", "received", "sent")

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._connections = metrics.connections.inc
        self._active = metrics.connections_active
        self.closed = metrics.connections_active.dec
        #: Bytes received and sent since the last collection.
        self.received = 0
        self.sent = 0
        metrics.add_flusher(self.flush)

    def opened(self) -> None:
        self._connections()
        self._active.inc()

    def flush(self) -> None:
        """Move the bytes counted since the last collection into their counters."""
        received, sent = self.received, self.sent
        if received:
            self.received = 0
            self._metrics.bytes_received.inc(received)
        if sent:
            self.sent = 0
            self._metrics.bytes_sent.inc(sent)


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

    def __init__(self, metrics: Metrics, backend: IStorageBackend) -> None:
        self.metrics = metrics
        self.backend = backend

    def startService(self) -> defer.Deferred[None]:
        super().startService()
        d: defer.Deferred[Any] = defer.maybeDeferred(self.backend.stats)
        d.addCallback(self.metrics.storage.update)

        def failed(failure: Failure) -> None:
            self._log.failure("Reading storage statistics for metrics failed", failure)

        d.addErrback(failed)
        return d

    def prepare_reload(self, old: Config, new: Config) -> Callable[[], None] | None:
        """``web.metrics_max_collections`` applies from the next scrape."""
        limit = new.web.metrics_max_collections
        if old.web.metrics_max_collections == limit:
            return None

        def commit() -> None:
            self.metrics.storage.max_collections = limit

        return commit


__all__ = [
    "LAG_PROBE_INTERVAL",
    "ConnectionMeter",
    "MeteredFactory",
    "MetricsService",
    "counting_authenticator",
]
