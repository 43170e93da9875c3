"""The native protocol server protocol on a StringTransport with a Clock: a harness for unit tests
(no sockets, no real time), and request builders."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from amaters.config import LimitsConfig
from amaters.protect.cache import CachingExecutor, QueryCache
from amaters.proto import aql_pb2, envelope_pb2, query_pb2, types_pb2
from amaters.protocols.framing import FrameDecoder, encode_frame
from amaters.protocols.server import AmatersServerFactory, AmatersServerProtocol
from amaters.query.executor import QueryExecutor
from amaters.query.pipeline import QueryPipeline
from amaters.storage.memory import MemoryBackend
from amaters.types import CipherBlob, crc32

Envelope = envelope_pb2.Envelope


class GatedBackend(MemoryBackend):
    """A memory backend whose get/put answer only when the test releases them (when gated)."""

    def __init__(self) -> None:
        super().__init__()
        self.gated = False
        self.waiting: list[tuple[defer.Deferred[Any], defer.Deferred[Any]]] = []
        self.explode = False

    def _gate(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        if not self.gated:
            return d
        held: defer.Deferred[Any] = defer.Deferred()
        self.waiting.append((d, held))
        return held

    def release(self, index: int = 0) -> None:
        inner, held = self.waiting.pop(index)
        inner.chainDeferred(held)

    def get(self, collection: str, key: bytes) -> defer.Deferred[CipherBlob | None]:
        if self.explode:
            raise RuntimeError("disk on fire at /secret/path")
        return self._gate(super().get(collection, key))

    def put(self, collection: str, key: bytes, value: CipherBlob) -> defer.Deferred[None]:
        return self._gate(super().put(collection, key, value))

    def scan(
        self, collection: str, start: bytes, end: bytes | None, limit: int | None, chunk_size: int
    ) -> Any:
        cursor = super().scan(collection, start, end, limit, chunk_size)
        backend = self

        class GatedCursor:
            closed = False

            def next_chunk(self) -> defer.Deferred[Any]:
                return backend._gate(cursor.next_chunk())

            def close(self) -> None:
                self.closed = True
                backend.cursors_closed += 1
                cursor.close()

        return GatedCursor()

    cursors_closed = 0


@attrs.define
class Harness:
    protocol: AmatersServerProtocol
    transport: StringTransport
    factory: AmatersServerFactory
    backend: GatedBackend
    clock: Clock
    decoder: FrameDecoder

    def send(self, envelope: envelope_pb2.Envelope) -> None:
        self.protocol.dataReceived(encode_frame(envelope.SerializeToString()))

    def send_many(self, envelopes: list[envelope_pb2.Envelope]) -> None:
        self.protocol.dataReceived(b"".join(encode_frame(e.SerializeToString()) for e in envelopes))

    def received(self) -> list[envelope_pb2.Envelope]:
        data = self.transport.value()
        self.transport.clear()
        out = []
        for frame in self.decoder.feed(data):
            envelope = Envelope()
            envelope.ParseFromString(frame)
            out.append(envelope)
        return out

    def handshake(self, major: int = 1, token: str | None = None) -> envelope_pb2.Envelope:
        hs = envelope_pb2.Handshake(version=types_pb2.Version(major=major), client_name="test")
        if token:
            hs.credentials.bearer_token = token
        self.send(Envelope(request_id=1, handshake=hs))
        (answer,) = self.received()
        return answer

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)


def make(
    limits: LimitsConfig | None = None, authenticate: Any = None, chunk_size: int = 3, cache_bytes: int = 0
) -> Harness:
    """A connection past TCP, before its handshake; with a query cache of ``cache_bytes`` if not 0."""
    limits = limits or LimitsConfig()
    clock = Clock()
    backend = GatedBackend()
    backend.open()
    executor: Any = QueryExecutor(backend, range_chunk_size=chunk_size)
    if cache_bytes:
        executor = CachingExecutor(executor, QueryCache(cache_bytes))
    pipeline = QueryPipeline(executor, limits)
    factory = AmatersServerFactory(pipeline, limits, clock, authenticate)
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, AmatersServerProtocol)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return Harness(protocol, transport, factory, backend, clock, FrameDecoder(2**31 - 1))


def ready(**kwargs: Any) -> Harness:
    h = make(**kwargs)
    assert h.handshake().WhichOneof("body") == "handshake_response"
    return h


def another(h: Harness) -> Harness:
    """A second connection to ``h``'s factory (same pipeline, backend and clock), past its handshake."""
    protocol = h.factory.buildProtocol(None)
    assert isinstance(protocol, AmatersServerProtocol)
    transport = StringTransport()
    protocol.makeConnection(transport)
    other = Harness(protocol, transport, h.factory, h.backend, h.clock, FrameDecoder(2**31 - 1))
    assert other.handshake().WhichOneof("body") == "handshake_response"
    return other


def key(data: bytes) -> types_pb2.Key:
    return types_pb2.Key(data=data)


def blob(data: bytes, checksum: int | None = None) -> types_pb2.CipherBlob:
    return types_pb2.CipherBlob(
        data=data,
        metadata=types_pb2.CipherMetadata(
            size=len(data), checksum=crc32(data) if checksum is None else checksum
        ),
    )


def q_set(
    rid: int, collection: str, k: bytes, v: bytes, checksum: int | None = None
) -> envelope_pb2.Envelope:
    return Envelope(
        request_id=rid,
        query=aql_pb2.QueryRequest(
            query=query_pb2.Query(
                set=query_pb2.SetQuery(collection=collection, key=key(k), value=blob(v, checksum))
            )
        ),
    )


def q_get(rid: int, collection: str, k: bytes) -> envelope_pb2.Envelope:
    return Envelope(
        request_id=rid,
        query=aql_pb2.QueryRequest(
            query=query_pb2.Query(get=query_pb2.GetQuery(collection=collection, key=key(k)))
        ),
    )


def q_range(
    rid: int, collection: str, start: bytes, end: bytes, limit: int | None = None
) -> envelope_pb2.Envelope:
    r = query_pb2.RangeQuery(collection=collection, start=key(start), end=key(end))
    if limit is not None:
        r.limit = limit
    return Envelope(request_id=rid, query=aql_pb2.QueryRequest(query=query_pb2.Query(range=r)))


def query_error(envelope: envelope_pb2.Envelope) -> Any:
    assert envelope.WhichOneof("body") == "query_response"
    assert envelope.query_response.WhichOneof("response") == "error"
    return envelope.query_response.error


def fill(h: Harness, collection: str, count: int) -> None:
    h.send_many([q_set(1000 + i, collection, b"%04d" % i, b"v%d" % i) for i in range(count)])
    assert len(h.received()) == count


# -- handshake ---------------------------------------------------------------------------------
