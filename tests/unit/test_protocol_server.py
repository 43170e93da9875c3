"""The native protocol server on a StringTransport: handshake, framing, pipelining, streams, drain."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_helpers import (
    another,
    blob,
    fill,
    key,
    make,
    q_get,
    q_range,
    q_set,
    query_error,
    ready,
)
from twisted.internet import defer
from twisted.logger import LogEvent, globalLogPublisher

from amaters.config import LimitsConfig
from amaters.errors import AuthError, ErrorCategory, ErrorCode
from amaters.proto import aql_pb2, envelope_pb2, query_pb2, types_pb2
from amaters.protocols.framing import encode_frame
from amaters.protocols.server import (
    ANONYMOUS,
    Credentials,
    default_authenticator,
)
from amaters.types import crc32

Envelope = envelope_pb2.Envelope


def test_handshake_answers_versions_capabilities_and_principal() -> None:
    """A valid handshake gets the server's version, capabilities and the anonymous admin principal."""
    h = make()
    answer = h.handshake()
    assert answer.request_id == 1
    response = answer.handshake_response
    assert (response.version.major, response.version.minor) == (1, 0)
    assert [(v.major, v.minor, v.patch) for v in response.supported_versions] == [(1, 0, 0)]
    assert "range.stream" in response.capabilities and "batch.atomic" in response.capabilities
    assert response.principal_name == "anonymous"
    assert list(response.roles) == ["admin"]
    assert response.server_name.startswith("amaters ")
    assert not h.closing


def test_other_major_version_is_refused_and_closed() -> None:
    """A handshake with another major version gets PROTOCOL_UNSUPPORTED_VERSION, then the close."""
    h = make()
    answer = h.handshake(major=2)
    assert answer.error.code == ErrorCode.PROTOCOL_UNSUPPORTED_VERSION
    assert "1.0.0" in answer.error.message
    assert h.closing


def test_request_before_handshake_is_a_protocol_violation() -> None:
    """Anything but a Handshake first gets PROTOCOL_INVALID_REQUEST and the connection closes."""
    h = make()
    h.send(q_get(7, "c", b"k"))
    (answer,) = h.received()
    assert answer.request_id == 7
    assert answer.error.code == ErrorCode.PROTOCOL_INVALID_REQUEST
    assert h.closing


def test_auth_enabled_without_a_method_refuses() -> None:
    """With auth enabled and no authentication plugged in, the handshake fails with AUTH_FAILED."""
    h = make(authenticate=default_authenticator(True))
    answer = h.handshake()
    assert answer.error.code == ErrorCode.AUTH_FAILED
    assert answer.error.category == ErrorCategory.AUTH
    assert h.closing


def test_authenticate_hook_gets_credentials_and_source() -> None:
    """The authenticate hook receives the presented credentials and the peer address."""
    seen: list[tuple[Credentials | None, Any, str]] = []

    def authenticate(credentials: Credentials | None, cert: Any, source: str) -> defer.Deferred[Any]:
        seen.append((credentials, cert, source))
        if credentials is None or credentials.secret != "good":
            return defer.fail(AuthError("bad token"))
        return defer.succeed(ANONYMOUS)

    h = make(authenticate=authenticate)
    assert h.handshake(token="good").WhichOneof("body") == "handshake_response"
    assert seen[0][0] == Credentials("bearer_token", "good")
    assert "good" not in repr(seen[0][0])
    assert seen[0][2].startswith("192.168.1.1:")
    h2 = make(authenticate=authenticate)
    answer = h2.handshake(token="bad")
    assert answer.error.code == ErrorCode.AUTH_FAILED and answer.error.message == "bad token"


def test_requests_pipelined_behind_a_slow_handshake_wait_for_it() -> None:
    """Frames sent right after the handshake run only once authentication has succeeded."""
    pending: defer.Deferred[Any] = defer.Deferred()
    h = make(authenticate=lambda c, p, s: pending)
    hs = Envelope(request_id=1, handshake=envelope_pb2.Handshake(version=types_pb2.Version(major=1)))
    h.send_many([hs, q_set(2, "c", b"k", b"v"), q_get(3, "c", b"k")])
    assert h.received() == []
    pending.callback(ANONYMOUS)
    answers = h.received()
    assert [a.request_id for a in answers] == [1, 2, 3]
    assert answers[2].query_response.result.single.value.data == b"v"


def test_no_handshake_in_time_closes() -> None:
    """A connection that does not finish its handshake within handshake_timeout is closed."""
    h = make(limits=LimitsConfig(handshake_timeout=5.0))
    h.clock.advance(4.9)
    assert not h.closing
    h.clock.advance(0.2)
    (answer,) = h.received()
    assert answer.error.code == ErrorCode.NETWORK_TIMEOUT
    assert h.closing


# -- framing -----------------------------------------------------------------------------------


def test_malformed_frame_gets_an_error_and_the_connection_stays_usable() -> None:
    """Bytes that are not an Envelope get PROTOCOL_MALFORMED_MESSAGE (id 0); the next request works."""
    h = ready()
    h.protocol.dataReceived(encode_frame(b"\xff\xff\xff\xff not protobuf"))
    h.send(q_get(5, "c", b"k"))
    bad, good = h.received()
    assert bad.request_id == 0 and bad.error.code == ErrorCode.PROTOCOL_MALFORMED_MESSAGE
    assert good.request_id == 5 and good.query_response.result.HasField("single")
    assert not h.closing


def test_oversize_frame_gets_an_error_frame_then_close() -> None:
    """A length prefix over max_frame_bytes is answered with VALIDATION_SIZE_EXCEEDED, then closed."""
    h = ready(limits=LimitsConfig(max_frame_bytes=2048))
    h.protocol.dataReceived(struct.pack(">I", 4096) + b"x" * 100)
    (answer,) = h.received()
    assert answer.error.code == ErrorCode.VALIDATION_SIZE_EXCEEDED
    assert "2048" in answer.error.message
    assert h.closing


