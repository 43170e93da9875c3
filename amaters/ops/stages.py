"""Observability pipeline stages: metrics, the access log (with slow-request warnings), and spans.

Each is an :class:`~amaters.query.pipeline.IPipelineStage` added to ``root.pipeline``; the pipeline
runs every stage's ``after`` for every request that reached the stages, successful or not, with the
outcome already turned into an :class:`~amaters.errors.AmatersError` failure when it failed.

A request's duration runs from ``ctx.started`` (when its bytes arrived) to the ``after`` call (when
its answer is ready; for requests answered at once that arrived in one read with others, when all
of that read's answers are, as they are sent together and the afters run for all of them with
``after_many``).  For ``range`` that is until its stream opens: the chunks that follow are
paced by the client.  None of these stages ever sees or records a key or a value: operations expose
only ``name``, ``collection`` and ``kind``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from amaters.config import LoggingConfig
from amaters.errors import AmatersError, ErrorCode
from amaters.ops.metrics import Metrics
from amaters.ops.tracing import extract_context
from amaters.query import operations as ops
from amaters.query.pipeline import PipelineStage, RequestContext

#: Where the access log events go (a namespace of its own, so it can be filtered apart).
ACCESS_LOG_NAMESPACE = "amaters.access"

#: ``ctx.annotations`` key a protocol sets to the W3C trace context (``traceparent``,
#: ``tracestate``) a client sent with a request.
TRACE_CONTEXT = "trace_context"

_SPAN = "otel.span"

#: A duration this close under ``logging.slow_request_ms`` is rounded (to the µs the event shows)
#: before it is compared; further under, it is not slow whatever the rounding.
_SLOW_MARGIN_MS = 0.001

#: Shared by every successful span (a Status is immutable).
_OK = Status(StatusCode.OK)


def outcome_error(outcome: object) -> AmatersError | None:
    """The error a request failed with, or None if it succeeded."""
    if isinstance(outcome, Failure):
        error = outcome.value
        if isinstance(error, AmatersError):
            return error
        return AmatersError("internal server error", code=ErrorCode.SERVER_INTERNAL)
    return None


def elapsed(ctx: RequestContext, clock: IReactorTime) -> float | None:
    """Seconds since the request arrived, or None when the protocol did not record its arrival."""
    if ctx.started <= 0:
        return None
    return max(0.0, clock.seconds() - ctx.started)


def _principal_name(ctx: RequestContext) -> str:
    return str(getattr(ctx.principal, "name", "") or "-")


class MetricsStage(PipelineStage):
    """Counts every request in ``amaters_requests_total`` and times it by operation."""

    name = "metrics"

    def __init__(self, metrics: Metrics, clock: IReactorTime) -> None:
        self.metrics = metrics
        self.clock = clock

    def after(self, ctx: RequestContext, op: ops.Operation, outcome: object) -> None:
        # The hottest after(): elapsed() and outcome_error() inlined (same values, fewer calls).
        started = ctx.started
        duration = max(0.0, self.clock.seconds() - started) if started > 0 else None
        if isinstance(outcome, Failure):
            error = outcome_error(outcome)
            assert error is not None
            self.metrics.request_finished(op.name, duration, int(error.code))
        else:
            self.metrics.request_finished(op.name, duration, None)

    def after_many(self, items: list[Any]) -> None:
        """:meth:`after` for requests answered together (in one reactor turn): one clock read, and
        the successes of each operation counted in one call.  A request that arrived with the one
        before it (the requests of one read share their arrival) reuses its duration."""
        now = self.clock.seconds()
        timed: dict[str, list[float]] = {}
        untimed: dict[str, int] = {}
        last_started = -1.0
        last_name = ""
        durations: list[float] | None = None
        duration = 0.0
        for ctx, op, outcome in items:
            if isinstance(outcome, Failure):
                self.after(ctx, op, outcome)
                continue
            started = ctx.started
            name = op.name
            if started != last_started or name != last_name:
                last_started, last_name = started, name
                if started > 0:
                    durations = timed.get(name)
                    if durations is None:
                        durations = timed[name] = []
                    duration = now - started if now > started else 0.0
                else:
                    durations = None
            if durations is not None:
                durations.append(duration)
            else:
                untimed[name] = untimed.get(name, 0) + 1
        succeeded = self.metrics.requests_succeeded
        for name, found in timed.items():
            succeeded(name, found, untimed.pop(name, 0))
        for name, count in untimed.items():
            succeeded(name, [], count)


class AccessLogStage(PipelineStage):
    """One debug event per request (op, collection, status, duration, principal, source), and a
    warning for a request slower than ``logging.slow_request_ms``.

    ``slow_request_ms`` is the setting in effect and ``debug`` whether a debug event in
    :data:`ACCESS_LOG_NAMESPACE` would be written (so a server at level info does not build an event
    per request only to drop it); both are plain attributes, read on every request, that
    :meth:`logging_changed` refreshes when ``[logging]`` is reloaded.  ``debug_enabled()`` asks the
    log filter.
    """

    name = "accesslog"

    def __init__(
        self,
        clock: IReactorTime,
        slow_request_ms: int,
        debug_enabled: Callable[[], bool] = lambda: True,
    ) -> None:
        # An instance attribute: as a class attribute, Logger's descriptor would replace the
        # namespace with the class name.
        self._log = Logger(namespace=ACCESS_LOG_NAMESPACE)
        self.clock = clock
        self.debug_enabled = debug_enabled
        self.slow_request_ms = slow_request_ms
        self.debug = debug_enabled()

    def logging_changed(self, settings: LoggingConfig) -> None:
        """Re-read the threshold and the debug level (called after ``[logging]`` was applied)."""
        self.slow_request_ms = settings.slow_request_ms
        self.debug = self.debug_enabled()

    def after_many(self, items: list[Any]) -> None:
        """:meth:`after` for requests answered together; nothing at all when none of them is slow
        and debug events are off."""
        if not self.debug:
            threshold = self.slow_request_ms
            if threshold <= 0:
                return
            starts = [item[0].started for item in items]
            earliest = min(starts)
            if earliest <= 0:  # some arrivals unknown (0): the earliest known one
                earliest = min((started for started in starts if started > 0), default=0.0)
            if earliest <= 0 or (self.clock.seconds() - earliest) * 1000.0 < threshold - _SLOW_MARGIN_MS:
                return
        after = self.after
        for ctx, op, outcome in items:
            after(ctx, op, outcome)

    def after(self, ctx: RequestContext, op: ops.Operation, outcome: object) -> None:
        threshold = self.slow_request_ms
        started = ctx.started
        if threshold <= 0 or started <= 0:
            # It cannot be slow: unless debug is on there is nothing to log, not even a clock to read.
            if not self.debug:
                return
            slow = False
            duration_ms = round(max(0.0, self.clock.seconds() - started) * 1000.0, 3) if started > 0 else -1.0
        else:
            raw_ms = max(0.0, self.clock.seconds() - started) * 1000.0
            # Well under the threshold: no rounding.  Near it, the rounded value (the one the event
            # shows) decides, as it always has.
            slow = raw_ms >= threshold - _SLOW_MARGIN_MS and round(raw_ms, 3) >= threshold
            if not slow and not self.debug:
                return
            duration_ms = round(raw_ms, 3)
        error = outcome_error(outcome)
        fields: dict[str, Any] = {
            "op": op.name,
            "collection": op.collection or "-",
            "status": "ok" if error is None else "error",
            "error_code": error.code.name if error is not None else None,
            "duration_ms": duration_ms,
            "principal": _principal_name(ctx),
            "source": ctx.source or "-",
            "request_id": ctx.request_id,
            "protocol": ctx.protocol,
        }
        if slow:
            self._log.warn(
                "Slow {op} request on {collection}: {duration_ms} ms (logging.slow_request_ms ="
                " {threshold}), {status}, by {principal} from {source}",
                threshold=threshold,
                **fields,
            )
        else:
            self._log.emit(
                LogLevel.debug,
                "{op} {collection} {status} {duration_ms} ms by {principal} from {source}",
                **fields,
            )


class TracingStage(PipelineStage):
    """One OpenTelemetry span per request: ``amaters <op>``, kind SERVER, with op, collection,
    principal, status and error code attributes, from arrival to answer.

    The parent is the client's W3C trace context when the protocol put one in
    ``ctx.annotations["trace_context"]`` (or on the session, from the handshake); the span is
    kept in ``ctx.annotations`` between ``before`` and ``after``.  Install it first, so its span covers
    the other stages.
    """

    name = "tracing"
    reads_trace_context = True

    def __init__(self, tracer: Tracer, clock: IReactorTime) -> None:
        self.tracer = tracer
        self.clock = clock

    def _start(self, ctx: RequestContext, op: ops.Operation) -> Span:
        carrier = ctx.annotations.get(TRACE_CONTEXT) or getattr(ctx.session, "trace_context", None)
        attributes: dict[str, str | int] = {
            "db.system": "amaters",
            "db.operation.name": op.name,
            "amaters.op": op.name,
            "amaters.request_id": ctx.request_id,
            "amaters.protocol": ctx.protocol,
            "enduser.id": _principal_name(ctx),
        }
        if op.collection:
            attributes["db.collection.name"] = op.collection
            attributes["amaters.collection"] = op.collection
        if isinstance(op, ops.Batch):
            attributes["amaters.batch.size"] = len(op.ops)
        start = int(ctx.started * 1e9) if ctx.started > 0 else None
        span = self.tracer.start_span(
            f"amaters {op.name}",
            context=extract_context(carrier),
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=start,
        )
        ctx.annotations[_SPAN] = span
        return span

    def before(self, ctx: RequestContext, op: ops.Operation) -> object:
        self._start(ctx, op)
        return None

    def after(self, ctx: RequestContext, op: ops.Operation, outcome: object) -> None:
        span = ctx.annotations.pop(_SPAN, None)
        if span is None:  # refused by a stage that ran before this one
            span = self._start(ctx, op)
            ctx.annotations.pop(_SPAN, None)
        error = outcome_error(outcome)
        started = ctx.started
        now = self.clock.seconds()  # one reading for the duration attribute and the end time
        if started > 0:
            span.set_attribute("amaters.duration_ms", round(max(0.0, now - started) * 1000.0, 3))
        if error is None:
            span.set_attribute("amaters.status", "ok")
            span.set_status(_OK)
        else:
            span.set_attribute("amaters.status", "error")
            span.set_attribute("amaters.error_code", error.code.name)
            span.set_status(Status(StatusCode.ERROR, error.code.name))
        end = int(now * 1e9) if started > 0 else None
        span.end(end_time=end)
