"""Seeded fuzzing of the frame decoder and the handshake of the native protocol server.

Each input is a byte string built from valid frames (handshakes with random names, credentials,
versions and trace context; requests of every kind) by truncating, flipping bits, splicing random
bytes and forging length prefixes (huge, zero, just over the pre-login limit), delivered to a fresh
connection of one shared server factory in random chunk sizes, then the connection is closed.
Half the connections use an authenticator that accepts, half one that refuses.

Nothing may escape ``dataReceived``, nothing may be logged as a failure or at critical level, and
nothing may accumulate: after every connection has closed, the factory holds no connection and the
receive budget is back to zero, and the number of live Python objects has not grown with the number
of inputs.  5,000 inputs by default; the ``slow`` variant runs 100,000 (``AMATERS_FUZZ_INPUTS``
changes either, ``AMATERS_FUZZ_SEED`` repeats a run).
"""

from __future__ import annotations

import gc
import os
import random
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from amaters import PROTOCOL_VERSION
from amaters.auth.principal import default_authenticator
from amaters.config import LimitsConfig
from amaters.errors import AuthError
from amaters.proto import aql_pb2, envelope_pb2, query_pb2, types_pb2
from amaters.protocols.framing import FrameDecoder, encode_frame
from amaters.protocols.server import AmatersServerFactory, AmatersServerProtocol
from amaters.query.executor import QueryExecutor
from amaters.query.pipeline import QueryPipeline
from amaters.storage.memory import MemoryBackend
from amaters.types import crc32

Envelope = envelope_pb2.Envelope
LIMITS = LimitsConfig(
    max_handshake_frame_bytes=2048, max_frame_bytes=1024 * 1024, max_buffered_bytes=16 * 1024 * 1024
)


def _handshake(rng: random.Random) -> bytes:
    hs = envelope_pb2.Handshake(
        version=types_pb2.Version(
            major=rng.choice([PROTOCOL_VERSION[0], PROTOCOL_VERSION[0], 0, 2, 2**31]),
            minor=rng.randrange(5),
        ),
        client_name="".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(40))),
    )
    kind = rng.randrange(4)
    if kind == 1:
        hs.credentials.bearer_token = "x." * rng.randrange(400)
    elif kind == 2:
        hs.credentials.api_key = f"k{rng.randrange(9)}.{'s' * rng.randrange(80)}"
    for _ in range(rng.randrange(3)):
        hs.frame_compression.append(rng.choice(["zstd", "lz4", "", "x" * 50]))
    for _ in range(rng.randrange(3)):
        hs.trace_context["traceparent" if rng.random() < 0.5 else f"k{rng.randrange(9)}"] = (
            "v" * rng.randrange(60)
        )
    return Envelope(request_id=rng.randrange(2**32), handshake=hs).SerializeToString()


def _request(rng: random.Random) -> bytes:
    data = rng.randbytes(rng.randrange(64))
    value = types_pb2.CipherBlob(
        data=data, metadata=types_pb2.CipherMetadata(size=len(data), checksum=crc32(data))
    )
    key = types_pb2.Key(data=rng.randbytes(rng.randrange(1, 16)))
    choice = rng.randrange(6)
    rid = rng.randrange(2**32)
    if choice == 0:
        query = query_pb2.Query(set=query_pb2.SetQuery(collection="c", key=key, value=value))
        return Envelope(request_id=rid, query=aql_pb2.QueryRequest(query=query)).SerializeToString()
    if choice == 1:
        query = query_pb2.Query(get=query_pb2.GetQuery(collection="c", key=key))
        return Envelope(request_id=rid, query=aql_pb2.QueryRequest(query=query)).SerializeToString()
    if choice == 2:
        query = query_pb2.Query(range=query_pb2.RangeQuery(collection="c", start=key, end=key, limit=5))
        return Envelope(request_id=rid, query=aql_pb2.QueryRequest(query=query)).SerializeToString()
    if choice == 3:
        batch = aql_pb2.BatchRequest()
        for _ in range(rng.randrange(5)):
            batch.queries.add().get.collection = "c"
        return Envelope(request_id=rid, batch=batch).SerializeToString()
    if choice == 4:
        return Envelope(request_id=rid, ping=envelope_pb2.Ping(payload=data)).SerializeToString()
    return Envelope(
        request_id=rid, cancel_stream=envelope_pb2.CancelStreamRequest(stream_id=rid)
    ).SerializeToString()


def _mutate(rng: random.Random, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(rng.randrange(4)):
        op = rng.randrange(5)
        if op == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            del data[rng.randrange(len(data)) :]
        elif op == 2:
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randrange(1, 16))
        elif op == 3:
            at = rng.randrange(len(data) + 1)
            data[at:at] = b"\x0a\x00" * rng.randrange(1, 200)  # empty repeated fields
    return bytes(data)