def test_empty_envelope_is_an_invalid_request_not_a_close() -> None:
    """An envelope without a request kind is answered with PROTOCOL_INVALID_REQUEST and nothing else."""
    h = ready()
    h.send(Envelope(request_id=9))
    (answer,) = h.received()
    assert answer.request_id == 9 and answer.error.code == ErrorCode.PROTOCOL_INVALID_REQUEST
    assert not h.closing


# -- operations --------------------------------------------------------------------------------


def test_set_get_delete() -> None:
    """SET then GET returns the blob with its metadata; DELETE reports 1, then 0."""
    h = ready()
    h.send(q_set(2, "c", b"k", b"value"))
    h.send(q_get(3, "c", b"k"))
    h.send(
        Envelope(
            request_id=4,
            query=aql_pb2.QueryRequest(
                query=query_pb2.Query(delete=query_pb2.DeleteQuery(collection="c", key=key(b"k")))
            ),
        )
    )
    h.send(
        Envelope(
            request_id=5,
            query=aql_pb2.QueryRequest(
                query=query_pb2.Query(delete=query_pb2.DeleteQuery(collection="c", key=key(b"k")))
            ),
        )
    )
    h.send(q_get(6, "c", b"k"))
    s, g, d1, d2, g2 = h.received()
    assert s.query_response.result.success.affected_rows == 1
    value = g.query_response.result.single.value
    assert value.data == b"value" and value.metadata.checksum == crc32(b"value") and value.metadata.size == 5
    assert d1.query_response.result.success.affected_rows == 1
    assert d2.query_response.result.success.affected_rows == 0
    assert g2.query_response.result.HasField("single")
    assert not g2.query_response.result.single.HasField("value")


def test_bad_requests_get_precise_errors_and_keep_the_connection() -> None:
    """Invalid collection, empty key, bad checksum, FILTER: each a clear error; nothing closes."""
    h = ready(limits=LimitsConfig(max_key_bytes=8))
    h.send(q_get(2, "bad name", b"k"))
    h.send(q_get(3, "c", b""))
    h.send(q_get(4, "c", b"123456789"))
    h.send(q_set(5, "c", b"k", b"v", checksum=1234))
    h.send(
        Envelope(
            request_id=6,
            query=aql_pb2.QueryRequest(query=query_pb2.Query(filter=query_pb2.FilterQuery(collection="c"))),
        )
    )
    answers = [query_error(a) for a in h.received()]
    assert [a.code for a in answers] == [
        ErrorCode.VALIDATION_INVALID_COLLECTION,
        ErrorCode.VALIDATION_INVALID_KEY,
        ErrorCode.VALIDATION_SIZE_EXCEEDED,
        ErrorCode.VALIDATION_INVALID_VALUE,
        ErrorCode.COMPUTE_INVALID_OPERATION,
    ]
    assert "FHE evaluator" in answers[4].message
    assert all(a.category == ErrorCategory.CLIENT_ERROR for a in answers)
    assert not h.closing


def test_unexpected_errors_are_logged_not_sent() -> None:
    """A crash in the backend reaches the client as SERVER_INTERNAL with a generic message only."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = ready()
        fill(h, "c", 1)
        h.backend.explode = True
        h.send(q_get(2, "c", b"0000"))
        (answer,) = h.received()
    finally:
        globalLogPublisher.removeObserver(events.append)
    error = query_error(answer)
    assert error.code == ErrorCode.SERVER_INTERNAL
    assert "secret" not in error.message and "Traceback" not in error.message
    assert any("log_failure" in e for e in events)
    assert not h.closing


def test_collections_and_server_requests() -> None:
    """Create, list and drop collections; ServerInfo, HealthCheck and Ping answer."""
    h = ready()
    h.send(Envelope(request_id=2, create_collection=envelope_pb2.CreateCollectionRequest(name="a")))
    h.send(Envelope(request_id=3, create_collection=envelope_pb2.CreateCollectionRequest(name="a")))
    h.send(Envelope(request_id=4, list_collections=envelope_pb2.ListCollectionsRequest()))
    h.send(Envelope(request_id=5, drop_collection=envelope_pb2.DropCollectionRequest(name="a")))
    h.send(Envelope(request_id=6, create_collection=envelope_pb2.CreateCollectionRequest(name="no/slash")))
    h.send(Envelope(request_id=7, server_info=aql_pb2.ServerInfoRequest()))
    h.send(Envelope(request_id=8, health_check=aql_pb2.HealthCheckRequest()))
    h.send(Envelope(request_id=9, ping=envelope_pb2.Ping(payload=b"hi")))
    c1, c2, listed, dropped, bad, info, health, pong = h.received()
    assert c1.collection_response.changed and not c2.collection_response.changed
    assert list(listed.collection_response.names) == ["a"]
    assert dropped.collection_response.changed
    assert bad.error.code == ErrorCode.VALIDATION_INVALID_COLLECTION
    assert info.server_info_response.version.major == 1
    assert health.health_check_response.status == aql_pb2.HEALTH_SERVING
    assert pong.pong.payload == b"hi"


def test_batch_is_atomic_and_reads_see_earlier_writes() -> None:
    """A batch's GET sees its own earlier SET; a batch with one bad item applies nothing."""
    h = ready()

    def q(**kw: Any) -> query_pb2.Query:
        return query_pb2.Query(**kw)

    good = aql_pb2.BatchRequest(
        queries=[
            q(set=query_pb2.SetQuery(collection="b", key=key(b"x"), value=blob(b"1"))),
            q(get=query_pb2.GetQuery(collection="b", key=key(b"x"))),
            q(delete=query_pb2.DeleteQuery(collection="b", key=key(b"x"))),
            q(get=query_pb2.GetQuery(collection="b", key=key(b"x"))),
        ]
    )
    bad = aql_pb2.BatchRequest(
        queries=[
            q(set=query_pb2.SetQuery(collection="b", key=key(b"y"), value=blob(b"2"))),
            q(set=query_pb2.SetQuery(collection="b", key=key(b"z"), value=blob(b"3", checksum=7))),
        ]
    )
    h.send(Envelope(request_id=2, batch=good))
    h.send(Envelope(request_id=3, batch=bad))
    h.send(q_get(4, "b", b"y"))
    ok, refused, after = h.received()
    results = ok.batch_response.results.results
    assert results[0].success.affected_rows == 1
    assert results[1].single.value.data == b"1"
    assert results[2].success.affected_rows == 1
    assert not results[3].single.HasField("value")
    assert refused.batch_response.error.code == ErrorCode.VALIDATION_INVALID_VALUE
    assert "batch query 1" in refused.batch_response.error.message
    assert not after.query_response.result.single.HasField("value")


