"""Prometheus metrics: the exposition, bounded labels, the metrics stage, connection and byte counters,
authentication failures and storage observers, all on a task.Clock and in-memory transports."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from amaters import __version__
from amaters.config import LimitsConfig
from amaters.errors import AuthError, InvalidCollection, NotFound, Overloaded
from amaters.ops.collectors import StorageCollector
from amaters.ops.metrics import MAX_PENDING_SYNCS, Metrics
from amaters.ops.observability import MeteredFactory, MetricsService, counting_authenticator
from amaters.ops.stages import MetricsStage
from amaters.proto import envelope_pb2, query_pb2, types_pb2
from amaters.protocols.framing import encode_frame
from amaters.protocols.server import ANONYMOUS, AmatersServerFactory, AmatersServerProtocol, Credentials
from amaters.query import operations as ops
from amaters.query.executor import QueryExecutor
from amaters.query.pipeline import QueryPipeline, RequestContext
from amaters.storage.memory import MemoryBackend
from amaters.types import CipherBlob

#: Every metric the observability issue names (without the _total suffix prometheus_client adds).
REQUIRED = {
    "amaters_requests": "counter",
    "amaters_request_duration_seconds": "histogram",
    "amaters_connections_active": "gauge",
    "amaters_connections": "counter",
    "amaters_bytes_received": "counter",
    "amaters_bytes_sent": "counter",
    "amaters_errors": "counter",
    "amaters_auth_failures": "counter",
    "amaters_rate_limited": "counter",
    "amaters_storage_keys": "gauge",
    "amaters_storage_bytes": "gauge",
    "amaters_storage_fsync_duration_seconds": "histogram",
    "amaters_storage_group_commit_size": "histogram",
    "amaters_reactor_lag_seconds": "gauge",
    "amaters_build_info": "gauge",
}


def families(metrics: Metrics) -> dict[str, Any]:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return value


def test_exposition_parses_and_names_every_metric() -> None:
    """The text exposition parses with prometheus_client's parser and has every required metric
    with the right type, plus process metrics, once storage stats have been read."""
    metrics = Metrics()
    metrics.storage.update({"keys": {"users": 3}, "bytes": 1234})
    found = families(metrics)
    for name, kind in REQUIRED.items():
        assert name in found, name
        assert found[name].type == kind, name
    assert "process_cpu_seconds" in found or "process_resident_memory_bytes" in found
    assert "python_info" in found
    from amaters.compiled import build_name

    assert sample(metrics, "amaters_build_info", version=__version__, build=build_name()) == 1.0
    assert sample(metrics, "amaters_storage_keys", collection="users") == 3.0
    assert sample(metrics, "amaters_storage_bytes") == 1234.0
    body, _ = metrics.exposition()
    assert b"_created" not in body, "the text format leaves out the *_created series"


def test_openmetrics_on_request() -> None:
    """A scraper asking for OpenMetrics gets it; the body ends with # EOF."""
    body, content_type = Metrics(process=False).exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) missing")
def test_promtool_finds_no_problems() -> None:
    """`promtool check metrics` reports nothing for a registry with every kind of sample in it."""
    metrics = Metrics()
    metrics.request_finished("get", 0.002, None)
    metrics.request_finished("set", 0.5, int(NotFound("x").code))
    metrics.storage.update({"keys": {"a": 1, "b": 2}, "bytes": 10})
    metrics.storage_synced(4, 0.001, True)
    body, _ = metrics.exposition()
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"" and result.stderr.strip() == b"", result.stdout + result.stderr


def test_registries_are_private() -> None:
    """Metrics never register on prometheus_client's global registry, so two can coexist."""
    first, second = Metrics(), Metrics()
    first.request_finished("get", 0.001, None)
    assert sample(first, "amaters_requests_total", op="get", status="ok") == 1.0
    assert sample(second, "amaters_requests_total", op="get", status="ok") == 0.0
    assert REGISTRY.get_sample_value("amaters_requests_total", {"op": "get", "status": "ok"}) is None


