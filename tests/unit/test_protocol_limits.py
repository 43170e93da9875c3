"""Per-connection limits of the native protocol on a StringTransport and a fake clock: the frame
timeout, the close deadline, the bound on answers held for a client that does not read, and
keep-alive pings against the idle timeout."""

from __future__ import annotations

from protocol_helpers import make, q_get, q_set, ready

from amaters.config import LimitsConfig
from amaters.errors import ErrorCode
from amaters.proto import envelope_pb2
from amaters.protocols.framing import encode_frame

Envelope = envelope_pb2.Envelope


def ping(rid: int) -> envelope_pb2.Envelope:
    return Envelope(request_id=rid, ping=envelope_pb2.Ping(payload=b"hi"))


def test_half_a_frame_then_silence_is_cut_after_the_frame_timeout() -> None:
    """A client that sends part of a frame and stalls gets NETWORK_TIMEOUT and is closed."""
    h = ready(limits=LimitsConfig(frame_timeout=5.0, idle_timeout=0))
    frame = encode_frame(q_get(2, "c", b"k").SerializeToString())
    h.protocol.dataReceived(frame[:7])
    h.clock.advance(4.9)
    assert not h.closing and h.received() == []
    h.clock.advance(0.2)
    (answer,) = h.received()
    assert answer.request_id == 0 and answer.error.code == ErrorCode.NETWORK_TIMEOUT
    assert "did not arrive" in answer.error.message
    assert h.closing


def test_frames_that_keep_arriving_are_not_cut() -> None:
    """Each frame has its own deadline: a client sending frames steadily, each in pieces, is served."""
    h = ready(limits=LimitsConfig(frame_timeout=5.0, idle_timeout=0))
    for rid in range(2, 8):
        frame = encode_frame(q_get(rid, "c", b"k").SerializeToString())
        h.protocol.dataReceived(frame[:5])
        h.clock.advance(3.0)
        h.protocol.dataReceived(frame[5:] + frame[:0])
        h.clock.advance(3.0)
    assert len(h.received()) == 6 and not h.closing
    assert not h.protocol._frame_timer


def test_a_closing_connection_whose_peer_does_not_read_is_cut() -> None:
    """After the server closes a connection, it is aborted if it is not gone within close_timeout."""
    h = ready(limits=LimitsConfig(close_timeout=3.0))
    h.protocol._close()
    assert h.closing and not h.transport.disconnected
    h.clock.advance(3.1)
    assert h.transport.disconnected  # StringTransport.abortConnection


def test_answers_for_a_client_that_does_not_read_are_bounded() -> None:
    """While the transport's buffer is full no new request is read, answers of requests already in
    flight are held here, and past max_buffered_response_bytes the connection is dropped instead of
    holding more."""
    limit = 64 * 1024
    h = ready(limits=LimitsConfig(max_buffered_response_bytes=limit, idle_timeout=0))
    h.send(q_set(2, "c", b"big", b"x" * 20_000))
    h.received()
    h.backend.gated = True
    h.send(q_get(3, "c", b"big"))
    h.transport.producer.pauseProducing()  # the client stopped reading: the TCP buffer is full
    assert h.protocol.framesPaused
    h.backend.release()
    assert h.received() == [] and h.protocol.buffered_response_bytes > 20_000
    h.transport.producer.resumeProducing()  # it read: the held answer goes out
    (answer,) = h.received()
    assert answer.request_id == 3 and h.protocol.buffered_response_bytes == 0
    h.send_many([q_get(rid, "c", b"big") for rid in range(10, 30)])  # 20 in flight
    h.transport.producer.pauseProducing()
    released = 0
    while h.backend.waiting and not h.transport.disconnected:
        h.backend.release()
        released += 1
        assert h.protocol.buffered_response_bytes <= limit + 21_000
    assert h.transport.disconnected, "the connection should have been dropped at the bound"
    assert released == 4  # 3 answers (60 kB) held; the 4th passes the 64 KiB bound
    assert h.protocol.buffered_response_bytes == 0


def test_held_answers_go_out_in_order() -> None:
    """Answers held while the transport was full are sent in order before any newer one."""
    h = ready()
    h.transport.producer.pauseProducing()
    h.send_many([ping(2), ping(3)])
    h.transport.producer.resumeProducing()
    h.send(ping(4))
    assert [e.request_id for e in h.received()] == [2, 3, 4]


def test_keep_alive_pings_hold_an_idle_connection_open() -> None:
    """Pings more often than idle_timeout keep a connection open; once they stop it is closed."""
    h = ready(limits=LimitsConfig(idle_timeout=10.0))
    for rid in range(2, 12):
        h.clock.advance(6.0)
        h.send(ping(rid))
        (pong,) = h.received()
        assert pong.pong.payload == b"hi"
    assert not h.closing
    h.clock.advance(10.1)
    assert h.closing


def test_a_silent_client_without_tls_still_gets_the_handshake_error() -> None:
    """No handshake within handshake_timeout and no TLS below: an error frame, then close."""
    h = make(limits=LimitsConfig(handshake_timeout=2.0))
    h.clock.advance(2.1)
    (answer,) = h.received()
    assert answer.error.code == ErrorCode.NETWORK_TIMEOUT and h.closing


def test_a_reloaded_max_frame_elements_applies_to_the_next_frame() -> None:
    """A frame with more fields than a reloaded, lower limits.max_frame_elements is refused with
    MALFORMED_MESSAGE (request id 0) without being parsed, and the connection is served after it."""
    h = ready()
    field = Envelope.DESCRIPTOR.fields_by_name["batch"].number
    body = b"\x0a\x00" * 3_000  # BatchRequest.queries, empty, three thousand times
    frame = encode_frame(bytes([field << 3 | 2, 0xF0, 0x2E]) + body)  # the varint of 6,000
    h.protocol.dataReceived(frame)
    (answer,) = h.received()  # parsed: within the default limit, refused by the batch's own rules
    assert answer.request_id == 0 and answer.batch_response.error.code == ErrorCode.PROTOCOL_MISSING_FIELD
    h.factory.update_limits(LimitsConfig(max_frame_elements=1_000))
    h.protocol.dataReceived(frame + encode_frame(ping(7).SerializeToString()))
    refused, pong = h.received()
    assert refused.request_id == 0 and refused.error.code == ErrorCode.PROTOCOL_MALFORMED_MESSAGE
    assert "limits.max_frame_elements" in refused.error.message
    assert pong.request_id == 7 and not h.closing