# -- pipelining and flow control ---------------------------------------------------------------


def test_pipelined_requests_are_answered_in_completion_order() -> None:
    """Two slow GETs answered in the order they complete, each with its own request id."""
    h = ready()
    fill(h, "c", 2)
    h.backend.gated = True
    h.send_many([q_get(10, "c", b"0000"), q_get(11, "c", b"0001")])
    assert h.received() == []
    h.backend.release(1)
    h.backend.release(0)
    first, second = h.received()
    assert (first.request_id, second.request_id) == (11, 10)
    assert first.query_response.result.single.value.data == b"v1"
    assert second.query_response.result.single.value.data == b"v0"


def test_afters_run_per_read_before_its_answers_and_for_lone_requests_per_reactor_turn() -> None:
    """Requests answered at once in a read of several have their pipeline afters run together
    (after_many) once the read is handled, before its answers are written.  A request alone in
    its read (even with part of the next frame) is answered first while other connections are
    open; its afters run at the end of the reactor turn, with those of the other connections'
    lone requests of that turn.  On the only connection they run at once, as always."""
    from amaters.query.pipeline import PipelineStage

    h = ready()
    fill(h, "c", 3)
    seen: list[Any] = []

    class Observe(PipelineStage):
        name = "observe"

        def after(self, ctx: Any, op: Any, outcome: object) -> None:
            seen.append(("one", ctx.request_id, h.transport.value()))

        def after_many(self, items: list[Any]) -> None:
            seen.append(("many", [ctx.request_id for ctx, _, _ in items], h.transport.value()))

    h.factory.pipeline.add_stage(Observe())
    h.send_many([q_get(10, "c", b"0000"), q_set(11, "c", b"0001", b"new"), q_get(12, "c", b"0001")])
    assert seen == [("many", [10, 11, 12], b"")]
    assert [a.request_id for a in h.received()] == [10, 11, 12]

    # The only connection: a lone request's afters run at once, before its answer is written.
    seen.clear()
    h.send(q_get(13, "c", b"0000"))
    assert seen == [("one", 13, b"")]
    assert [a.request_id for a in h.received()] == [13]

    # With another connection open, lone requests are answered first and settled at the end of
    # the turn: alone in it, through after, as run() would.
    other = another(h)
    seen.clear()
    h.send(q_get(18, "c", b"0000"))
    assert seen == []
    assert [a.request_id for a in h.received()] == [18]
    h.clock.advance(0)
    assert seen == [("one", 18, b"")]

    # Two connections' lone requests in one turn: their afters run together.
    seen.clear()
    h.send(q_get(16, "c", b"0000"))
    other.send(q_get(17, "c", b"0002"))
    assert seen == []
    assert [a.request_id for a in h.received()] == [16]
    assert [a.request_id for a in other.received()] == [17]
    h.clock.advance(0)
    assert seen == [("many", [16, 17], b"")]

    seen.clear()
    second = encode_frame(q_get(15, "c", b"0002").SerializeToString())
    h.protocol.dataReceived(encode_frame(q_get(14, "c", b"0000").SerializeToString()) + second[:5])
    assert [a.request_id for a in h.received()] == [14]
    h.protocol.dataReceived(second[5:])
    assert [a.request_id for a in h.received()] == [15]
    h.clock.advance(0)
    assert seen == [("many", [14, 15], b"")]


def test_keyed_requests_of_a_read_pass_the_stages_together_and_later_frames_see_them() -> None:
    """The GET, SET and DELETE requests of one read go through the stages together (before_many
    once for the run of them), up to the next frame of another kind, which sees their writes and
    is answered after them; every answer goes out in the order the requests came.  A request
    alone in its read goes through before as always."""
    from amaters.query.pipeline import PipelineStage

    h = ready()
    seen: list[Any] = []

    class Observe(PipelineStage):
        name = "observe"

        def before(self, ctx: Any, op: Any) -> object:
            seen.append(("one", ctx.request_id))
            return None

        def before_many(self, items: list[Any]) -> object:
            seen.append(("many", [ctx.request_id for ctx, _ in items]))
            return None

    h.factory.pipeline.add_stage(Observe())
    batch = aql_pb2.BatchRequest(
        queries=[query_pb2.Query(get=query_pb2.GetQuery(collection="c", key=key(b"k")))]
    )
    h.send_many(
        [
            q_set(10, "c", b"k", b"first"),
            q_get(11, "c", b"k"),
            Envelope(request_id=12, batch=batch),
            q_set(13, "c", b"k", b"second"),
            q_range(14, "c", b"", b""),
            q_get(15, "c", b"k"),
            q_set(16, "c", b"k", b"third"),
        ]
    )
    assert seen == [("many", [10, 11]), ("one", 12), ("many", [13]), ("one", 14), ("many", [15, 16])]
    answers = h.received()
    assert [a.request_id for a in answers[:4]] == [10, 11, 12, 13]
    assert answers[1].query_response.result.single.value.data == b"first"
    assert answers[2].batch_response.results.results[0].single.value.data == b"first"
    streamed = [a.stream.batch for a in answers if a.request_id == 14 and a.stream.HasField("batch")]
    assert [kv.value.data for b in streamed for kv in b.values] == [b"second"]
    assert [a.request_id for a in answers if a.request_id in (15, 16)] == [15, 16]
    assert next(a for a in answers if a.request_id == 15).query_response.result.single.value.data == b"second"

    seen.clear()
    h.send(q_get(17, "c", b"k"))
    assert seen == [("one", 17)]
    assert h.received()[0].query_response.result.single.value.data == b"third"