def test_request_labels_are_bounded() -> None:
    """Unknown operation names become op="other"; error codes become their lower-case names; an
    overload counts as rate limited."""
    metrics = Metrics(process=False)
    metrics.request_finished("made_up_by_a_client", 0.01, None)
    assert sample(metrics, "amaters_requests_total", op="other", status="ok") == 1.0
    metrics.request_finished("get", None, int(Overloaded("slow down").code))
    assert sample(metrics, "amaters_requests_total", op="get", status="error") == 1.0
    assert sample(metrics, "amaters_errors_total", code="server_overloaded") == 1.0
    assert sample(metrics, "amaters_rate_limited_total") == 1.0
    metrics.request_finished("get", None, 999_999)
    assert sample(metrics, "amaters_errors_total", code="unknown") == 1.0


def test_storage_keys_cap_collection_labels() -> None:
    """Only the largest max_collections collections get a label; the rest are summed as "other"
    (a real collection named "other" is summed with them), and nothing is reported before the first
    reading."""
    collector = StorageCollector(max_collections=2)
    assert list(collector.collect()) == []
    collector.update({"keys": {"big": 100, "mid": 50, "other": 7, "small": 1}, "bytes": 5})
    keys, size = list(collector.collect())
    values = {s.labels["collection"]: s.value for s in keys.samples}
    assert values == {"big": 100.0, "mid": 50.0, "other": 8.0}
    assert size.samples[0].value == 5.0
    collector.update({"keys": {"a": 1, "other": 9}, "bytes": 0})
    keys, _ = list(collector.collect())
    assert {s.labels["collection"]: s.value for s in keys.samples} == {"other": 9.0, "a": 1.0}


def test_group_commit_observer_fills_histograms() -> None:
    """Each successful WAL sync adds its duration and group size; a failed one counts as a failure."""
    metrics = Metrics(process=False)
    metrics.storage_synced(8, 0.002, True)
    metrics.storage_synced(1, 0.0, False)
    assert sample(metrics, "amaters_storage_group_commit_size_count") == 1.0
    assert sample(metrics, "amaters_storage_group_commit_size_sum") == 8.0
    assert sample(metrics, "amaters_storage_fsync_duration_seconds_bucket", le="0.0025") == 1.0
    assert sample(metrics, "amaters_storage_fsync_failures_total") == 1.0


def test_syncs_wait_for_a_collection_but_never_pile_up() -> None:
    """Syncs are observed into the histograms when the registry is collected; without a collection
    at most MAX_PENDING_SYNCS are kept, and none is lost either way."""
    metrics = Metrics(process=False)
    for _ in range(MAX_PENDING_SYNCS + 3):
        metrics.storage_synced(2, 0.001, True)
    assert len(metrics._pending_syncs) == 3
    assert sample(metrics, "amaters_storage_group_commit_size_count") == MAX_PENDING_SYNCS + 3
    assert sample(metrics, "amaters_storage_group_commit_size_sum") == 2 * (MAX_PENDING_SYNCS + 3)
    assert metrics._pending_syncs == []


def pipeline_with(metrics: Metrics, clock: Clock, auto_create: bool = True) -> QueryPipeline:
    backend = MemoryBackend()
    backend.open()
    executor = QueryExecutor(backend, auto_create_collections=auto_create, range_chunk_size=2)
    return QueryPipeline(executor, LimitsConfig(), [MetricsStage(metrics, clock)])


def test_metrics_stage_counts_and_times_requests() -> None:
    """Through a real pipeline: a SET counts as ok, timed from its arrival; a GET on a missing
    collection counts as an error with its code; no key or value reaches the exposition."""
    metrics = Metrics(process=False)
    clock = Clock()
    clock.advance(100)
    pipeline = pipeline_with(metrics, clock)
    ctx = RequestContext(1, ANONYMOUS, "127.0.0.1:5000", started=clock.seconds() - 0.003)
    d = pipeline.execute(ctx, ops.Set("users", b"secret-key", CipherBlob.wrap(b"secret-value")))
    assert d.called
    assert sample(metrics, "amaters_requests_total", op="set", status="ok") == 1.0
    assert sample(metrics, "amaters_request_duration_seconds_count", op="set") == 1.0
    assert sample(metrics, "amaters_request_duration_seconds_bucket", op="set", le="0.0025") == 0.0
    assert sample(metrics, "amaters_request_duration_seconds_bucket", op="set", le="0.005") == 1.0

    strict = pipeline_with(metrics, clock, auto_create=False)
    failed = strict.execute(RequestContext(2, ANONYMOUS, started=clock.seconds()), ops.Get("nope", b"k"))
    failures: list[Failure] = []
    failed.addErrback(failures.append)
    assert failures and isinstance(failures[0].value, NotFound)
    assert sample(metrics, "amaters_requests_total", op="get", status="error") == 1.0
    assert sample(metrics, "amaters_errors_total", code="storage_not_found") == 1.0
    body, _ = metrics.exposition()
    assert b"secret-key" not in body and b"secret-value" not in body


