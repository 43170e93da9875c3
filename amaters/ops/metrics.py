"""Prometheus metrics: one :class:`Metrics` object owning its own ``CollectorRegistry``.

Nothing here touches ``prometheus_client``'s global ``REGISTRY``: the registry is created per
:class:`Metrics` instance and served by the ops site's ``/metrics`` route, so tests (and several
servers in one process) never share or leak series.

Label values are always from small fixed sets (operation names, error code names, authentication
methods) or, for ``amaters_storage_keys``, the largest ``max_collections`` collection names with the
rest summed as ``other``.  Keys, values, tokens and peer addresses never become labels.
``docs/observability.md`` lists every metric.
"""

from __future__ import annotations

import bisect
import typing
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from amaters import __version__
from amaters.compiled import build_name
from amaters.errors import AmatersError, ErrorCode
from amaters.ops.collectors import Flush, StorageCollector, WithoutCreated
from amaters.query import operations as ops

#: Every operation name a pipeline request can carry (``Operation.name``); anything else is "other".
OPERATIONS = tuple(dict.fromkeys((*(op.name for op in typing.get_args(ops.Operation)), "filter", "update")))

#: Authentication methods as the handshake presents them; anything else is "other".
AUTH_METHODS = ("bearer_token", "api_key", "certificate", "anonymous")

#: Request latency buckets (seconds): 100 µs (a cached GET) to 30 s (a request near its timeout).
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

#: WAL fsync buckets (seconds): a fast NVMe fsync is ~50 µs, a struggling disk seconds.
FSYNC_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

#: At most this many error codes get a remembered ``amaters_errors_total`` child.
_MAX_CACHED_CODES = 256