def test_a_read_in_pieces_is_answered_once_at_its_end() -> None:
    """Told that one read arrives in pieces (IReadScope: TLS hands over a record at a time), the
    protocol holds the answers and afters of each piece and writes and settles them once, at the
    read's end, in the order the requests came."""
    from amaters.interfaces import IReadScope
    from amaters.query.pipeline import PipelineStage

    h = ready()
    fill(h, "c", 3)
    settled: list[list[int]] = []

    class Observe(PipelineStage):
        name = "observe"

        def after(self, ctx: Any, op: Any, outcome: object) -> None:
            settled.append([ctx.request_id])

        def after_many(self, items: list[Any]) -> None:
            settled.append([ctx.request_id for ctx, _, _ in items])

    h.factory.pipeline.add_stage(Observe())
    assert IReadScope.providedBy(h.protocol)
    read = b"".join(
        encode_frame(q.SerializeToString())
        for q in (q_get(10, "c", b"0000"), q_set(11, "c", b"0001", b"new"), q_get(12, "c", b"0001"))
    )
    written_before = len(h.transport.value())
    h.protocol.readStarted()
    for start in range(0, len(read), 20):  # pieces that cut frames anywhere
        h.protocol.dataReceived(read[start : start + 20])
    assert len(h.transport.value()) == written_before and settled == []
    h.protocol.readFinished()
    assert settled == [[10, 11, 12]]
    answers = h.received()
    assert [a.request_id for a in answers] == [10, 11, 12]
    assert answers[2].query_response.result.single.value.data == b"new"
    # The next read, whole, is answered at the end of its delivery as before.
    h.send(q_get(13, "c", b"0002"))
    assert [a.request_id for a in h.received()] == [13]


def test_a_read_in_pieces_cut_short_by_a_lost_connection_is_not_handled() -> None:
    """None of a read's requests was answered when the connection is lost before its end, so none
    is run (a write among them is not applied), and nothing of the read stays charged to the
    server's receive memory."""
    h = ready()
    fill(h, "c", 1)
    budget = h.factory.budget
    held_before = budget.total
    read = encode_frame(q_set(20, "c", b"0000", b"never").SerializeToString())
    partial = encode_frame(q_get(21, "c", b"0000").SerializeToString())[:7]
    h.protocol.readStarted()
    h.protocol.dataReceived(read[:10])
    h.protocol.dataReceived(read[10:] + partial)
    h.protocol.connectionLost(None)
    h.protocol.readFinished()
    assert h.received() == []
    assert h.backend.get("c", b"0000").result.data == b"v0"
    assert budget.total == held_before


def test_inflight_limit_stops_reading_until_answers_drain() -> None:
    """At max_inflight_per_connection the transport is paused and later frames wait; answers resume it.
    The frame that waited counts against the server's receive memory until it is handled."""
    h = ready(limits=LimitsConfig(max_inflight_per_connection=2))
    fill(h, "c", 3)
    budget = h.factory.budget
    held_before = budget.total
    h.backend.gated = True
    h.send_many([q_get(10, "c", b"0000"), q_get(11, "c", b"0001"), q_get(12, "c", b"0002")])
    assert h.transport.producerState == "paused"
    assert budget.total > held_before
    assert len(h.backend.waiting) == 2
    h.backend.release(0)
    # One answer out: the third frame is read and started, which reaches the limit again.
    assert len(h.backend.waiting) == 2
    assert h.transport.producerState == "paused"
    h.backend.release(0)
    assert h.transport.producerState == "producing"
    assert budget.total == held_before, "the waiting frame was delivered: nothing stays charged"
    h.backend.release(0)
    assert [a.request_id for a in h.received()] == [10, 11, 12]


def test_slow_request_is_answered_with_a_timeout_and_its_late_result_dropped() -> None:
    """After request_timeout a pending request gets NETWORK_TIMEOUT; its real result is not sent."""
    h = ready(limits=LimitsConfig(request_timeout=2.0))
    fill(h, "c", 1)
    h.backend.gated = True
    h.send(q_get(10, "c", b"0000"))
    h.clock.advance(2.0)
    (answer,) = h.received()
    assert answer.request_id == 10 and answer.error.code == ErrorCode.NETWORK_TIMEOUT
    assert answer.error.category == ErrorCategory.RETRYABLE
    h.backend.release(0)
    assert h.received() == []


def test_each_request_times_out_at_its_own_deadline() -> None:
    """Staggered slow requests each time out request_timeout after they arrived, no earlier and no
    later; one answered in time is never timed out; the connection's one deadline timer goes away
    with the connection."""
    h = ready(limits=LimitsConfig(request_timeout=2.0))
    fill(h, "c", 3)
    h.backend.gated = True
    h.send(q_get(10, "c", b"0000"))
    h.clock.advance(0.5)
    h.send(q_get(11, "c", b"0001"))
    h.clock.advance(0.5)
    h.send(q_get(12, "c", b"0002"))
    h.backend.release(1)  # 11 answered in time
    (answer,) = h.received()
    assert answer.request_id == 11 and not answer.HasField("error")
    h.clock.advance(0.999)
    assert h.received() == []
    h.clock.advance(0.001)  # 2.0 s after 10 arrived
    assert [(a.request_id, a.error.code) for a in h.received()] == [(10, ErrorCode.NETWORK_TIMEOUT)]
    h.clock.advance(0.5)  # 11 would be due now, but it was answered
    assert h.received() == []
    h.clock.advance(0.5)  # 2.0 s after 12 arrived
    assert [(a.request_id, a.error.code) for a in h.received()] == [(12, ErrorCode.NETWORK_TIMEOUT)]
    h.backend.release(0)
    h.backend.release(0)
    assert h.received() == []
    h.send(q_get(13, "c", b"0000"))
    h.protocol.connectionLost(None)
    assert h.clock.getDelayedCalls() == [] or all(not c.active() for c in h.clock.getDelayedCalls())


