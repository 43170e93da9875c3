"""OpenTelemetry spans per request, recorded with the SDK's in-memory exporter on a task.Clock."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, Logger
from twisted.python.failure import Failure

from amaters.config import ConfigError, LimitsConfig, TracingConfig, load_config
from amaters.errors import PermissionDenied
from amaters.ops.stages import TRACE_CONTEXT, TracingStage
from amaters.ops.tracing import LogSpanExporter, TracingService, otlp_exporter_available
from amaters.proto import envelope_pb2, types_pb2
from amaters.protocols.framing import encode_frame
from amaters.protocols.server import ANONYMOUS, AmatersServerFactory
from amaters.query import operations as ops
from amaters.query.executor import QueryExecutor
from amaters.query.pipeline import PipelineStage, QueryPipeline, RequestContext
from amaters.storage.memory import MemoryBackend
from amaters.types import CipherBlob

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Inline:
    """Runs 'blocking' work inline (the synchronous pool of unit tests)."""

    def run(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(f, *args)


def traced(
    clock: Clock, *, sample_ratio: float = 1.0, stages: tuple[PipelineStage, ...] = ()
) -> tuple[QueryPipeline, InMemorySpanExporter, TracingService]:
    exporter = InMemorySpanExporter()
    settings = attrs.evolve(TracingConfig(), enabled=True, sample_ratio=sample_ratio)
    service = TracingService(settings, Inline(), exporter)
    backend = MemoryBackend()
    backend.open()
    pipeline = QueryPipeline(
        QueryExecutor(backend, auto_create_collections=True, range_chunk_size=2), LimitsConfig(), stages
    )
    first = pipeline.stages[0].name if pipeline.stages else None
    pipeline.add_stage(TracingStage(service.tracer, clock), before=first)
    return pipeline, exporter, service


def test_a_span_per_request_with_op_collection_status_and_duration() -> None:
    """A SET records one SERVER span "amaters set" from the request's arrival to its answer, with
    op, collection, principal and status attributes, and no key or value anywhere."""
    clock = Clock()
    clock.advance(1000)
    pipeline, exporter, service = traced(clock)
    ctx = RequestContext(9, ANONYMOUS, "127.0.0.1:1", started=999.75)
    d = pipeline.execute(ctx, ops.Set("users", b"secret-key", CipherBlob.wrap(b"secret-value")))
    assert d.called
    (span,) = exporter.get_finished_spans()
    assert span.name == "amaters set"
    assert span.kind == SpanKind.SERVER
    attributes = dict(span.attributes or {})
    assert attributes["amaters.op"] == "set"
    assert attributes["amaters.collection"] == "users"
    assert attributes["amaters.status"] == "ok"
    assert attributes["amaters.request_id"] == 9
    assert attributes["enduser.id"] == "anonymous"
    assert attributes["amaters.duration_ms"] == 250.0
    assert span.start_time == 999_750_000_000 and span.end_time == 1_000_000_000_000
    assert span.status.status_code == StatusCode.OK
    assert "secret" not in repr(attributes)
    assert span.resource.attributes["service.name"] == "amaters"
    service.stopService()


def test_refused_request_has_an_error_span() -> None:
    """A request a later stage refuses still gets its span, with ERROR status and the error code."""

    class Deny(PipelineStage):
        name = "rbac"

        def before(self, ctx: RequestContext, op: ops.Operation) -> object:
            raise PermissionDenied("no")

    clock = Clock()
    pipeline, exporter, service = traced(clock, stages=(Deny(),))
    d = pipeline.execute(RequestContext(1, ANONYMOUS, started=0.0), ops.Get("c", b"k"))
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert dict(span.attributes or {})["amaters.error_code"] == "AUTH_INSUFFICIENT_PERMISSIONS"
    assert dict(span.attributes or {})["amaters.status"] == "error"
    service.stopService()


def test_span_continues_the_clients_trace() -> None:
    """A W3C traceparent from the client makes the span a child in the client's trace; a client's
    'sampled' flag is followed even with sample_ratio 0."""
    clock = Clock()
    pipeline, exporter, service = traced(clock, sample_ratio=0.0)
    ctx = RequestContext(1, ANONYMOUS, started=0.0)
    ctx.annotations[TRACE_CONTEXT] = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    pipeline.execute(ctx, ops.ListCollections())
    (span,) = exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
    service.stopService()


def test_handshake_trace_context_on_the_session() -> None:
    """Trace context given at handshake (on the session) parents requests that carry none."""

    @attrs.define
    class Session:
        trace_context: dict[str, str]

    clock = Clock()
    pipeline, exporter, service = traced(clock)
    ctx = RequestContext(
        1, ANONYMOUS, started=0.0, session=Session({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    )
    pipeline.execute(ctx, ops.ServerInfo())
    (span,) = exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE_ID
    service.stopService()


def test_sample_ratio_zero_records_nothing_without_a_client_trace() -> None:
    """With sample_ratio 0 and no client trace context, no span is exported."""
    clock = Clock()
    pipeline, exporter, service = traced(clock, sample_ratio=0.0)
    pipeline.execute(RequestContext(1, ANONYMOUS, started=0.0), ops.ListCollections())
    assert exporter.get_finished_spans() == ()
    service.stopService()


def test_console_exporter_logs_each_span() -> None:
    """The console exporter writes each span as a log event with its trace and span ids."""
    events: list[LogEvent] = []
    exporter = LogSpanExporter()
    exporter._log = Logger(namespace="amaters.tracing", observer=events.append)
    settings = attrs.evolve(TracingConfig(), enabled=True)
    service = TracingService(settings, Inline(), exporter)
    clock = Clock()
    clock.advance(5)
    stage = TracingStage(service.tracer, clock)
    ctx = RequestContext(3, ANONYMOUS, started=4.5)
    stage.before(ctx, ops.Get("users", b"k"))
    stage.after(ctx, ops.Get("users", b"k"), None)
    (event,) = events
    assert event["span"] == "amaters get"
    assert len(event["trace_id"]) == 32 and len(event["span_id"]) == 16
    assert event["duration_ms"] == 500.0
    assert event["attributes"]["amaters.collection"] == "users"
    service.stopService()


def test_service_shuts_the_provider_down_on_stop() -> None:
    """Stopping the tracing service shuts its provider down (spans after that are not exported)."""
    exporter = InMemorySpanExporter()
    service = TracingService(attrs.evolve(TracingConfig(), enabled=True), Inline(), exporter)
    service.startService()
    d = service.stopService()
    assert d.called
    service.tracer.start_span("late").end()
    assert exporter.get_finished_spans() == ()


@pytest.mark.skipif(otlp_exporter_available(), reason="the OTLP exporter is installed here")
def test_otlp_without_the_exporter_package_is_a_config_error() -> None:
    """tracing.exporter = otlp without opentelemetry-exporter-otlp installed fails validation with a
    message naming the package to install."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["tracing.enabled=true", "tracing.exporter=otlp"], {})
    (problem,) = caught.value.problems
    assert problem.startswith("tracing.exporter:")
    assert "opentelemetry-exporter-otlp" in problem