def test_metrics_stage_counts_errors_by_code() -> None:
    """A request refused by an earlier stage still counts, with the refusal's code."""
    from amaters.query.pipeline import PipelineStage

    class Refuse(PipelineStage):
        name = "refuse"

        def before(self, ctx: RequestContext, op: ops.Operation) -> object:
            raise Overloaded("slow down", retry_after_ms=100)

    metrics = Metrics(process=False)
    clock = Clock()
    pipeline = pipeline_with(metrics, clock)
    pipeline.add_stage(Refuse(), before="metrics")
    d = pipeline.execute(RequestContext(1, ANONYMOUS, started=0.0), ops.Get("c", b"k"))
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures and isinstance(failures[0].value, Overloaded)
    assert sample(metrics, "amaters_requests_total", op="get", status="error") == 1.0
    assert sample(metrics, "amaters_errors_total", code="server_overloaded") == 1.0
    assert sample(metrics, "amaters_rate_limited_total") == 1.0
    # No arrival time recorded: counted, but not timed.
    assert sample(metrics, "amaters_request_duration_seconds_count", op="get") == 0.0


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data + data)
        self.transport.writeSequence([b"a", b"bc"])


def test_metered_factory_counts_connections_and_bytes() -> None:
    """The wrapping factory counts each connection (total and active) and every byte in and out,
    and passes the data through unchanged."""
    metrics = Metrics(process=False)
    factory = MeteredFactory(Factory.forProtocol(Echo), metrics)
    protocol = factory.buildProtocol(None)
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert sample(metrics, "amaters_connections_total") == 1.0
    assert sample(metrics, "amaters_connections_active") == 1.0
    protocol.dataReceived(b"12345")
    assert transport.value() == b"1234512345abc"
    assert sample(metrics, "amaters_bytes_received_total") == 5.0
    assert sample(metrics, "amaters_bytes_sent_total") == 13.0
    protocol.connectionLost(Failure(ConnectionError("gone")))
    assert sample(metrics, "amaters_connections_active") == 0.0
    assert sample(metrics, "amaters_connections_total") == 1.0


def test_metered_factory_lets_the_native_protocol_count_for_itself() -> None:
    """The native protocol is returned unwrapped (no wrapper layer in its data path) and counts
    the connection and every frame byte in and out itself, exactly as the wrapper did; the bytes
    reach the counters at each scrape."""
    metrics = Metrics(process=False)
    pipeline = QueryPipeline(QueryExecutor(MemoryBackend()), LimitsConfig())
    inner = AmatersServerFactory(pipeline, LimitsConfig(), Clock())
    factory = MeteredFactory(inner, metrics)
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, AmatersServerProtocol)
    assert protocol.factory is inner
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert protocol.transport is transport
    assert sample(metrics, "amaters_connections_total") == 1.0
    assert sample(metrics, "amaters_connections_active") == 1.0
    hello = envelope_pb2.Envelope(
        request_id=1,
        handshake=envelope_pb2.Handshake(version=types_pb2.Version(major=1), client_name="test"),
    )
    frame = encode_frame(hello.SerializeToString())
    protocol.dataReceived(frame[:3])
    protocol.dataReceived(frame[3:])
    assert sample(metrics, "amaters_bytes_received_total") == float(len(frame))
    assert transport.value()
    assert sample(metrics, "amaters_bytes_sent_total") == float(len(transport.value()))
    # Counted in plain integers between scrapes, moved once: a second scrape adds nothing.
    assert sample(metrics, "amaters_bytes_received_total") == float(len(frame))
    protocol.connectionLost(Failure(ConnectionError("gone")))
    assert sample(metrics, "amaters_connections_active") == 0.0
    assert sample(metrics, "amaters_connections_total") == 1.0