def test_idle_connection_is_closed() -> None:
    """A connection with no frames for idle_timeout is closed; activity postpones it."""
    h = ready(limits=LimitsConfig(idle_timeout=10.0))
    h.clock.advance(6)
    h.send(envelope_pb2.Envelope(request_id=2, ping=envelope_pb2.Ping()))
    h.clock.advance(6)
    assert not h.closing
    h.clock.advance(5)
    assert h.closing


# -- streams -----------------------------------------------------------------------------------


def test_range_streams_batches_then_end() -> None:
    """RANGE [0002, 0009) with chunk size 3: batches of 3, 3, 1 (has_more true, true, false), End(7)."""
    h = ready(chunk_size=3)
    fill(h, "c", 10)
    h.send(q_range(20, "c", b"0002", b"0009"))
    frames = h.received()
    assert all(f.request_id == 20 for f in frames)
    batches = [f.stream.batch for f in frames[:-1]]
    assert [[kv.key.data for kv in b.values] for b in batches] == [
        [b"0002", b"0003", b"0004"],
        [b"0005", b"0006", b"0007"],
        [b"0008"],
    ]
    assert [b.has_more for b in batches] == [True, True, False]
    assert [f.stream.sequence for f in frames] == [0, 1, 2, 3]
    assert frames[-1].stream.end.total_count == 7


def test_range_with_start_after_end_is_empty() -> None:
    """start > end yields just StreamEnd(0), not an error."""
    h = ready()
    fill(h, "c", 5)
    h.send(q_range(20, "c", b"0004", b"0001"))
    (end,) = h.received()
    assert end.stream.end.total_count == 0


def test_range_waits_while_the_transport_is_full() -> None:
    """No chunk is read while the transport has paused its producer; resuming continues the stream."""
    h = ready(chunk_size=2)
    fill(h, "c", 6)
    producer = h.transport.producer
    producer.pauseProducing()
    h.send(q_range(20, "c", b"", b""))
    assert h.received() == []
    producer.resumeProducing()
    frames = h.received()
    assert frames[-1].stream.end.total_count == 6


def test_cancel_ends_a_stream_early() -> None:
    """CancelStream stops a stream between chunks: StreamEnd with what was sent, cancelled=true."""
    h = ready(chunk_size=2)
    fill(h, "c", 6)
    h.backend.gated = True
    h.send(q_range(20, "c", b"", b""))
    h.backend.release(0)  # first chunk read (held back to learn whether more follow)
    h.backend.release(0)  # second chunk read: the first goes out
    h.send(Envelope(request_id=21, cancel_stream=envelope_pb2.CancelStreamRequest(stream_id=20)))
    h.send(Envelope(request_id=22, cancel_stream=envelope_pb2.CancelStreamRequest(stream_id=99)))
    h.backend.release(0)  # the third read completes after the cancel: the stream ends
    frames = h.received()
    stream = [f.stream for f in frames if f.request_id == 20]
    assert [kv.key.data for kv in stream[0].batch.values] == [b"0000", b"0001"]
    assert stream[-1].end.total_count == 2
    assert len(stream) == 2
    by_id = {f.request_id: f for f in frames}
    assert by_id[21].cancel_stream_response.cancelled
    assert not by_id[22].cancel_stream_response.cancelled
    assert h.backend.cursors_closed == 1
    assert h.backend.waiting == []


def test_stream_cursor_is_released_when_the_connection_drops() -> None:
    """A connection lost mid-stream closes the stream's cursor and sends nothing more."""
    h = ready(chunk_size=2)
    fill(h, "c", 6)
    h.backend.gated = True
    h.send(q_range(20, "c", b"", b""))
    h.protocol.connectionLost(Exception("gone"))  # type: ignore[arg-type]
    assert h.backend.cursors_closed == 1
    h.backend.release(0)
    assert h.received() == []


def test_frames_wait_while_the_client_does_not_read() -> None:
    """While the transport's write buffer is full the server reads no further requests."""
    h = ready()
    producer = h.transport.producer
    producer.pauseProducing()
    assert h.transport.producerState == "paused"
    h.send(envelope_pb2.Envelope(request_id=2, ping=envelope_pb2.Ping()))
    assert h.received() == []
    producer.resumeProducing()
    assert [f.request_id for f in h.received()] == [2]


# -- drain -------------------------------------------------------------------------------------


def test_drain_refuses_new_requests_finishes_old_ones_then_closes() -> None:
    """During a drain the client is told (a SERVER_SHUTTING_DOWN notice for request id 0), new
    requests get SERVER_SHUTTING_DOWN, the in-flight one completes, and the server closes once the
    grace period is over and nothing is in flight."""
    h = ready()
    fill(h, "c", 1)
    h.backend.gated = True
    h.send(q_get(10, "c", b"0000"))
    drained = h.factory.start_drain(grace=2.0)
    (notice,) = h.received()
    assert notice.request_id == 0 and notice.error.code == ErrorCode.SERVER_SHUTTING_DOWN
    h.send(q_get(11, "c", b"0000"))
    (refused,) = h.received()
    assert refused.request_id == 11 and refused.error.code == ErrorCode.SERVER_SHUTTING_DOWN
    assert refused.error.category == ErrorCategory.RETRYABLE
    assert not h.closing
    h.clock.advance(2.0)
    assert not h.closing, "a busy connection is not cut when the grace period ends"
    h.backend.release(0)
    (done,) = h.received()
    assert done.request_id == 10 and done.query_response.result.single.value.data == b"v0"
    assert h.closing
    assert not drained.called
    h.protocol.connectionLost(Exception("closed"))  # type: ignore[arg-type]
    assert drained.called