def test_tracing_settings_validate() -> None:
    """sample_ratio must be within [0, 1]; console and none are accepted."""
    with pytest.raises(ConfigError):
        load_config(None, ["tracing.sample_ratio=1.5"], {})
    config = load_config(None, ["tracing.enabled=true", "tracing.exporter=console"], {})
    assert config.tracing.exporter == "console"


# -- over the native protocol ----------------------------------------------------------------------


def served(clock: Clock) -> tuple[Any, StringTransport, InMemorySpanExporter, TracingService]:
    """A server protocol on a StringTransport whose pipeline records spans in memory."""
    pipeline, exporter, service = traced(clock)
    factory = AmatersServerFactory(pipeline, LimitsConfig(), clock)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, exporter, service


def frame(envelope: envelope_pb2.Envelope) -> bytes:
    return encode_frame(envelope.SerializeToString())


def list_request(request_id: int) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope(
        request_id=request_id, list_collections=envelope_pb2.ListCollectionsRequest()
    )


def test_protocol_request_trace_context_parents_the_span() -> None:
    """A request Envelope's trace_context (W3C traceparent) makes its span a child of the client's
    span; a request without one on a connection without one starts a new trace."""
    clock = Clock()
    protocol, _, exporter, service = served(clock)
    handshake = envelope_pb2.Handshake(version=types_pb2.Version(major=1), client_name="test")
    protocol.dataReceived(frame(envelope_pb2.Envelope(request_id=1, handshake=handshake)))
    with_context = list_request(2)
    with_context.trace_context["traceparent"] = f"00-{TRACE_ID}-{PARENT_ID}-01"
    protocol.dataReceived(frame(with_context) + frame(list_request(3)))
    first, second = exporter.get_finished_spans()
    assert format(first.context.trace_id, "032x") == TRACE_ID
    assert first.parent is not None and format(first.parent.span_id, "016x") == PARENT_ID
    assert format(second.context.trace_id, "032x") != TRACE_ID and second.parent is None
    protocol.connectionLost(Failure(ConnectionError("done")))
    service.stopService()


def test_the_protocol_decodes_a_request_trace_context_only_while_a_stage_reads_it() -> None:
    """The tracing stage declares ``reads_trace_context``: while it is installed a request's trace
    context reaches ``ctx.annotations``; once it is removed the protocol no longer decodes it."""
    seen: list[object] = []

    class Recorder(PipelineStage):
        name = "recorder"

        def before(self, ctx: RequestContext, op: ops.Operation) -> object:
            seen.append(ctx.annotations.get(TRACE_CONTEXT))
            return None

    clock = Clock()
    pipeline, _, service = traced(clock, stages=(Recorder(),))
    assert pipeline.reads_trace_context
    protocol = AmatersServerFactory(pipeline, LimitsConfig(), clock).buildProtocol(None)
    protocol.makeConnection(StringTransport())
    handshake = envelope_pb2.Handshake(version=types_pb2.Version(major=1), client_name="test")
    protocol.dataReceived(frame(envelope_pb2.Envelope(request_id=1, handshake=handshake)))
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    for request_id in (2, 3):
        request = list_request(request_id)
        request.trace_context["traceparent"] = traceparent
        protocol.dataReceived(frame(request))
        pipeline.remove_stage("tracing")
    assert not pipeline.reads_trace_context
    assert seen == [{"traceparent": traceparent}, None]
    protocol.connectionLost(Failure(ConnectionError("done")))
    service.stopService()


def test_protocol_handshake_trace_context_is_the_default_parent() -> None:
    """A trace context sent in the Handshake parents the spans of that connection's requests."""
    clock = Clock()
    protocol, _, exporter, service = served(clock)
    handshake = envelope_pb2.Handshake(version=types_pb2.Version(major=1), client_name="test")
    handshake.trace_context["traceparent"] = f"00-{TRACE_ID}-{PARENT_ID}-01"
    protocol.dataReceived(frame(envelope_pb2.Envelope(request_id=1, handshake=handshake)))
    protocol.dataReceived(frame(list_request(2)))
    (span,) = exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE_ID
    protocol.connectionLost(Failure(ConnectionError("done")))
    service.stopService()