def test_auth_failures_count_by_method() -> None:
    """Refused handshakes count by credential type; a refusal with retry_after also counts as rate
    limited; successes and the principal pass through untouched."""
    metrics = Metrics(process=False)
    answers: list[Any] = []

    def inner(credentials: Any, peer_certificate: Any, source: str) -> defer.Deferred[Any]:
        return defer.maybeDeferred(lambda: answers.pop(0)())

    def refuse() -> Any:
        raise AuthError("bad token")

    def throttle() -> Any:
        raise AuthError("too many attempts", retry_after_ms=1000)

    authenticate = counting_authenticator(inner, metrics)
    answers.append(refuse)
    d = authenticate(Credentials("bearer_token", "t0ken"), None, "127.0.0.1:1")
    refused: list[Failure] = []
    d.addErrback(refused.append)
    assert refused and isinstance(refused[0].value, AuthError)
    assert sample(metrics, "amaters_auth_failures_total", method="bearer_token") == 1.0
    answers.append(throttle)
    authenticate(Credentials("api_key", "k"), None, "127.0.0.1:1").addErrback(lambda f: None)
    assert sample(metrics, "amaters_auth_failures_total", method="api_key") == 1.0
    assert sample(metrics, "amaters_rate_limited_total") == 1.0
    answers.append(lambda: ANONYMOUS)
    ok = authenticate(None, object(), "127.0.0.1:1")
    assert ok.result is ANONYMOUS  # type: ignore[attr-defined]
    assert sample(metrics, "amaters_auth_failures_total", method="certificate") == 0.0
    body, _ = metrics.exposition()
    assert b"t0ken" not in body


def test_metrics_service_reads_storage_stats_at_start() -> None:
    """Starting the metrics service reads the storage statistics once, so the storage gauges are
    there before the flusher's first tick."""
    backend = MemoryBackend()
    backend.open()
    backend.create_collection("users")
    backend.put("users", b"k", CipherBlob.wrap(b"v"))
    metrics = Metrics(process=False)
    service = MetricsService(metrics, backend)
    d = service.startService()
    assert d.called
    assert sample(metrics, "amaters_storage_keys", collection="users") == 1.0
    service.stopService()


def test_requests_refused_by_validation_count_as_errors() -> None:
    """A request validation refuses never reaches the stages, but the pipeline's rejection observer
    still counts it by operation and error code (not timed)."""
    metrics = Metrics(process=False)
    pipeline = pipeline_with(metrics, Clock())
    pipeline.add_rejection_observer(metrics.request_rejected)
    bad = query_pb2.Query(
        get=query_pb2.GetQuery(collection="no spaces allowed", key=types_pb2.Key(data=b"k"))
    )
    with pytest.raises(InvalidCollection):
        pipeline.decode_query(bad)
    with pytest.raises(InvalidCollection):
        pipeline.decode_collection("")
    assert sample(metrics, "amaters_requests_total", op="get", status="error") == 1.0
    assert sample(metrics, "amaters_requests_total", op="other", status="error") == 1.0
    assert sample(metrics, "amaters_errors_total", code="validation_invalid_collection") == 2.0
    assert sample(metrics, "amaters_request_duration_seconds_count", op="get") == 0.0


def test_remembered_children_count_like_labels() -> None:
    """request_finished, which keeps the label children it uses, gives the same series and values as
    calling ``labels()`` each time: per op and status, per error code, "other" for unknown names
    (created only when first used), and durations in the op's histogram."""
    metrics = Metrics(process=False)
    assert sample(metrics, "amaters_requests_total", op="other", status="ok") is None
    for _ in range(3):
        metrics.request_finished("get", 0.0002, None)
    metrics.request_finished("set", 0.003, int(NotFound("gone").code))
    metrics.request_finished("set", 0.003, int(NotFound("gone").code))
    metrics.request_finished("nonsense", None, None)
    metrics.request_finished("other", -1.0, None)  # a negative duration is not observed
    assert sample(metrics, "amaters_requests_total", op="get", status="ok") == 3.0
    assert sample(metrics, "amaters_requests_total", op="get", status="error") == 0.0
    assert sample(metrics, "amaters_requests_total", op="set", status="error") == 2.0
    assert sample(metrics, "amaters_requests_total", op="other", status="ok") == 2.0
    assert sample(metrics, "amaters_errors_total", code="storage_not_found") == 2.0
    assert sample(metrics, "amaters_request_duration_seconds_count", op="get") == 3.0
    assert sample(metrics, "amaters_request_duration_seconds_bucket", op="get", le="0.00025") == 3.0
    assert sample(metrics, "amaters_request_duration_seconds_bucket", op="get", le="0.0001") == 0.0
    assert sample(metrics, "amaters_request_duration_seconds_count", op="set") == 2.0
    assert sample(metrics, "amaters_request_duration_seconds_count", op="other") == 0.0
    # The same children labels() hands out: counting through either shows in one series.
    metrics.requests.labels(op="get", status="ok").inc()
    metrics.request_finished("get", None, None)
    assert sample(metrics, "amaters_requests_total", op="get", status="ok") == 5.0