def test_drain_lets_clients_close_idle_connections_first() -> None:
    """An idle connection is told of the shutdown and left open for the client to close; the
    server closes it itself only when the grace period ends."""
    h = ready()
    drained = h.factory.start_drain(grace=2.0)
    (notice,) = h.received()
    assert notice.request_id == 0 and notice.error.code == ErrorCode.SERVER_SHUTTING_DOWN
    assert not h.closing
    h.clock.advance(1.9)
    assert not h.closing
    h.clock.advance(0.1)
    assert h.closing
    h.protocol.connectionLost(Exception("closed"))  # type: ignore[arg-type]
    assert drained.called


def test_drain_ends_when_clients_close_before_the_grace_period() -> None:
    """When every client closes after the notice, the drain is over without waiting for the grace."""
    h = ready()
    drained = h.factory.start_drain(grace=30.0)
    h.protocol.connectionLost(Exception("client closed"))  # type: ignore[arg-type]
    assert drained.called


@pytest.mark.parametrize("kind", ["query", "batch"])
def test_shutdown_error_is_retryable(kind: str) -> None:
    """SERVER_SHUTTING_DOWN answers carry the RETRYABLE category for every request kind."""
    h = ready()
    h.backend.gated = True
    h.send(q_set(10, "c", b"k", b"v"))
    h.factory.start_drain()
    h.received()  # the notice
    if kind == "query":
        h.send(q_get(11, "c", b"k"))
    else:
        h.send(Envelope(request_id=11, batch=aql_pb2.BatchRequest()))
    (answer,) = h.received()
    assert answer.error.code == ErrorCode.SERVER_SHUTTING_DOWN
    assert answer.error.category == ErrorCategory.RETRYABLE


# -- fuzzing -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8), st.booleans())
def test_arbitrary_bytes_never_crash_the_server(chunks: list[bytes], handshake_first: bool) -> None:
    """Random frames (before or after a handshake) are answered or refused, never raised."""
    h = ready() if handshake_first else make()
    for chunk in chunks:
        h.protocol.dataReceived(encode_frame(chunk))
        h.protocol.dataReceived(chunk)
    for answer in h.received():
        assert answer.WhichOneof("body") is not None


def test_a_short_deadline_is_kept_behind_a_long_one() -> None:
    """A request with the short deadline that arrives while only a long one (a FILTER's
    fhe.query_timeout) is in flight still times out at its own deadline."""
    h = ready(limits=LimitsConfig(request_timeout=2.0))
    h.factory.fhe_query_timeout = 600.0
    long_running: defer.Deferred[Any] = defer.Deferred()
    h.protocol._track(90, long_running, "filter")  # the connection's timer is now 600 s away
    fill(h, "c", 1)
    h.backend.gated = True
    h.send(q_get(10, "c", b"0000"))
    h.clock.advance(2.0)
    assert [(a.request_id, a.error.code) for a in h.received()] == [(10, ErrorCode.NETWORK_TIMEOUT)]
    h.clock.advance(597.9)
    assert h.received() == []
    h.clock.advance(0.2)
    assert [(a.request_id, a.error.code) for a in h.received()] == [(90, ErrorCode.NETWORK_TIMEOUT)]
    h.backend.release(0)


def big_values(h: Any, count: int, size: int) -> None:
    h.send_many([q_set(1000 + i, "c", b"%04d" % i, bytes([65 + i]) * size) for i in range(count)])
    assert len(h.received()) == count


def pause_on_first_write(h: Any) -> None:
    """Make the transport push back (pause its producer) on its next write, as a full socket
    buffer does."""
    write = h.transport.write

    def full(data: bytes) -> None:
        write(data)
        h.transport.write = write
        h.transport.producer.pauseProducing()

    h.transport.write = full


@pytest.mark.parametrize("behind", ["batch", "range"])
def test_a_read_whose_answers_fill_the_transport_waits_for_it_in_order(behind: str) -> None:
    """When the transport pushes back in the middle of a read's GET/SET/DELETE requests run
    together, the rest of them wait, unrun, until it drains, and so does the frame behind them
    (a batch, or a query of another kind), which then sees their writes; nothing more is read
    meanwhile, and every request is answered once, in order."""
    h = ready()
    big_values(h, 4, 200 * 1024)  # two answers fill the 256 KiB the protocol writes at once
    if behind == "batch":
        batch = aql_pb2.BatchRequest(
            queries=[query_pb2.Query(get=query_pb2.GetQuery(collection="c", key=key(b"new")))]
        )
        frame = Envelope(request_id=14, batch=batch)
    else:
        frame = q_range(14, "c", b"new", b"")
    pause_on_first_write(h)
    h.send_many(
        [
            q_get(10, "c", b"0000"),
            q_get(11, "c", b"0001"),
            q_get(12, "c", b"0002"),
            q_set(13, "c", b"new", b"written"),
            frame,
            q_get(15, "c", b"0003"),
        ]
    )
    assert [a.request_id for a in h.received()] == [10, 11]
    assert h.transport.producerState == "paused"
    assert h.backend.get("c", b"new").result is None  # the SET has not run yet
    h.transport.producer.resumeProducing()
    answers = h.received()
    assert [a.request_id for a in answers][:3] == [12, 13, 14]
    if behind == "batch":
        assert answers[2].batch_response.results.results[0].single.value.data == b"written"
    else:
        rows = [
            kv.value.data
            for a in answers
            if a.request_id == 14 and a.stream.HasField("batch")
            for kv in a.stream.batch.values
        ]
        assert rows == [b"written"]
    last = next(a for a in answers if a.request_id == 15)
    assert last.query_response.result.single.value.data == b"D" * 200 * 1024


