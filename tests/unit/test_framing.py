"""Length-prefixed frames: splitting, limits, chunked collection of big frames, pausing."""

from __future__ import annotations

import itertools
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from amaters.protocols.framing import FrameDecoder, FrameReceiver, encode_frame


class Recorder(FrameReceiver):
    """Records frames and oversize notices instead of acting on them."""

    def __init__(self, max_length: int = 1024 * 1024) -> None:
        self.MAX_LENGTH = max_length
        self.frames: list[bytes] = []
        self.too_large: list[int] = []
        self.delivered_runs = 0

    def stringReceived(self, frame: bytes) -> None:
        self.frames.append(frame)

    def frameTooLarge(self, length: int) -> None:
        self.too_large.append(length)

    def framesDelivered(self) -> None:
        self.delivered_runs += 1


def connected(max_length: int = 1024 * 1024) -> tuple[Recorder, StringTransport]:
    protocol = Recorder(max_length)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def test_encode_frame_is_big_endian_length_then_payload() -> None:
    """A frame is the 4-byte big-endian payload length followed by the payload."""
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


@given(st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(min_value=0), max_size=30))
def test_frames_survive_any_split_of_the_byte_stream(payloads: list[bytes], cuts: list[int]) -> None:
    """However the stream is cut into reads, every frame arrives once, whole and in order."""
    protocol, _ = connected()
    stream = b"".join(encode_frame(p) for p in payloads)
    for piece in split(stream, cuts):
        protocol.dataReceived(piece)
    assert protocol.frames == payloads
    assert protocol.too_large == []


@given(st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(min_value=0), max_size=30))
def test_decoder_round_trips_frames(payloads: list[bytes], cuts: list[int]) -> None:
    """The transport-free decoder yields exactly the encoded payloads, leaving nothing pending."""
    decoder = FrameDecoder(max_length=1024)
    stream = b"".join(encode_frame(p) for p in payloads)
    out: list[bytes] = []
    for piece in split(stream, cuts):
        out.extend(decoder.feed(piece))
    assert out == payloads
    assert decoder.pending == 0


def test_frames_larger_than_twisteds_default_limit_are_delivered() -> None:
    """A 200 KB frame is delivered (Int32StringReceiver's default would drop anything over 99,999)."""
    protocol, _ = connected()
    payload = bytes(range(256)) * 800
    protocol.dataReceived(encode_frame(payload))
    assert protocol.frames == [payload]


def test_big_frame_arriving_in_many_reads_is_delivered_once() -> None:
    """A 3 MB frame fed 64 KiB at a time is collected and delivered once, byte-exact."""
    protocol, _ = connected(max_length=8 * 1024 * 1024)
    payload = b"\x5a" * (3 * 1024 * 1024)
    data = encode_frame(payload) + encode_frame(b"next")
    for i in range(0, len(data), 65536):
        protocol.dataReceived(data[i : i + 65536])
    assert [len(f) for f in protocol.frames] == [len(payload), 4]
    assert protocol.frames[0] == payload
    assert protocol.frames[1] == b"next"


def test_oversize_length_prefix_stops_delivery() -> None:
    """A length over MAX_LENGTH is reported once and no later frame is delivered."""
    protocol, _ = connected(max_length=100)
    protocol.dataReceived(encode_frame(b"ok") + struct.pack(">I", 101) + b"x" * 101 + encode_frame(b"later"))
    protocol.dataReceived(encode_frame(b"even later"))
    assert protocol.frames == [b"ok"]
    assert protocol.too_large == [101]


def test_paused_frames_stay_buffered_until_resumed() -> None:
    """While paused, complete frames are held back; resuming delivers them in order."""
    protocol, _ = connected()
    protocol.dataReceived(encode_frame(b"1"))
    protocol.pauseFrames()
    protocol.dataReceived(encode_frame(b"2") + encode_frame(b"3"))
    assert protocol.frames == [b"1"]
    protocol.resumeFrames()
    assert protocol.frames == [b"1", b"2", b"3"]


def test_pausing_inside_a_delivery_holds_the_rest() -> None:
    """A handler that pauses stops delivery of the frames after its own, even from one read."""

    class PauseAfterFirst(Recorder):
        def stringReceived(self, frame: bytes) -> None:
            super().stringReceived(frame)
            self.pauseFrames()

    protocol = PauseAfterFirst()
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(encode_frame(b"a") + encode_frame(b"b") + encode_frame(b"c"))
    assert protocol.frames == [b"a"]
    protocol.resumeFrames()
    assert protocol.frames == [b"a", b"b"]
    protocol.resumeFrames()
    assert protocol.frames == [b"a", b"b", b"c"]


def test_many_frames_in_one_read_end_with_one_delivered_notice() -> None:
    """framesDelivered runs once per read, so a server can send its answers in one write."""
    protocol, _ = connected()
    protocol.dataReceived(b"".join(encode_frame(b"%d" % i) for i in range(50)))
    assert len(protocol.frames) == 50
    assert protocol.delivered_runs == 1


def test_send_frame_writes_a_prefixed_payload() -> None:
    """sendFrame (and the sendString alias) write length-prefixed payloads."""
    protocol, transport = connected()
    protocol.sendFrame(b"hello")
    protocol.sendString(b"")
    assert transport.value() == b"\x00\x00\x00\x05hello\x00\x00\x00\x00"