def test_request_tallies_reach_every_collection_exactly_once() -> None:
    """Requests are tallied without touching the children and moved into them by each collection:
    counts, the duration sum and each bucket (a duration equal to a bound counts in that bucket,
    one over every bound only in +Inf) are exact, and a second collection adds nothing twice."""
    metrics = Metrics(process=False)
    for duration in (0.0001, 0.0002, 0.0002, 31.0):
        metrics.request_finished("get", duration, None)
    metrics.request_finished("get", None, int(NotFound("x").code))
    metrics.request_finished("no-such-op", 0.001, None)

    def bucket(le: str) -> float | None:
        return sample(metrics, "amaters_request_duration_seconds_bucket", op="get", le=le)

    for _ in range(2):  # collecting twice must not count anything twice
        assert sample(metrics, "amaters_requests_total", op="get", status="ok") == 4
        assert sample(metrics, "amaters_requests_total", op="get", status="error") == 1
        assert sample(metrics, "amaters_requests_total", op="other", status="ok") == 1
        assert sample(metrics, "amaters_request_duration_seconds_count", op="get") == 4
        assert sample(metrics, "amaters_request_duration_seconds_sum", op="get") == pytest.approx(31.0005)
        assert bucket("0.0001") == 1
        assert bucket("0.00025") == 3
        assert bucket("30.0") == 3
        assert bucket("+Inf") == 4
    metrics.request_finished("get", 0.0001, None)
    assert sample(metrics, "amaters_requests_total", op="get", status="ok") == 5
    assert families(metrics)["amaters_requests"].samples  # the text exposition flushes too
    assert bucket("0.0001") == 2


def test_metrics_stage_counts_requests_answered_together_as_one_by_one() -> None:
    """after_many gives the same counts, buckets and sums as after for each request: each
    operation's successes counted in one call (whatever their arrivals), failures apart."""
    clock = Clock()
    clock.advance(100)
    items: list[Any] = []
    for request_id, op, started, outcome in [
        (1, ops.Get("c", b"k"), 99.999, None),
        (2, ops.Get("c", b"k"), 99.999, None),
        (3, ops.Get("c", b"k"), 99.999, None),
        (4, ops.Set("c", b"k", CipherBlob.wrap(b"v")), 99.999, None),
        (5, ops.Get("c", b"k"), 99.99, None),
        (6, ops.Get("nope", b"k"), 99.999, Failure(NotFound("gone"))),
        (7, ops.Get("c", b"k"), 99.999, None),
        (8, ops.Get("c", b"k"), 0.0, None),
    ]:
        items.append((RequestContext(request_id, ANONYMOUS, started=started), op, outcome))
    together, one_by_one = Metrics(process=False), Metrics(process=False)
    MetricsStage(together, clock).after_many(items)
    stage = MetricsStage(one_by_one, clock)
    for ctx, op, outcome in items:
        stage.after(ctx, op, outcome)

    def samples(metrics: Metrics) -> list[tuple[str, list[tuple[str, str]], float]]:
        body, _ = metrics.exposition()
        return sorted(
            (s.name, sorted(s.labels.items()), s.value)
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
            if s.name.startswith(("amaters_requests", "amaters_request_duration", "amaters_errors"))
        )

    assert samples(together) == samples(one_by_one)
    assert sample(together, "amaters_requests_total", op="get", status="ok") == 6.0
    assert sample(together, "amaters_request_duration_seconds_count", op="get") == 6.0
    assert sample(together, "amaters_request_duration_seconds_bucket", op="get", le="0.005") == 5.0
    assert sample(together, "amaters_requests_total", op="get", status="error") == 1.0
