"""OpenTelemetry tracing: our own ``TracerProvider`` (never the global one), built from ``[tracing]``.

- ``tracing.enabled``: whether the tracing pipeline stage is installed at all (off: no cost).
- ``tracing.exporter``: ``otlp`` (OTLP over HTTP in a background batch thread; needs the optional
  ``opentelemetry-exporter-otlp-proto-http`` package, and config validation says so when it is
  missing), ``console`` (each finished span is a log event on the server log, in text or JSON like
  every other line), or ``none`` (spans are sampled and carry the client's trace context, but are
  not exported).
- ``tracing.sample_ratio``: the fraction of new traces recorded; a request carrying a W3C trace
  context follows the client's sampling decision (``ParentBased``).

The provider is owned by :class:`TracingService`, which flushes and shuts it down (in a pool thread:
the batch exporter joins its thread) when the server stops.  The spans themselves come from
:class:`amaters.ops.stages.TracingStage`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from amaters import __version__
from amaters.config import OTLP_EXPORTER_MODULE, TracingConfig

_OTLP_MODULE = OTLP_EXPORTER_MODULE

#: W3C trace context (``traceparent``, ``tracestate``) is what clients send.
PROPAGATOR = TraceContextTextMapPropagator()


def otlp_exporter_available() -> bool:
    """Whether the optional OTLP/HTTP span exporter can be imported."""
    try:
        importlib.import_module(_OTLP_MODULE)
    except ImportError:
        return False
    return True


#: The context of a request without a parent: shared, as a Context cannot be changed.
_NO_PARENT = Context()


def extract_context(carrier: Mapping[str, str] | None) -> Context:
    """The parent context a client sent (``traceparent``/``tracestate``), or an empty one.

    Never the ambient context: a request's span has the client's parent or none.
    """
    if not carrier:
        return _NO_PARENT
    return PROPAGATOR.extract(carrier=dict(carrier), context=Context())


class LogSpanExporter(SpanExporter):
    """The ``console`` exporter: one log event per finished span (on the reactor thread).

    The event carries ``trace_id``, ``span_id``, ``parent_span_id``, ``span`` (name),
    ``duration_ms`` and ``attributes``, so JSON logs can be joined with traces.
    """

    def __init__(self) -> None:
        # An instance attribute: Logger's class-attribute descriptor would rename the namespace.
        self._log = Logger(namespace="amaters.tracing")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            context = span.get_span_context()
            if context is None:
                continue
            parent = span.parent
            duration = (span.end_time or 0) - (span.start_time or 0)
            self._log.info(
                "span {span} trace={trace_id} id={span_id} {duration_ms:.3f} ms {attributes}",
                span=span.name,
                trace_id=format(context.trace_id, "032x"),
                span_id=format(context.span_id, "016x"),
                parent_span_id=format(parent.span_id, "016x") if parent is not None else "",
                duration_ms=duration / 1e6,
                attributes=dict(span.attributes or {}),
                status=span.status.status_code.name.lower(),
            )
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _otlp_exporter(endpoint: str) -> SpanExporter:
    module: Any = importlib.import_module(_OTLP_MODULE)
    exporter: SpanExporter = module.OTLPSpanExporter(endpoint=endpoint or None)
    return exporter


def build_tracer_provider(settings: TracingConfig, exporter: SpanExporter | None = None) -> TracerProvider:
    """A provider for ``settings``; ``exporter`` (tests: an in-memory one) replaces the configured one.

    Given exporters and ``console`` export synchronously as each span ends; ``otlp`` batches in a
    background thread.
    """
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        resource=Resource.create({"service.name": settings.service_name, "service.version": __version__}),
        shutdown_on_exit=False,
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif settings.exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(LogSpanExporter()))
    elif settings.exporter == "otlp":
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(settings.otlp_endpoint)))
    return provider


class BlockingRunner(Protocol):
    """Runs a blocking callable off the reactor thread (:class:`amaters.service.ThreadPoolService`)."""

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]: ...


class TracingService(service.Service):
    """The ``tracing`` service: owns the TracerProvider; flushes and shuts it down on stop.

    ``runner.run(f)`` runs ``f`` off the reactor thread (``pools.io``); shutting down a batch
    exporter waits for its export thread.
    """

    name = "tracing"
    _log = Logger()

    def __init__(
        self, settings: TracingConfig, runner: BlockingRunner, exporter: SpanExporter | None = None
    ) -> None:
        self.settings = settings
        self.runner = runner
        # Built at wiring time: creating a provider does no I/O (the batch thread starts lazily).
        self.provider = build_tracer_provider(settings, exporter)
        self.tracer: Tracer = self.provider.get_tracer("amaters", __version__)

    def startService(self) -> None:
        super().startService()
        self._log.info(
            "Tracing requests: exporter {exporter}, sample ratio {ratio}",
            exporter=self.settings.exporter,
            ratio=self.settings.sample_ratio,
        )

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        d: defer.Deferred[None] = self.runner.run(self.provider.shutdown)

        def failed(failure: Any) -> None:
            self._log.failure("Shutting down the tracer provider failed", failure)

        d.addErrback(failed)
        return d