def test_requests_set_aside_are_given_up_when_the_connection_closes() -> None:
    """Requests still waiting for the transport to drain when the connection is lost never run;
    their stages' afters see them end (load shedding's count goes back down)."""
    from amaters.protect.shedding import LoadShedder

    h = ready()
    shedder = LoadShedder(LimitsConfig(), lambda: 0.0)
    h.factory.pipeline.add_stage(shedder)
    big_values(h, 3, 200 * 1024)
    pause_on_first_write(h)
    h.send_many(
        [
            q_get(10, "c", b"0000"),
            q_get(11, "c", b"0001"),
            q_get(12, "c", b"0002"),
            q_set(13, "c", b"x", b"y"),
        ]
    )
    assert [a.request_id for a in h.received()] == [10, 11]
    assert shedder.in_progress == 2
    h.protocol.connectionLost(None)
    assert shedder.in_progress == 0
    assert h.backend.get("c", b"x").result is None


@pytest.mark.interpreted_only
def test_a_failure_while_running_a_read_together_answers_each_request() -> None:
    """Should running the keyed requests of a read together fail unexpectedly (a bug), each of
    them is still answered, with SERVER_INTERNAL, and the connection stays usable."""
    h = ready()
    pipeline = h.factory.pipeline
    real = pipeline.admit_many

    def broken(items: Any, finished: Any) -> Any:
        raise RuntimeError("bug")

    pipeline.admit_many = broken  # type: ignore[method-assign]
    errors: list[LogEvent] = []
    globalLogPublisher.addObserver(errors.append)
    try:
        h.send_many([q_get(10, "c", b"k"), q_get(11, "c", b"k")])
    finally:
        globalLogPublisher.removeObserver(errors.append)
        pipeline.admit_many = real  # type: ignore[method-assign]
    answers = h.received()
    assert [(a.request_id, a.error.code) for a in answers] == [
        (10, ErrorCode.SERVER_INTERNAL),
        (11, ErrorCode.SERVER_INTERNAL),
    ]
    assert "bug" not in answers[0].error.message
    assert [e for e in errors if e.get("log_failure") is not None]
    h.send_many([q_set(12, "c", b"k", b"v"), q_get(13, "c", b"k")])
    assert h.received()[1].query_response.result.single.value.data == b"v"


def test_a_reads_sets_are_written_together_and_answered_as_one_by_one() -> None:
    """Consecutive SETs of one read reach the backend as one write_batch; each is answered with the
    bytes a lone SET gets, in order, and a GET later in the read sees the last of them."""
    h = ready()
    fill(h, "c", 3)
    batches: list[Any] = []
    write_batch = h.backend.write_batch

    def recording(ops: Any) -> Any:
        batches.append(list(ops))
        return write_batch(batches[-1])

    h.backend.write_batch = recording  # type: ignore[method-assign]
    h.send_many(
        [
            q_set(20, "c", b"k", b"one"),
            q_set(21, "c", b"j", b"two"),
            q_set(22, "c", b"k", b"three"),
            q_get(23, "c", b"k"),
            q_set(24, "c", b"j", b"four"),
        ]
    )
    data = h.transport.value()
    answers = h.received()
    assert [a.request_id for a in answers] == [20, 21, 22, 23, 24]
    assert answers[3].query_response.result.single.value.data == b"three"
    assert [len(b) for b in batches] == [3]  # the lone SET after the GET is a put of its own
    # Byte for byte what the protobuf runtime gives for the same answers.
    assert data.startswith(b"".join(encode_frame(a.SerializeToString()) for a in answers[:3]))
    for answer in (answers[0], answers[1], answers[2], answers[4]):
        assert answer.query_response.result.success.affected_rows == 1


def test_a_run_of_keyed_frames_joins_its_batch_in_one_call() -> None:
    """The GET, SET and DELETE frames that follow the first of a read join its batch without a
    frame handler call each; the frame that fills the batch (the in-flight limit's room), and any
    other frame, still comes through it.  Every request is answered, in order."""
    h = ready(limits=LimitsConfig(max_inflight_per_connection=5))
    fill(h, "c", 1)
    handled: list[bytes] = []
    string_received = h.protocol.stringReceived

    def counting(frame: bytes) -> None:
        handled.append(frame)
        string_received(frame)

    h.protocol.stringReceived = counting  # type: ignore[method-assign]
    h.send_many([q_set(100 + i, "c", b"k%d" % i, b"v%d" % i) for i in range(12)] + [q_get(112, "c", b"k11")])
    answers = h.received()
    assert [a.request_id for a in answers] == list(range(100, 113))
    assert answers[-1].query_response.result.single.value.data == b"v11"
    # Room 5: the 1st opens a batch, the 2nd-4th join it in one call, the 5th fills it; the 6th
    # opens the next; the 11th the last, which the 12th and 13th join.
    assert len(handled) == 5


def _delete(rid: int, collection: str, k: bytes) -> Envelope:
    q = query_pb2.Query(delete=query_pb2.DeleteQuery(collection=collection, key=key(k)))
    return Envelope(request_id=rid, query=aql_pb2.QueryRequest(query=q))


def _frame_of(kind: str, rid: int, collection: str, k: bytes) -> bytes:
    if kind == "set":
        envelope = q_set(rid, collection, k, b"value %d" % rid)
    elif kind == "get":
        envelope = q_get(rid, collection, k)
    elif kind == "delete":
        envelope = _delete(rid, collection, k)
    elif kind == "bad-checksum":
        envelope = q_set(rid, collection, k, b"corrupted", checksum=1)
    elif kind == "empty-key":
        envelope = q_get(rid, collection, b"")
    elif kind == "batch":
        get = query_pb2.Query(get=query_pb2.GetQuery(collection=collection, key=key(k)))
        envelope = Envelope(request_id=rid, batch=aql_pb2.BatchRequest(queries=[get]))
    else:
        return encode_frame(b"\xff\xff\xff")  # not an Envelope
    return encode_frame(envelope.SerializeToString())