def fuzz_input(rng: random.Random) -> bytes:
    """One connection's worth of bytes."""
    out = bytearray()
    style = rng.randrange(10)
    if style == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if style == 1:  # a forged length prefix, then some of the promised bytes
        length = rng.choice([0, 1, 2049, 2**31 - 1, 2**32 - 1, rng.randrange(2**32)])
        return struct.pack(">I", length) + rng.randbytes(rng.randrange(64))
    frames = [_handshake(rng)] + [_request(rng) for _ in range(rng.randrange(4))]
    for frame in frames:
        if rng.random() < 0.4:
            frame = _mutate(rng, frame)
        encoded = encode_frame(frame)
        if rng.random() < 0.1:
            encoded = struct.pack(">I", rng.randrange(2**32)) + encoded[4:]
        out += encoded
    if rng.random() < 0.2:
        del out[rng.randrange(len(out)) :]
    return bytes(out)


def _chunks(rng: random.Random, data: bytes) -> Iterator[bytes]:
    at = 0
    while at < len(data):
        size = rng.choice([1, 2, 3, 7, 64, 4096, len(data)])
        yield data[at : at + size]
        at += size


def _refuse(credentials: Any, peer: Any, source: str) -> defer.Deferred[Any]:
    return defer.fail(AuthError("refused"))


def run_fuzz(count: int, seed: int) -> None:
    rng = random.Random(seed)
    clock = Clock()
    backend = MemoryBackend()
    backend.open()
    pipeline = QueryPipeline(QueryExecutor(backend), LIMITS)
    factories = [
        AmatersServerFactory(pipeline, LIMITS, clock, default_authenticator(False)),
        AmatersServerFactory(pipeline, LIMITS, clock, _refuse),
    ]
    bad: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_failure") is not None or event.get("log_level") == LogLevel.critical:
            bad.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        objects_at: dict[int, int] = {}
        for n in range(count):
            factory = factories[n % 2]
            protocol = factory.buildProtocol(None)
            assert isinstance(protocol, AmatersServerProtocol)
            transport = StringTransport()
            protocol.makeConnection(transport)
            data = fuzz_input(rng)
            for chunk in _chunks(rng, data):
                if transport.disconnecting:
                    break
                protocol.dataReceived(chunk)  # raises: the test fails with the input's index
            clock.advance(rng.choice([0, 0, 1, 11]))  # handshake and frame timers
            decoder = FrameDecoder(2**31 - 1)
            for frame in decoder.feed(transport.value()):
                Envelope().ParseFromString(frame)  # every answer is a valid Envelope
            protocol.connectionLost(Failure(ConnectionError("fuzz")))
            assert not bad, (n, seed, bad[0])
            if n in (count // 4, count - 1):
                gc.collect()
                objects_at[n] = len(gc.get_objects())
        clock.advance(120)
        for factory in factories:
            assert not factory.connections
            assert factory.budget.total == 0 and factory.budget.unauthenticated == 0
        # Three quarters more inputs leave the live object count where it was (a leak of one
        # object per input would add thousands).
        first, last = objects_at[count // 4], objects_at[count - 1]
        assert last - first < max(2000, count // 20), (first, last)
    finally:
        globalLogPublisher.removeObserver(observe)


def _seed() -> int:
    return int(os.environ.get("AMATERS_FUZZ_SEED", "20261204"))


def test_fuzzed_frames_and_handshakes_default_tier() -> None:
    """5,000 seeded inputs: no traceback, no failure logged, nothing left behind."""
    run_fuzz(int(os.environ.get("AMATERS_FUZZ_INPUTS", "5000")), _seed())


@pytest.mark.slow
def test_fuzzed_frames_and_handshakes_slow_tier() -> None:
    """100,000 seeded inputs: no traceback, no failure logged, nothing left behind."""
    run_fuzz(int(os.environ.get("AMATERS_FUZZ_INPUTS", "100000")), _seed() + 1)


def test_the_frame_decoder_alone_never_raises_anything_but_its_limit() -> None:
    """FrameDecoder.feed over 20,000 random chunkings: frames come out whole, or ValueError."""
    rng = random.Random(_seed())
    for _ in range(20_000):
        decoder = FrameDecoder(4096)
        data = fuzz_input(rng)
        try:
            for chunk in _chunks(rng, data):
                for frame in decoder.feed(chunk):
                    assert len(frame) <= 4096
        except ValueError as e:
            assert "exceeds the limit" in str(e)
        assert decoder.pending < 4096 + 4 + 4096