class _Tally:
    """One operation's requests since the last collection, in plain numbers (reactor thread only).

    ``request_finished`` adds to it (two integer additions and a bisect, no locks); the registry's
    first collector moves it into the prometheus children before any of them is read.
    """

    __slots__ = ("bounds", "buckets", "error", "ok", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.ok = 0
        self.error = 0
        self.sum = 0.0
        self.buckets = [0] * len(bounds)


#: Writes acknowledged by one fsync.
GROUP_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: WAL syncs kept before they are moved into their histograms without waiting for a collection.
MAX_PENDING_SYNCS = 4096


def operation_label(name: str) -> str:
    """The ``op`` label for an operation name (bounded: unknown names become "other")."""
    return name if name in OPERATIONS else "other"


def error_code_label(code: int) -> str:
    """The ``code`` label for an error code: its lower-case name, e.g. ``storage_not_found``."""
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return "unknown"


def auth_method_label(method: str | None) -> str:
    """The ``method`` label for an authentication method ("none" when no credentials were sent)."""
    if not method:
        return "none"
    return method if method in AUTH_METHODS else "other"


class Metrics:
    """Every amaters metric, registered on this object's own ``registry``."""

    def __init__(self, *, max_collections: int = 20, process: bool = True) -> None:
        registry = self.registry = CollectorRegistry(auto_describe=True)
        # Request counts and durations are tallied per operation and moved into their children
        # when the registry is collected (a scrape), not on every request: see _Tally.
        self._tallies: dict[str, _Tally] = {}
        self._flushers: list[Callable[[], None]] = []
        self._observe_fallback: dict[str, Callable[[float], None]] = {}
        registry.register(Flush(self.flush))
        #: (group size, duration) of the WAL syncs since the last collection (storage_synced).
        self._pending_syncs: list[tuple[int, float]] = []
        self._flushers.append(self._flush_syncs)
        self.requests = Counter(
            "amaters_requests",
            "Requests answered, by operation and outcome (status is ok or error).",
            ["op", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "amaters_request_duration_seconds",
            "Time from a request's arrival to its answer, by operation (range: until its stream opens).",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "amaters_errors",
            "Requests answered with an error, by error code name.",
            ["code"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "amaters_rate_limited",
            "Requests refused with SERVER_OVERLOADED (rate limits, load shedding) and logins refused by"
            " the login throttle.",
            registry=registry,
        )
        self.auth_failures = Counter(
            "amaters_auth_failures",
            "Handshakes refused by authentication, by the credential type presented.",
            ["method"],
            registry=registry,
        )
        self.connections_active = Gauge(
            "amaters_connections_active", "Native protocol connections open now.", registry=registry
        )
        self.connections = Counter(
            "amaters_connections", "Native protocol connections accepted.", registry=registry
        )
        self.bytes_received = Counter(
            "amaters_bytes_received",
            "Bytes received on native protocol connections (frames, before TLS decryption).",
            registry=registry,
        )
        self.bytes_sent = Counter(
            "amaters_bytes_sent",
            "Bytes sent on native protocol connections (frames, before TLS encryption).",
            registry=registry,
        )
        self.fhe_evaluations = Counter(
            "amaters_fhe_evaluations", "Encrypted rows evaluated by FILTER and UPDATE.", registry=registry
        )
        self.fhe_row_seconds = Histogram(
            "amaters_fhe_row_seconds",
            "Worker seconds per encrypted row evaluated (FILTER and UPDATE).",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=registry,
        )
        self.fhe_key_sets_loaded = Counter(
            "amaters_fhe_key_sets_loaded", "Evaluation key sets loaded into a worker.", registry=registry
        )
        self.fhe_circuit_cache = Counter(
            "amaters_fhe_circuit_cache",
            "FHE circuit lookups by a worker: hit (read from disk) or miss (compiled).",
            ["result"],
            registry=registry,
        )
        self.storage = StorageCollector(max_collections)
        registry.register(self.storage)
        self.fsync_duration = Histogram(
            "amaters_storage_fsync_duration_seconds",
            "Duration of each write-ahead-log fsync (group commit, interval sync, flush).",
            buckets=FSYNC_BUCKETS,
            registry=registry,
        )
        self.group_commit_size = Histogram(
            "amaters_storage_group_commit_size",
            "Writes acknowledged by each write-ahead-log fsync.",
            buckets=GROUP_SIZE_BUCKETS,
            registry=registry,
        )
        self.fsync_failures = Counter(
            "amaters_storage_fsync_failures",
            "Write-ahead-log fsyncs that failed (their writes were answered with an error).",
            registry=registry,
        )
        self.reactor_lag = Gauge(
            "amaters_reactor_lag_seconds",
            "How late the reactor ran the last lag probe: time the event loop was busy or blocked.",
            registry=registry,
        )
        self.build_info = Gauge(
            "amaters_build_info",
            "Always 1; its labels say which version runs, and whether its request path is compiled.",
            ["version", "build"],
            registry=registry,
        )
        self.build_info.labels(version=__version__, build=build_name()).set(1)
        #: Error code -> ``amaters_errors_total{code}.inc`` (error codes are a fixed enum).
        self._by_code: dict[int, Callable[[float], None]] = {}
        for op in OPERATIONS:
            # Every operation's series exist from the start, so rate() works before the first error.
            self._op_children(op)
        for method in (*AUTH_METHODS, "none"):
            self.auth_failures.labels(method=method)
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    # -- recording ------------------------------------------------------------------------------

    def _op_children(self, label: str) -> _Tally:
        """The tally for op ``label``, and its ``requests{op,status}`` and ``request_duration{op}``
        children (created on first use; labels are bounded by :func:`operation_label`)."""
        tally = self._tallies.get(label)
        if tally is not None:
            return tally
        ok = self.requests.labels(op=label, status="ok")
        error = self.requests.labels(op=label, status="error")
        histogram = self.request_duration.labels(op=label)
        try:
            bounds = tuple(float(b) for b in histogram._upper_bounds)
            bucket_incs = [bucket.inc for bucket in histogram._buckets]
            sum_inc = histogram._sum.inc
            ok_inc, error_inc = ok._value.inc, error._value.inc
            if len(bucket_incs) != len(bounds):
                raise AttributeError("buckets")
        except AttributeError:
            # The client library keeps its values elsewhere: fall back to its public calls.
            observe = histogram.observe
            bounds = ()
            bucket_incs, sum_inc, ok_inc, error_inc = [], None, ok.inc, error.inc
        tally = _Tally(bounds)

        def flush() -> None:
            if tally.ok:
                ok_inc(tally.ok)
                tally.ok = 0
            if tally.error:
                error_inc(tally.error)
                tally.error = 0
            if sum_inc is not None and any(tally.buckets):
                sum_inc(tally.sum)
                tally.sum = 0.0
                buckets = tally.buckets
                for i, count in enumerate(buckets):
                    if count:
                        bucket_incs[i](count)
                        buckets[i] = 0

        if sum_inc is None:
            tally.buckets = []  # durations observed at once, through the library
            self._observe_fallback[label] = observe
        self._tallies[label] = tally
        self._flushers.append(flush)
        return tally

    def add_flusher(self, flush: Callable[[], None]) -> None:
        """Call ``flush()`` at the start of every collection, to move numbers kept in plain
        attributes (cheaper to update per request or per read) into their prometheus metrics."""
        self._flushers.append(flush)

    def flush(self) -> None:
        """Move the request tallies into their prometheus children (done by every collection)."""
        for flush in self._flushers:
            flush()

    def request_finished(self, op: str, duration: float | None, error_code: int | None) -> None:
        """Count an answered request; ``error_code`` None means it succeeded (see also
        :meth:`requests_succeeded`, for many at once).

        Called on the reactor thread; the numbers reach the registry when it is next collected.
        """
        tally = self._tallies.get(op)
        if tally is None:  # "other", or an operation name outside OPERATIONS
            tally = self._op_children(operation_label(op))
        if error_code is None:
            tally.ok += 1
        else:
            tally.error += 1
        if duration is not None and duration >= 0:
            if tally.buckets:
                tally.sum += duration
                # The first bucket whose upper bound is not below the duration (the last is +Inf).
                tally.buckets[bisect.bisect_left(tally.bounds, duration)] += 1
            else:
                self._observe_fallback[operation_label(op)](duration)
        if error_code is not None:
            inc = self._by_code.get(error_code)
            if inc is None:
                inc = self.errors.labels(code=error_code_label(error_code)).inc
                if len(self._by_code) < _MAX_CACHED_CODES:  # codes are an enum; cap the unknown
                    self._by_code[error_code] = inc
            inc(1)
            if error_code == ErrorCode.SERVER_OVERLOADED:
                self.rate_limited.inc(1)

    def requests_succeeded(self, op: str, durations: list[float], untimed: int = 0) -> None:
        """Count successful ``op`` requests: one per duration in ``durations`` (seconds, each
        observed), and ``untimed`` more without one.  ``request_finished`` for each, in one call."""
        tally = self._tallies.get(op)
        if tally is None:
            tally = self._op_children(operation_label(op))
        tally.ok += len(durations) + untimed
        buckets = tally.buckets
        if buckets:
            bounds = tally.bounds
            for duration in durations:
                buckets[bisect.bisect_left(bounds, duration)] += 1
            tally.sum += sum(durations)
        else:
            observe = self._observe_fallback[operation_label(op)]
            for duration in durations:
                observe(duration)

    def request_rejected(self, op: str | None, error: AmatersError) -> None:
        """A pipeline rejection observer: validation refused a request (counted, not timed)."""
        self.request_finished(op or "other", None, int(error.code))

    def storage_synced(self, group_size: int, duration: float, ok: bool) -> None:
        """A group-commit observer: one WAL fsync of ``group_size`` writes took ``duration`` seconds.

        A lone durable writer makes one sync per write, so a sync is only noted here and observed
        into the two histograms by the next collection (two observations take a lock and a dozen
        calls each); after :data:`MAX_PENDING_SYNCS` of them without a collection, at once.
        """
        if ok:
            pending = self._pending_syncs
            pending.append((group_size, duration))
            if len(pending) >= MAX_PENDING_SYNCS:
                self._flush_syncs()
        else:
            self.fsync_failures.inc()

    def _flush_syncs(self) -> None:
        pending, self._pending_syncs = self._pending_syncs, []
        observe_duration = self.fsync_duration.observe
        observe_size = self.group_commit_size.observe
        for group_size, duration in pending:
            observe_duration(duration)
            observe_size(group_size)

    # -- exposition -----------------------------------------------------------------------------

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry rendered for a scrape with this ``Accept`` header: (body, content type).

        Prometheus' text format unless the scraper asks for OpenMetrics.  The text format leaves
        out the ``*_created`` series: it can only show them as separate gauges, one more series per
        counter and histogram child that no dashboard uses (OpenMetrics carries them as metadata).
        """
        encoder, content_type = choose_encoder(accept or "")
        if content_type.startswith("application/openmetrics-text"):
            return encoder(self.registry), content_type
        return encoder(WithoutCreated(self.registry)), content_type