@settings(max_examples=100, deadline=None)
@given(
    requests=st.lists(
        st.tuples(
            st.sampled_from(
                ["set", "set", "get", "get", "delete", "bad-checksum", "empty-key", "batch", "junk"]
            ),
            st.sampled_from(["c", "d", "e"]),
            st.sampled_from([b"a", b"b", b"c"]),
        ),
        min_size=1,
        max_size=40,
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
    inflight=st.integers(min_value=1, max_value=20),
    cache_bytes=st.sampled_from([0, 300, 1 << 20]),
)
def test_frames_read_together_are_answered_as_the_same_frames_read_one_by_one(
    requests: list[tuple[str, str, bytes]], cuts: list[int], inflight: int, cache_bytes: int
) -> None:
    """Whatever the mix of frames (keyed requests, requests a rule refuses, other kinds, frames that
    are not Envelopes), the collections' names seen before or not, the in-flight limit, a query
    cache or none (or one that holds a few answers), and wherever the reads cut the bytes: the
    answers are byte for byte those of the same frames each read alone, and so is what is stored."""
    frames = [_frame_of(kind, 10 + i, collection, k) for i, (kind, collection, k) in enumerate(requests)]
    limits = LimitsConfig(max_inflight_per_connection=inflight)
    alone, together = (
        ready(limits=limits, cache_bytes=cache_bytes),
        ready(limits=limits, cache_bytes=cache_bytes),
    )
    for h in (alone, together):
        h.backend.create_collection("c")
        h.backend.create_collection("d")  # and no "e": its requests fail
    for frame in frames:
        alone.protocol.dataReceived(frame)
    data = b"".join(frames)
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    for start, stop in itertools.pairwise(points):
        together.protocol.dataReceived(data[start:stop])
    assert together.transport.value() == alone.transport.value()
    assert _stored(together) == _stored(alone)


def _stored(h: Any) -> dict[str, dict[bytes, bytes]]:
    return {
        name: {k: blob.data for k, blob in pairs.items()} for name, pairs in h.backend._collections.items()
    }


def test_a_keyed_frame_cut_anywhere_by_a_read_waits_for_the_rest_of_it() -> None:
    """A read that ends inside a frame, after requests that opened a batch, leaves the frame whole
    for the next read, wherever the cut: cut where its value begins, a SET's first bytes would
    read as a DELETE of the same key."""
    first = encode_frame(q_set(10, "c", b"a", b"one").SerializeToString())
    second = encode_frame(q_set(11, "c", b"b", b"two").SerializeToString())
    cut_set = encode_frame(q_set(12, "c", b"x", b"new value").SerializeToString())
    last = encode_frame(q_get(13, "c", b"x").SerializeToString())
    alone = ready()
    alone.backend.create_collection("c")
    for frame in (first, second, cut_set, last):
        alone.protocol.dataReceived(frame)
    expected = alone.transport.value()
    for cut in range(len(cut_set)):
        h = ready()
        h.backend.create_collection("c")
        h.protocol.dataReceived(first + second + cut_set[:cut])
        h.protocol.dataReceived(cut_set[cut:] + last)
        assert h.transport.value() == expected, cut
        assert _stored(h) == _stored(alone)


@pytest.mark.parametrize("compressed", [False, True])
def test_a_reads_cached_gets_are_answered_together_and_as_one_by_one(compressed: bool) -> None:
    """The GETs of a read that the query cache answers are answered in one call, in order, with the
    bytes each gets alone; a miss, or (frames compressed) an answer over the threshold, and the
    requests after it are answered as before, the large answer compressed as it would be alone.
    A cached GET alone in its read is answered by the call that runs it, unless to be compressed."""
    from amaters.config import CompressionConfig
    from amaters.protect.compression import FrameCompressionPolicy

    h = make(cache_bytes=1 << 20)
    if compressed:
        policy = CompressionConfig(frames=["zstd"], frame_threshold_bytes=1000)
        h.factory.frame_compression = FrameCompressionPolicy(policy)
    hs = envelope_pb2.Handshake(
        version=types_pb2.Version(major=1), client_name="t", frame_compression=["zstd"]
    )
    h.send(Envelope(request_id=1, handshake=hs))
    assert h.received()[0].handshake_response.frame_compression == ("zstd" if compressed else "")
    h.backend.create_collection("c")
    values = {b"small": b"s" * 10, b"large": b"large " * 400, b"medium": b"m" * 800}
    h.send_many([q_set(10 + i, "c", k, v) for i, (k, v) in enumerate(values.items())])
    h.send_many([q_get(20 + i, "c", k) for i, k in enumerate(values)])  # misses: now cached
    h.received()
    answered_otherwise: list[int] = []
    ran = h.protocol._ran

    def counting(request_id: int, *args: Any) -> None:
        answered_otherwise.append(request_id)
        ran(request_id, *args)

    h.protocol._ran = counting  # type: ignore[method-assign]
    gets = [
        q_get(30, "c", b"small"),
        q_get(31, "c", b"large"),
        q_get(32, "c", b"medium"),
        q_get(33, "c", b"new"),
    ]
    h.send_many(gets)
    together = h.transport.value()
    h.transport.clear()
    # The miss (33) always, and with compression the large answer (31) and what follows it.
    assert answered_otherwise == ([31, 32, 33] if compressed else [33])
    answered_otherwise.clear()
    for get in gets:
        h.send(get)
    assert h.transport.value() == together
    # Alone in their reads (the missing key now cached too): each answer is queued by the call
    # that ran its request, but for the one to compress.
    assert answered_otherwise == ([31] if compressed else [])
    answers = h.received()
    assert [a.WhichOneof("body") for a in answers] == [
        "query_response",
        "compressed" if compressed else "query_response",
        "query_response",
        "query_response",
    ]
    if not compressed:
        assert [a.query_response.result.single.value.data for a in answers] == [*values.values(), b""]
