"""The Twisted client for amaters' native protocol.

::

    from amaters.client import connect

    async def main(reactor):
        client = await connect(reactor, "127.0.0.1", 7878, ca_cert="amaters-data/tls/ca.pem")
        await client.set("users", b"alice", b"ciphertext...")
        value = await client.get("users", b"alice")          # bytes, or None when missing
        async for chunk in client.scan("users", b"a", b"b"):  # streamed in bounded chunks
            for key, value in chunk:
                ...
        await client.close()

Every method returns a Deferred (awaitable in ``async def`` code run by Twisted).  Requests are
pipelined on one connection and may complete out of order; each has a timeout.  Errors are
:class:`amaters.errors.AmatersError` subclasses carrying ``code``, ``category`` and ``retryable``,
whether the server sent them or the client detected them (connection refused or lost, TLS failure,
timeout).

With ``cipher=AESGCMCipher.from_file(path)`` values are encrypted before they leave the client and
decrypted after they arrive, so the server only ever stores ciphertext.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import attrs
from google.protobuf.message import DecodeError
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IPullProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from amaters import PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS, __version__
from amaters.crypto import AESGCMCipher
from amaters.errors import (
    AmatersError,
    ErrorCode,
    InvalidValue,
    MalformedMessage,
    NetworkError,
    ProtocolError,
    RequestTimeout,
    ShuttingDown,
)
from amaters.protect.compression import (
    compress_blob_data,
    compress_frame,
    decompress_blob_data,
    decompress_frame,
)
from amaters.proto import aql_pb2, envelope_pb2, query_pb2, types_pb2
from amaters.proto.convert import (
    blob_from_proto,
    error_from_proto,
    fill_blob,
    version_from_proto,
    version_to_proto,
)
from amaters.protocols.framing import FrameReceiver, frame_header
from amaters.tls.context import client_tls_options
from amaters.types import CipherBlob, Compression, crc32

Envelope = envelope_pb2.Envelope
KeyLike = bytes | str

DEFAULT_PORT = 7878
CLIENT_NAME = f"amaters-py/{__version__}"

#: Frames at least this large are written piece by piece as the connection drains (see _FrameWriter).
LARGE_FRAME_BYTES = 1 << 20
#: The size of those pieces.
WRITE_PIECE_BYTES = 1 << 18


def _key(key: KeyLike) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def _connection_error(reason: Failure | None, where: str) -> AmatersError:
    """The AmatersError for a connection that failed or ended."""
    value = reason.value if reason is not None else None
    if isinstance(value, AmatersError):
        return value
    if isinstance(value, SSL.Error):
        return NetworkError(
            f"TLS with {where} failed: {_ssl_reason(value)}", code=ErrorCode.NETWORK_TLS_HANDSHAKE
        )
    if isinstance(value, error.ConnectionRefusedError):
        return NetworkError(
            f"{where} refused the connection (is the server running?)",
            code=ErrorCode.NETWORK_CONNECTION_REFUSED,
        )
    if isinstance(value, (error.TimeoutError, defer.TimeoutError, defer.CancelledError)):
        return RequestTimeout(f"connecting to {where} timed out")
    if isinstance(value, error.DNSLookupError):
        return NetworkError(f"cannot resolve {where}", code=ErrorCode.NETWORK_DNS_FAILED)
    if isinstance(value, error.ConnectionDone):
        return NetworkError(f"the connection to {where} was closed", code=ErrorCode.NETWORK_CONNECTION_RESET)
    detail = str(value) if value is not None else "unknown reason"
    return NetworkError(
        f"the connection to {where} was lost: {detail}", code=ErrorCode.NETWORK_CONNECTION_RESET
    )


def _ssl_reason(e: SSL.Error) -> str:
    try:
        parts = [str(item[2]) for item in e.args[0] if len(item) >= 3]
    except (IndexError, TypeError):
        parts = []
    return "; ".join(parts) or str(e) or "handshake failed"


@attrs.frozen
class ServerInfo:
    """What ``server_info()`` answers."""

    version: tuple[int, int, int]
    supported_versions: tuple[tuple[int, int, int], ...]
    capabilities: tuple[str, ...]
    uptime_seconds: int


@attrs.frozen
class HandshakeInfo:
    """What the server said in the handshake."""

    version: tuple[int, int, int]
    supported_versions: tuple[tuple[int, int, int], ...]
    capabilities: tuple[str, ...]
    principal: str
    roles: tuple[str, ...]
    server_name: str
    #: The per-frame compression negotiated ("": none).
    frame_compression: str = ""


@attrs.frozen
class BatchOp:
    """One query of a :meth:`AmatersClient.batch`: build with ``BatchOp.get/set/delete``."""

    kind: Literal["get", "set", "delete"]
    collection: str
    key: bytes = attrs.field(repr=False)
    value: bytes | None = attrs.field(default=None, repr=False)

    @classmethod
    def get(cls, collection: str, key: KeyLike) -> BatchOp:
        return cls("get", collection, _key(key))

    @classmethod
    def set(cls, collection: str, key: KeyLike, value: bytes) -> BatchOp:
        return cls("set", collection, _key(key), value)

    @classmethod
    def delete(cls, collection: str, key: KeyLike) -> BatchOp:
        return cls("delete", collection, _key(key))


class _Pending:
    __slots__ = ("deferred", "timer")

    def __init__(self, deferred: defer.Deferred[Any], timer: IDelayedCall | None) -> None:
        self.deferred = deferred
        self.timer = timer


class ScanStream:
    """An async iterator over a RANGE's chunks (lists of ``(key, value)``), as the server streams them.

    ``cancel()`` asks the server to stop; iteration then ends after chunks already on their way.
    ``total_count`` is the server's count once the stream has ended.
    """

    #: Chunks buffered before the client stops reading from the connection.
    MAX_BUFFERED = 8

    def __init__(self, client: AmatersClient, request_id: int, collection: str) -> None:
        self._client = client
        self._protocol = client._protocol
        self.request_id = request_id
        self.collection = collection
        self._queue: collections.deque[list[tuple[bytes, bytes]]] = collections.deque()
        self._waiter: defer.Deferred[None] | None = None
        self._error: AmatersError | None = None
        self._done = False
        self._cancelled = False
        self._paused = False
        self.total_count: int | None = None
        self._ended: defer.Deferred[None] = defer.Deferred()

    # Called by the protocol.
    def _feed(self, envelope: envelope_pb2.Envelope) -> bool:
        """Take one frame; return True when the stream is over."""
        kind = envelope.WhichOneof("body")
        if kind == "error":
            return self._fail(error_from_proto(envelope.error))
        if kind != "stream":
            return self._fail(ProtocolError(f"unexpected {kind} frame in a stream"))
        response = envelope.stream
        which = response.WhichOneof("chunk")
        if which == "batch":
            if not self._cancelled:
                try:
                    pairs = self._items(response.batch.values)
                except AmatersError as e:
                    return self._fail(e)
                self._queue.append(pairs)
                if len(self._queue) >= self.MAX_BUFFERED and not self._paused:
                    self._paused = True
                    self._protocol.transport.pauseProducing()  # type: ignore[union-attr]
            self._wake()
            return False
        if which == "end":
            self.total_count = response.end.total_count
            self._finish()
            return True
        if which == "error":
            return self._fail(error_from_proto(response.error))
        if which == "value":
            kv = response.value
            self._queue.append(
                [(kv.key.data, self._client._open_value(self.collection, kv.key.data, kv.value))]
            )
            self._wake()
            return False
        return self._fail(MalformedMessage("a stream frame without a chunk"))

    def _items(self, values: Any) -> list[Any]:
        """A batch's ``(key, value)`` pairs, values opened (decrypted) as ``get`` would."""
        return [
            (kv.key.data, self._client._open_value(self.collection, kv.key.data, kv.value)) for kv in values
        ]

    def _fail(self, err: AmatersError) -> bool:
        self._error = err
        self._finish()
        return True

    def _finish(self) -> None:
        self._done = True
        self._resume()
        self._wake()
        if not self._ended.called:
            self._ended.callback(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            transport = self._protocol.transport
            if transport is not None and self._protocol.connected:
                transport.resumeProducing()  # type: ignore[attr-defined]

    def __aiter__(self) -> ScanStream:
        return self

    async def __anext__(self) -> list[tuple[bytes, bytes]]:
        while not self._queue and not self._done:
            self._waiter = defer.Deferred()
            await self._waiter
        if self._queue:
            chunk = self._queue.popleft()
            if self._paused and len(self._queue) <= 1:
                self._resume()
            return chunk
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    def cancel(self) -> defer.Deferred[None]:
        """Ask the server to stop; fires when the stream has ended.  Buffered chunks are dropped."""
        if not self._done and not self._cancelled:
            self._cancelled = True
            self._queue.clear()
            self._resume()
            d = self._client._request(
                Envelope(cancel_stream=envelope_pb2.CancelStreamRequest(stream_id=self.request_id))
            )
            d.addErrback(lambda _: None)  # the stream's own end (or the connection's) settles it
        return self._ended


class FilterStream(ScanStream):
    """A FILTER's rows as the server evaluates them: chunks of ``(key, encrypted record, encrypted
    boolean)``; only the holder of the secret key can tell which rows matched."""

    def _items(self, values: Any) -> list[Any]:
        return [(kv.key.data, kv.value.data, kv.encrypted_predicate_result) for kv in values]


@implementer(IPullProducer)
class _FrameWriter:
    """Writes queued frames to a transport a piece at a time, as the transport asks for more.

    A large frame written at once would sit whole in the transport's buffer (and again, encrypted,
    in the TLS layer's) until the socket drained; pieces keep at most one piece in flight.  Frames
    queued behind a large one wait their turn, so frames never interleave.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.pieces: collections.deque[memoryview | bytes] = collections.deque()
        self.registered = False

    @property
    def busy(self) -> bool:
        return bool(self.pieces)

    def add(self, header: bytes, payload: Sequence[bytes]) -> None:
        self.pieces.append(header)
        self.pieces.extend(memoryview(piece) for piece in payload if piece)
        if not self.registered:
            self.registered = True
            self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        budget = WRITE_PIECE_BYTES
        while self.pieces and budget > 0:
            piece = self.pieces[0]
            if len(piece) <= budget:
                self.pieces.popleft()
            else:
                self.pieces[0] = piece[budget:]
                piece = piece[:budget]
            budget -= len(piece)
            self.transport.write(bytes(piece))
        if not self.pieces and self.registered:
            self.registered = False
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.pieces.clear()
        self.registered = False


@implementer(IHandshakeListener)
class AmatersClientProtocol(FrameReceiver):
    """Frames in and out, request ids, pending requests and their timeouts."""

    _log = Logger()
    MAX_LENGTH = 2**31 - 1

    def __init__(self, clock: Any, timeout: float | None, where: str = "the server") -> None:
        self.clock = clock
        self.timeout = timeout
        self.where = where
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        self._streams: dict[int, ScanStream] = {}
        self._closed: defer.Deferred[None] = defer.Deferred()
        self._last_error: AmatersError | None = None
        self.connected = False
        #: Per-frame compression negotiated in the handshake ("": none) and from what size.
        self.frame_codec = ""
        self.frame_threshold = 0
        #: When a frame last went out or came in (for keep-alive pings).
        self.last_activity = clock.seconds() if clock is not None else 0.0
        #: Set when the server announced it is shutting down: new requests fail at once with it.
        self.going_away: ShuttingDown | None = None
        #: Whether the TLS handshake completed (for a timeout's message).
        self.tls_established = False
        self._writer: _FrameWriter | None = None
        #: Whether the connection has ended (then new requests fail with "connection closed").
        self.lost = False
        #: Clustered mode: the newest revision per shard seen in answers (the session token).
        self.revisions: dict[str, int] = {}

    def connectionMade(self) -> None:
        self.connected = True
        self._writer = _FrameWriter(self.transport)

    def handshakeCompleted(self) -> None:
        self.tls_established = True

    def abort(self, reason: AmatersError) -> None:
        """Drop the connection at once (no TLS close); pending requests fail with ``reason``."""
        if self.connected and self.transport is not None:
            self._last_error = reason
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self.lost = True
        if self._writer is not None:
            self._writer.stopProducing()
        err = self._last_error or _connection_error(reason, self.where)
        pending, self._pending = self._pending, {}
        for item in pending.values():
            if item.timer is not None and item.timer.active():
                item.timer.cancel()
            item.deferred.errback(Failure(err))
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(err)
        if not self._closed.called:
            self._closed.callback(None)

    def stringReceived(self, frame: bytes) -> None:
        self.last_activity = self.clock.seconds()
        envelope = Envelope()
        try:
            envelope.ParseFromString(frame)
            if envelope.WhichOneof("body") == "compressed" and self.frame_codec:
                inner = Envelope()
                inner.ParseFromString(decompress_frame(envelope.compressed, self.MAX_LENGTH))
                envelope = inner
        except (DecodeError, AmatersError):
            self._last_error = MalformedMessage("the server sent a frame that is not a valid Envelope")
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        request_id = envelope.request_id
        if envelope.revisions:
            revisions = self.revisions
            for shard, revision in envelope.revisions.items():
                if revision > revisions.get(shard, 0):
                    revisions[shard] = revision
        stream = self._streams.get(request_id)
        if stream is not None:
            if stream._feed(envelope):
                del self._streams[request_id]
                if self.going_away is not None:
                    self._close_if_done()
            return
        item = self._pending.pop(request_id, None)
        if item is None:
            if request_id == 0 and envelope.WhichOneof("body") == "error":
                # About the connection, not a request (oversize or malformed frame, shutdown...).
                self._last_error = error_from_proto(envelope.error)
                if isinstance(self._last_error, ShuttingDown):
                    # The server is draining: send nothing more, close once answers are in.
                    self.going_away = self._last_error
                    self._close_if_done()
            return  # the answer to a request that timed out
        if item.timer is not None and item.timer.active():
            item.timer.cancel()
        if envelope.WhichOneof("body") == "error":
            item.deferred.errback(Failure(error_from_proto(envelope.error)))
        else:
            item.deferred.callback(envelope)
        if self.going_away is not None:
            self._close_if_done()

    def _close_if_done(self) -> None:
        if self.connected and not self._pending and not self._streams:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def frameTooLarge(self, length: int) -> None:
        self._last_error = ProtocolError(
            f"the server sent a frame of {length} bytes, over the client's limit"
        )
        self.transport.loseConnection()  # type: ignore[union-attr]

    def not_connected(self) -> NetworkError:
        """The error for a request made when there is no connection (any more)."""
        if not self.lost:
            return NetworkError(f"not connected to {self.where}", code=ErrorCode.NETWORK_CONNECTION_RESET)
        # _last_error: why the server (or this client) ended the connection, when it said why.
        cause = f" (it ended after: {self._last_error.message})" if self._last_error is not None else ""
        return NetworkError(
            f"the connection to {self.where} is closed{cause}", code=ErrorCode.NETWORK_CONNECTION_RESET
        )

    def request(
        self, envelope: envelope_pb2.Envelope, timeout: float | None = None, tail: Sequence[bytes] = ()
    ) -> defer.Deferred[Any]:
        """Send a request; the Deferred fires with the response Envelope or fails with AmatersError.

        ``tail``: encoded fields sent after ``envelope`` in the same frame (see :func:`_value_tail`).
        On a connection that has closed it fails with "the connection ... is closed" (naming why,
        when the server said why).
        """
        if not self.connected:
            return defer.fail(self.not_connected())
        if self.going_away is not None:
            return defer.fail(self.going_away)
        request_id = self._next_id
        self._next_id += 1
        envelope.request_id = request_id
        d: defer.Deferred[Any] = defer.Deferred()
        timer = None
        timeout = self.timeout if timeout is None else timeout
        if timeout:
            timer = self.clock.callLater(timeout, self._expired, request_id, timeout)
        self._pending[request_id] = _Pending(d, timer)
        self._write_envelope(envelope, tail)
        return d

    def _write_envelope(self, envelope: envelope_pb2.Envelope, tail: Sequence[bytes] = ()) -> None:
        if self.revisions:
            envelope.revisions.update(self.revisions)
        payload = envelope.SerializeToString()
        if tail:
            self.last_activity = self.clock.seconds()
            pieces = [payload, *tail]
            header = frame_header(sum(len(piece) for piece in pieces))
            if self._writer is not None:
                self._writer.add(header, pieces)
            else:
                self.transport.writeSequence([header, *pieces])  # type: ignore[union-attr]
            return
        if self.frame_codec and len(payload) >= self.frame_threshold:
            payload = compress_frame(payload, self.frame_codec) or payload
        self.last_activity = self.clock.seconds()
        writer = self._writer
        if writer is not None and (writer.busy or len(payload) >= LARGE_FRAME_BYTES):
            writer.add(frame_header(len(payload)), [payload])
            return
        self.transport.write(frame_header(len(payload)) + payload)  # type: ignore[union-attr]

    def open_stream(self, envelope: envelope_pb2.Envelope, stream_factory: Any) -> ScanStream:
        request_id = self._next_id
        self._next_id += 1
        envelope.request_id = request_id
        stream: ScanStream = stream_factory(request_id)
        if self.going_away is not None:
            stream._fail(self.going_away)
            return stream
        if not self.connected:
            stream._fail(self.not_connected())
            return stream
        self._streams[request_id] = stream
        self._write_envelope(envelope)
        return stream

    def _expired(self, request_id: int, timeout: float) -> None:
        item = self._pending.pop(request_id, None)
        if item is not None:
            late = RequestTimeout(f"no answer from {self.where} within {timeout:g} s")
            item.deferred.errback(Failure(late))

    def close(self, timeout: float | None = None) -> defer.Deferred[None]:
        """Close the connection; fires once it is closed.

        A TLS close waits for the peer; after ``timeout`` seconds (default: the client's timeout)
        the connection is dropped instead, so closing never hangs on a silent peer.
        """
        if self.connected:
            self.transport.loseConnection()  # type: ignore[union-attr]
            limit = self.timeout if timeout is None else timeout
            if limit is not None and not self._closed.called:
                call = self.clock.callLater(limit, self._close_expired, limit)

                def cancel(result: object) -> object:
                    if call.active():
                        call.cancel()
                    return result

                self._closed.addBoth(cancel)
        return self._closed

    def _close_expired(self, limit: float) -> None:
        self.abort(RequestTimeout(f"closing the connection to {self.where} took over {limit:g} s"))


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        if number:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


#: Where a SET's value bytes sit in an Envelope: (message, field) from the outside in.
_SET_DATA_PATH = (
    (envelope_pb2.Envelope, "query"),
    (aql_pb2.QueryRequest, "query"),
    (query_pb2.Query, "set"),
    (query_pb2.SetQuery, "value"),
    (types_pb2.CipherBlob, "data"),
)


def _value_tail(data: bytes) -> list[bytes]:
    """The encoding of an Envelope holding only a SET's value bytes ``data``, as pieces (the last
    is ``data`` itself, not copied).

    Sent right after the rest of the request in the same frame: protobuf parsers merge a message
    field that occurs twice, so the server reads one SET carrying ``data`` (the protobuf encoding
    rules: concatenated messages merge).
    """
    prefixes: list[bytes] = []
    length = len(data)
    for message, field in reversed(_SET_DATA_PATH):
        number = message.DESCRIPTOR.fields_by_name[field].number
        prefix = _varint(number << 3 | 2) + _varint(length)  # wire type 2: length-delimited
        prefixes.append(prefix)
        length += len(prefix)
    return [b"".join(reversed(prefixes)), data]


def _result(envelope: envelope_pb2.Envelope, field: str) -> Any:
    kind = envelope.WhichOneof("body")
    if kind != field:
        raise ProtocolError(f"expected a {field} answer, got {kind}")
    return getattr(envelope, field)


def _query_result(envelope: envelope_pb2.Envelope) -> query_pb2.QueryResult:
    response: aql_pb2.QueryResponse = _result(envelope, "query_response")
    if response.WhichOneof("response") == "error":
        raise error_from_proto(response.error)
    return response.result


def _query_done(envelope: envelope_pb2.Envelope) -> None:
    """A SET's answer: nothing, once it is known to be a success."""
    _query_result(envelope)


def _deleted(envelope: envelope_pb2.Envelope) -> bool:
    return bool(_query_result(envelope).success.affected_rows > 0)


class AmatersClient:
    """A connected, handshaken client.  Build it with :func:`connect`."""

    def __init__(
        self,
        protocol: AmatersClientProtocol,
        handshake: HandshakeInfo,
        cipher: AESGCMCipher | None = None,
        clock: Any = None,
    ) -> None:
        self._protocol = protocol
        self.handshake = handshake
        self.cipher = cipher
        self._clock = clock or protocol.clock
        self._keepalive_call: IDelayedCall | None = None
        self._keepalive_interval = 0.0

    # -- values -------------------------------------------------------------------------------

    def _seal(
        self, collection: str, key: bytes, value: bytes, compression: Compression = Compression.NONE
    ) -> types_pb2.CipherBlob:
        message = types_pb2.CipherBlob()
        self._seal_into(message, collection, key, value, compression)
        return message

    def _seal_into(
        self,
        out: types_pb2.CipherBlob,
        collection: str,
        key: bytes,
        value: bytes,
        compression: Compression = Compression.NONE,
    ) -> None:
        """Encrypt (with the client's cipher) and write the CipherBlob into ``out`` in place."""
        data = bytes(self.cipher.encrypt(value, collection, key) if self.cipher is not None else value)
        if compression == Compression.NONE:
            fill_blob(out, CipherBlob.wrap(data, created_at=int(time.time())))
            return
        stored = compress_blob_data(data, compression)
        fill_blob(out, CipherBlob(stored, crc32(stored), len(data), compression, created_at=int(time.time())))

    def _open_value(self, collection: str, key: bytes, blob: types_pb2.CipherBlob) -> bytes:
        data = blob.data
        stored_compression = int(blob.metadata.compression)
        if not stored_compression:  # the common case: no enum lookup on every read
            return self.cipher.decrypt(data, collection, key) if self.cipher is not None else data
        try:
            compression = Compression(stored_compression)
        except ValueError:
            raise InvalidValue(f"unknown value compression {stored_compression}") from None
        if compression != Compression.NONE:
            data = decompress_blob_data(data, compression, int(blob.metadata.size))
        if self.cipher is not None:
            return self.cipher.decrypt(data, collection, key)
        return data

    def _request(self, envelope: envelope_pb2.Envelope, timeout: float | None = None) -> defer.Deferred[Any]:
        return self._protocol.request(envelope, timeout)

    def _query(self, query: query_pb2.Query, timeout: float | None = None) -> defer.Deferred[Any]:
        d = self._request(Envelope(query=aql_pb2.QueryRequest(query=query)), timeout)
        d.addCallback(_query_result)
        return d

    # -- key-value ----------------------------------------------------------------------------

    def set(
        self,
        collection: str,
        key: KeyLike,
        value: bytes,
        *,
        timeout: float | None = None,
        compression: Literal["none", "lz4", "zstd"] = "none",
    ) -> defer.Deferred[None]:
        """Store ``value`` under ``key`` (replacing any previous value).

        ``compression`` compresses the stored bytes (after encryption, so only worth it for
        ciphertext that compresses; AES-GCM output does not: see docs/limits.md).
        """
        k = _key(key)
        # Built in place, level by level: nested keyword constructors copy every level again.
        envelope = Envelope()
        query = envelope.query.query.set
        query.collection = collection
        query.key.data = k
        try:
            kind = Compression[compression.upper()]
            if (
                kind == Compression.NONE
                and not self._protocol.frame_codec
                and len(value) >= LARGE_FRAME_BYTES
            ):
                # A large value goes out as it is, after the rest of the request: not copied into
                # the message, then into its encoding (each as large as the value).
                data = bytes(self.cipher.encrypt(value, collection, k) if self.cipher is not None else value)
                fill_blob(query.value, CipherBlob(b"", crc32(data), len(data), created_at=int(time.time())))
                d = self._protocol.request(envelope, timeout, tail=_value_tail(data))
                d.addCallback(_query_done)
                return d
            self._seal_into(query.value, collection, k, value, kind)
        except Exception:
            return defer.fail()
        d = self._request(envelope, timeout)
        d.addCallback(_query_done)
        return d

    def get_blob(
        self, collection: str, key: KeyLike, *, timeout: float | None = None
    ) -> defer.Deferred[CipherBlob | None]:
        """The stored CipherBlob (data exactly as stored, with its metadata), or None when missing."""
        d = self._query(
            query_pb2.Query(get=query_pb2.GetQuery(collection=collection, key=types_pb2.Key(data=_key(key)))),
            timeout,
        )

        def blob(result: query_pb2.QueryResult) -> CipherBlob | None:
            single = result.single
            return blob_from_proto(single.value) if single.HasField("value") else None

        d.addCallback(blob)
        return d

    def get(
        self, collection: str, key: KeyLike, *, timeout: float | None = None
    ) -> defer.Deferred[bytes | None]:
        """The value (decrypted with the client's cipher), or None when the key does not exist."""
        k = _key(key)
        envelope = Envelope()
        query = envelope.query.query.get
        query.collection = collection
        query.key.data = k
        d = self._request(envelope, timeout)

        def value(answer: envelope_pb2.Envelope) -> bytes | None:
            single = _query_result(answer).single
            if not single.HasField("value"):
                return None
            return self._open_value(collection, k, single.value)

        d.addCallback(value)
        return d

    def delete(self, collection: str, key: KeyLike, *, timeout: float | None = None) -> defer.Deferred[bool]:
        """Delete ``key``; True if it existed."""
        envelope = Envelope()
        query = envelope.query.query.delete
        query.collection = collection
        query.key.data = _key(key)
        d = self._request(envelope, timeout)
        d.addCallback(_deleted)
        return d

    def scan(
        self, collection: str, start: KeyLike = b"", end: KeyLike | None = None, limit: int | None = None
    ) -> ScanStream:
        """Stream ``[start, end)`` ascending (``end`` None: to the end) as chunks; see :class:`ScanStream`."""
        query = query_pb2.RangeQuery(collection=collection, start=types_pb2.Key(data=_key(start)))
        if end is not None:
            query.end.data = _key(end)
        if limit is not None:
            query.limit = limit
        envelope = Envelope(query=aql_pb2.QueryRequest(query=query_pb2.Query(range=query)))
        return self._protocol.open_stream(
            envelope, lambda request_id: ScanStream(self, request_id, collection)
        )

    def range(
        self, collection: str, start: KeyLike = b"", end: KeyLike | None = None, limit: int | None = None
    ) -> defer.Deferred[list[tuple[bytes, bytes]]]:
        """Every ``(key, value)`` in ``[start, end)`` ascending, at most ``limit``, as one list."""
        stream = self.scan(collection, start, end, limit)

        async def collect() -> list[tuple[bytes, bytes]]:
            found: list[tuple[bytes, bytes]] = []
            async for chunk in stream:
                found.extend(chunk)
            return found

        return defer.Deferred.fromCoroutine(collect())

    def batch(self, ops: Sequence[BatchOp], *, timeout: float | None = None) -> defer.Deferred[list[Any]]:
        """Apply GETs, SETs and DELETEs atomically.  Results per op: value or None, None, bool."""
        queries = []
        try:
            for op in ops:
                key = types_pb2.Key(data=op.key)
                if op.kind == "get":
                    queries.append(query_pb2.Query(get=query_pb2.GetQuery(collection=op.collection, key=key)))
                elif op.kind == "set":
                    blob = self._seal(op.collection, op.key, op.value or b"")
                    queries.append(
                        query_pb2.Query(set=query_pb2.SetQuery(collection=op.collection, key=key, value=blob))
                    )
                else:
                    queries.append(
                        query_pb2.Query(delete=query_pb2.DeleteQuery(collection=op.collection, key=key))
                    )
        except Exception:
            return defer.fail()
        d = self._request(Envelope(batch=aql_pb2.BatchRequest(queries=queries)), timeout)

        def results(envelope: envelope_pb2.Envelope) -> list[Any]:
            response: aql_pb2.BatchResponse = _result(envelope, "batch_response")
            if response.WhichOneof("response") == "error":
                raise error_from_proto(response.error)
            out: list[Any] = []
            for op, result in zip(ops, response.results.results, strict=False):
                if op.kind == "get":
                    single = result.single
                    out.append(
                        self._open_value(op.collection, op.key, single.value)
                        if single.HasField("value")
                        else None
                    )
                elif op.kind == "set":
                    out.append(None)
                else:
                    out.append(result.success.affected_rows > 0)
            return out

        d.addCallback(results)
        return d

    # -- collections and server ---------------------------------------------------------------

    # -- homomorphic FILTER and UPDATE (docs/fhe.md) ------------------------------------------

    #: Bytes of evaluation keys per upload frame.
    FHE_UPLOAD_CHUNK = 1024 * 1024
    #: Default client-side deadline of FILTER, UPDATE and key upload frames (they take minutes).
    FHE_TIMEOUT = 900.0

    def set_record(
        self, collection: str, key: KeyLike, keys: Any, record: Any, *, timeout: float | None = None
    ) -> defer.Deferred[None]:
        """Encrypt ``record`` (a dict of the schema's fields) with FHE ``keys`` and store it.

        Stored as the FHE record itself (never wrapped in the client's AES cipher), so the server
        can evaluate FILTER and UPDATE on it.
        """
        try:
            blob = CipherBlob.wrap(keys.encrypt(record))
        except Exception:
            return defer.fail()
        query = query_pb2.Query()
        s = query.set
        s.collection = collection
        s.key.data = _key(key)
        fill_blob(s.value, blob)
        d = self._query(query, timeout)
        d.addCallback(lambda _: None)
        return d

    def get_record(
        self, collection: str, key: KeyLike, keys: Any, *, timeout: float | None = None
    ) -> defer.Deferred[dict[str, int] | None]:
        """The decrypted record stored under ``key``, or None when missing."""
        d: defer.Deferred[Any] = self.get_blob(collection, key, timeout=timeout)
        d.addCallback(lambda blob: None if blob is None else keys.decrypt(blob.data))
        return d

    def upload_keys(self, keys: Any, *, timeout: float | None = None) -> defer.Deferred[bool]:
        """Upload the public evaluation keys of ``keys`` (never the secret key), in chunks.

        Fires True when the server stored them now, False when it already had them.
        """
        return defer.Deferred.fromCoroutine(self._upload_keys(keys, timeout))

    async def _upload_keys(self, keys: Any, timeout: float | None) -> bool:
        data = keys.evaluation_keys()
        total = len(data)
        step = self.FHE_UPLOAD_CHUNK
        offset = 0
        while True:
            part = data[offset : offset + step]
            last = offset + len(part) >= total
            envelope = Envelope()
            up = envelope.fhe_key_upload
            up.key_set_id = keys.key_set_id.hex()
            up.evaluator = keys.kind
            up.schema = str(keys.schema)
            up.specs_sha256 = keys.specs_sha256
            up.total_size = total
            up.offset = offset
            up.data = part
            up.last = last
            if last:
                up.warm_ciphertext = keys.warm_ciphertext()
            answer = await self._request(envelope, timeout if timeout is not None else self.FHE_TIMEOUT)
            response = _result(answer, "fhe_key_upload_response")
            if response.already_present:
                return False
            if last:
                return True
            offset += len(part)

    def filter_stream(
        self,
        collection: str,
        predicate: Any,
        *,
        keys: Any,
        limit: int | None = None,
        offset: int = 0,
    ) -> FilterStream:
        """Stream a FILTER: chunks of ``(key, encrypted record, encrypted boolean)`` as the server
        evaluates them (see :class:`FilterStream`); ``cancel()`` stops the server's evaluation
        within a chunk.  :meth:`filter` decrypts and collects them for you."""
        query = query_pb2.Query()
        f = query.filter
        f.collection = collection
        f.predicate.CopyFrom(keys.encrypt_predicate(predicate))
        f.key_set = keys.key_set_id.hex()
        if limit is not None:
            f.limit = limit
        if offset:
            f.offset = offset
        stream: FilterStream = self._protocol.open_stream(  # type: ignore[assignment]
            Envelope(query=aql_pb2.QueryRequest(query=query)),
            lambda request_id: FilterStream(self, request_id, collection),
        )
        return stream

    def filter(
        self,
        collection: str,
        predicate: Any,
        *,
        keys: Any,
        limit: int | None = None,
        offset: int = 0,
        timeout: float | None = None,
    ) -> defer.Deferred[list[tuple[bytes, dict[str, int]]]]:
        """The rows whose encrypted record satisfies ``predicate``, decrypted: ``[(key, record)]``.

        The server evaluates the predicate on every encrypted row of ``keys``'s key set and streams
        each with its encrypted boolean; this client decrypts the booleans and keeps the true rows.
        """
        try:
            stream = self.filter_stream(collection, predicate, keys=keys, limit=limit, offset=offset)
        except Exception:
            return defer.fail()

        async def rows() -> list[tuple[bytes, dict[str, int]]]:
            out = []
            chunk: Any
            async for chunk in stream:  # chunks arrive as the server evaluates them
                for key, record, flag in chunk:
                    if keys.decrypt_bool(flag):
                        out.append((key, keys.decrypt(record)))
            return out

        d = defer.Deferred.fromCoroutine(rows())
        after = timeout if timeout is not None else self.FHE_TIMEOUT
        d.addTimeout(after, self._clock, lambda result, seconds: self._filter_expired(stream, seconds))
        return d

    def _filter_expired(self, stream: FilterStream, after: float) -> None:
        stream.cancel().addErrback(lambda _: None)
        raise RequestTimeout(f"the FILTER did not finish within {after:g} s")

    def update(
        self,
        collection: str,
        predicate: Any,
        updates: Sequence[Any],
        *,
        keys: Any,
        timeout: float | None = None,
    ) -> defer.Deferred[int]:
        """Apply ``updates`` (``set_``, ``add``, ``mul``) to the rows ``predicate`` selects.

        Every encrypted row is rewritten as ``select(predicate, updated, old)``, so the server does
        not learn which changed; fires with the number of rows rewritten (rows deleted while the
        UPDATE ran are not; see docs/fhe.md, "UPDATE and concurrent writes").
        """
        try:
            query = query_pb2.Query()
            u = query.update
            u.collection = collection
            u.predicate.CopyFrom(keys.encrypt_predicate(predicate))
            u.updates.extend(keys.encrypt_updates(list(updates)))
            u.key_set = keys.key_set_id.hex()
        except Exception:
            return defer.fail()
        d = self._query(query, timeout if timeout is not None else self.FHE_TIMEOUT)
        d.addCallback(lambda result: int(result.success.affected_rows))
        return d

    def create_collection(self, name: str) -> defer.Deferred[bool]:
        """Create a collection; True if created, False if it already existed."""
        d = self._request(Envelope(create_collection=envelope_pb2.CreateCollectionRequest(name=name)))
        d.addCallback(lambda e: _result(e, "collection_response").changed)
        return d

    def drop_collection(self, name: str) -> defer.Deferred[bool]:
        """Drop a collection and everything in it; True if it existed."""
        d = self._request(Envelope(drop_collection=envelope_pb2.DropCollectionRequest(name=name)))
        d.addCallback(lambda e: _result(e, "collection_response").changed)
        return d

    def list_collections(self) -> defer.Deferred[list[str]]:
        d = self._request(Envelope(list_collections=envelope_pb2.ListCollectionsRequest()))
        d.addCallback(lambda e: list(_result(e, "collection_response").names))
        return d

    def server_info(self) -> defer.Deferred[ServerInfo]:
        d = self._request(Envelope(server_info=aql_pb2.ServerInfoRequest()))

        def info(envelope: envelope_pb2.Envelope) -> ServerInfo:
            r: aql_pb2.ServerInfoResponse = _result(envelope, "server_info_response")
            return ServerInfo(
                version_from_proto(r.version),
                tuple(version_from_proto(v) for v in r.supported_versions),
                tuple(r.capabilities),
                r.uptime_seconds,
            )

        d.addCallback(info)
        return d

    def health_check(self) -> defer.Deferred[tuple[bool, str]]:
        """(serving, message) as the server sees itself."""
        d = self._request(Envelope(health_check=aql_pb2.HealthCheckRequest()))

        def health(envelope: envelope_pb2.Envelope) -> tuple[bool, str]:
            r: aql_pb2.HealthCheckResponse = _result(envelope, "health_check_response")
            return r.status == aql_pb2.HEALTH_SERVING, r.message

        d.addCallback(health)
        return d

    def ping(self, payload: bytes = b"") -> defer.Deferred[float]:
        """Round trip; fires with the seconds it took."""
        started = self._clock.seconds()
        d = self._request(Envelope(ping=envelope_pb2.Ping(payload=payload)))
        d.addCallback(lambda e: (_result(e, "pong"), self._clock.seconds() - started)[1])
        return d

    def close(self, timeout: float | None = None) -> defer.Deferred[None]:
        """Close the connection; fires once it is closed.  Requests still pending fail.

        Bounded by ``timeout`` (default: the client's timeout): a peer that does not answer the
        TLS close has the connection dropped.
        """
        self.stop_keepalive()
        return self._protocol.close(timeout)

    def abort(self, reason: AmatersError | None = None) -> None:
        """Drop the connection now; pending requests fail with ``reason`` (default: a timeout)."""
        self.stop_keepalive()
        self._protocol.abort(reason or RequestTimeout(f"gave up on {self._protocol.where}"))

    # -- keep-alive ---------------------------------------------------------------------------

    def start_keepalive(self, interval: float) -> None:
        """PING whenever ``interval`` seconds pass without traffic, until the connection closes."""
        self.stop_keepalive()
        self._keepalive_interval = interval
        self._keepalive_call = self._clock.callLater(interval, self._keepalive_tick)
        self._protocol._closed.addBoth(self._keepalive_closed)

    def stop_keepalive(self) -> None:
        call, self._keepalive_call = self._keepalive_call, None
        if call is not None and call.active():
            call.cancel()

    def _keepalive_failed(self, failure: Failure) -> None:
        # The connection is going away (its own error reaches the caller's requests).
        AmatersClientProtocol._log.debug("Keep-alive ping failed: {error}", error=failure.value)

    def _keepalive_closed(self, result: object) -> object:
        self.stop_keepalive()
        return result

    def _keepalive_tick(self) -> None:
        self._keepalive_call = None
        protocol = self._protocol
        if not protocol.connected:
            return
        interval = self._keepalive_interval
        quiet = self._clock.seconds() - protocol.last_activity
        if quiet >= interval:
            d = self.ping()
            d.addErrback(self._keepalive_failed)
            quiet = 0.0
        self._keepalive_call = self._clock.callLater(max(interval - quiet, 0.001), self._keepalive_tick)

    @property
    def closed(self) -> bool:
        return not self._protocol.connected

    @property
    def session_token(self) -> str:
        """The newest revision per shard this connection has seen, as text (clustered mode; "" until
        then).  Pass it to :func:`connect` (``session_token=``) on another connection, to any node,
        and that connection reads data at least as new as this one's writes."""
        from amaters.cluster.session import format_token

        return format_token(self._protocol.revisions)

    def add_session_token(self, token: str) -> None:
        """Merge a session token from another connection (ValueError if it is malformed)."""
        from amaters.cluster.session import parse_token

        revisions = self._protocol.revisions
        for shard, revision in parse_token(token).items():
            if revision > revisions.get(shard, 0):
                revisions[shard] = revision


async def _handshake(
    protocol: AmatersClientProtocol,
    client_name: str,
    token: str | None,
    api_key: str | None,
    frame_compression: Sequence[str] = (),
) -> HandshakeInfo:
    credentials = envelope_pb2.Credentials()
    if token:
        credentials.bearer_token = token
    elif api_key:
        credentials.api_key = api_key
    envelope = Envelope(
        handshake=envelope_pb2.Handshake(
            version=version_to_proto(PROTOCOL_VERSION),
            client_name=client_name,
            credentials=credentials,
            supported_versions=[version_to_proto(v) for v in SUPPORTED_PROTOCOL_VERSIONS],
            frame_compression=list(frame_compression),
        )
    )
    response = await protocol.request(envelope)
    r: envelope_pb2.HandshakeResponse = _result(response, "handshake_response")
    if r.frame_compression:
        if r.frame_compression not in frame_compression:
            raise ProtocolError(f"the server chose frame compression {r.frame_compression!r}, not offered")
        protocol.frame_codec = r.frame_compression
        protocol.frame_threshold = r.frame_compression_threshold
    return HandshakeInfo(
        version_from_proto(r.version),
        tuple(version_from_proto(v) for v in r.supported_versions),
        tuple(r.capabilities),
        r.principal_name,
        tuple(r.roles),
        r.server_name,
        r.frame_compression,
    )


def connect(
    reactor: Any,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    ca_cert: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    token: str | None = None,
    api_key: str | None = None,
    plaintext: bool = False,
    timeout: float | None = 30.0,
    cipher: AESGCMCipher | None = None,
    client_name: str = CLIENT_NAME,
    frame_compression: Sequence[str] = (),
    keepalive: float | None = None,
    bind_address: str | None = None,
    session_token: str | None = None,
) -> defer.Deferred[AmatersClient]:
    """Connect, verify the server's certificate (for ``host``), handshake; fires with the client.

    ``ca_cert`` is the CA to trust (e.g. the server's generated ``<data_dir>/tls/ca.pem``); None
    trusts the platform's CA store.  ``plaintext=True`` skips TLS (only for a server with
    ``tls.enabled = false``).  ``timeout`` bounds connecting (TCP connect, TLS handshake and the
    protocol handshake together), each request, and :meth:`AmatersClient.close` (None: no limit).  ``frame_compression`` offers per-frame compression ("zstd", "lz4"; the
    server decides).  ``keepalive`` sends a PING after that many seconds without traffic, so the
    server's ``limits.idle_timeout`` does not close a connection kept for later use.
    ``bind_address`` is the local address to connect from (on hosts with several).
    ``session_token`` (clustered mode) is another connection's :attr:`AmatersClient.session_token`:
    reads on this connection see at least what that session wrote.
    """
    if session_token:
        from amaters.cluster.session import parse_token

        try:
            parse_token(session_token)
        except ValueError as e:
            return defer.fail(InvalidValue(str(e)))
    return defer.Deferred.fromCoroutine(
        _connect(
            reactor,
            host,
            port,
            ca_cert,
            client_cert,
            client_key,
            token,
            api_key,
            plaintext,
            timeout,
            cipher,
            client_name,
            tuple(frame_compression),
            keepalive,
            bind_address,
            session_token,
        )
    )


async def _connect(
    reactor: Any,
    host: str,
    port: int,
    ca_cert: str | None,
    client_cert: str | None,
    client_key: str | None,
    token: str | None,
    api_key: str | None,
    plaintext: bool,
    timeout: float | None,
    cipher: AESGCMCipher | None,
    client_name: str,
    frame_compression: Sequence[str] = (),
    keepalive: float | None = None,
    bind_address: str | None = None,
    session_token: str | None = None,
) -> AmatersClient:
    where = f"{host}:{port}"
    bind = (bind_address, 0) if bind_address else None
    endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=timeout or 30, bindAddress=bind)
    if not plaintext:
        try:
            options = client_tls_options(host, ca_cert, client_cert=client_cert, client_key=client_key)
        except OSError as e:
            raise NetworkError(
                f"cannot read TLS files: {e.strerror or e}: {e.filename}",
                code=ErrorCode.NETWORK_TLS_HANDSHAKE,
            ) from None
        except AmatersError as e:
            # e.g. a --ca that holds no certificate: a problem of this client's TLS files.
            raise NetworkError(
                f"cannot load TLS files: {e.message}", code=ErrorCode.NETWORK_TLS_HANDSHAKE
            ) from None
        except Exception as e:
            raise NetworkError(f"cannot load TLS files: {e}", code=ErrorCode.NETWORK_TLS_HANDSHAKE) from None
        endpoint = wrapClientTLS(options, endpoint)
    protocol = AmatersClientProtocol(reactor, timeout, where)
    connecting = connectProtocol(endpoint, protocol)
    expired: list[AmatersError] = []

    def expire() -> None:
        # One deadline for TCP connect, TLS handshake and the protocol handshake.
        if protocol.connected:
            if plaintext or protocol.tls_established:
                phase = "the server did not answer the handshake"
            else:
                phase = "the TLS handshake did not complete"
            expired.append(RequestTimeout(f"connecting to {where} timed out after {timeout:g} s: {phase}"))
            protocol.abort(expired[0])
        else:
            expired.append(RequestTimeout(f"connecting to {where} timed out after {timeout:g} s"))
            connecting.cancel()

    deadline = reactor.callLater(timeout, expire) if timeout else None
    try:
        try:
            await connecting
        except Exception:
            if expired:
                raise expired[0] from None
            raise _connection_error(Failure(), where) from None
        try:
            handshake = await _handshake(protocol, client_name, token, api_key, frame_compression)
        except BaseException:
            await protocol.close()
            if expired:
                raise expired[0] from None
            raise
    finally:
        if deadline is not None and deadline.active():
            deadline.cancel()
    client = AmatersClient(protocol, handshake, cipher, reactor)
    if session_token:
        client.add_session_token(session_token)
    if keepalive:
        client.start_keepalive(keepalive)
    return client


def batch_ops(items: Iterable[tuple[str, str, KeyLike, bytes | None]]) -> list[BatchOp]:
    """Build BatchOps from ``(kind, collection, key, value)`` tuples."""
    out = []
    for kind, collection, key, value in items:
        if kind == "set":
            out.append(BatchOp.set(collection, key, value or b""))
        elif kind == "get":
            out.append(BatchOp.get(collection, key))
        elif kind == "delete":
            out.append(BatchOp.delete(collection, key))
        else:
            raise ValueError(f"unknown batch operation {kind!r}")
    return out


__all__ = [
    "DEFAULT_PORT",
    "AmatersClient",
    "AmatersClientProtocol",
    "BatchOp",
    "HandshakeInfo",
    "ScanStream",
    "ServerInfo",
    "batch_ops",
    "connect",
]


# -- several nodes --------------------------------------------------------------------------------

#: Errors that say the node (not the request) is the problem: another node may serve the request.
_NODE_FAILURES = (
    ErrorCode.NETWORK_CONNECTION_REFUSED,
    ErrorCode.NETWORK_CONNECTION_RESET,
    ErrorCode.NETWORK_TIMEOUT,
    ErrorCode.NETWORK_DNS_FAILED,
    ErrorCode.NETWORK_TLS_HANDSHAKE,
    ErrorCode.SERVER_SHUTTING_DOWN,
)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"node address {text!r} is not host:port")
    return host.strip("[]"), int(port)


class ClusterClient:
    """A client of several amaters nodes in front of the same data (clustered mode).

    Requests go to one node at a time.  When that node cannot be reached or goes away, the client
    connects to the next one.  A read that failed that way is sent again to the next node; a write
    is not (the first node may have applied it): it fails with its retryable error and the caller
    decides.  Build it with :func:`connect_cluster`.
    """

    def __init__(self, reactor: Any, addresses: Sequence[str], connect_options: dict[str, Any]) -> None:
        if not addresses:
            raise ValueError("a cluster client needs at least one node address")
        self.addresses = [_address(a) for a in addresses]
        self._reactor = reactor
        self._options = connect_options
        self._current = 0
        self._client: AmatersClient | None = None
        self._token = str(connect_options.pop("session_token", None) or "")

    @property
    def session_token(self) -> str:
        """The session's newest revision per shard, kept across nodes (see AmatersClient)."""
        if self._client is not None:
            self._client.add_session_token(self._token)
            self._token = self._client.session_token
        return self._token

    @property
    def current_address(self) -> str:
        host, port = self.addresses[self._current]
        return f"{host}:{port}"

    async def _connected(self) -> AmatersClient:
        client = self._client
        if client is not None and not client.closed:
            return client
        last: AmatersError | None = None
        token = self.session_token
        for _ in range(len(self.addresses)):
            host, port = self.addresses[self._current]
            try:
                self._client = await connect(self._reactor, host, port, session_token=token, **self._options)
                return self._client
            except AmatersError as e:
                if e.code not in _NODE_FAILURES:
                    raise
                last = e
                self._current = (self._current + 1) % len(self.addresses)
        assert last is not None
        raise last

    def _node_failed(self) -> None:
        self._token = self.session_token
        client, self._client = self._client, None
        self._current = (self._current + 1) % len(self.addresses)
        if client is not None and not client.closed:
            d = client.close()
            d.addErrback(lambda f: None)

    async def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], *, read: bool) -> Any:
        attempts = len(self.addresses) if read else 1
        for attempt in range(attempts):
            client = await self._connected()
            try:
                return await getattr(client, method)(*args, **kwargs)
            except AmatersError as e:
                if e.code not in _NODE_FAILURES:
                    raise
                self._node_failed()
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def get(self, collection: str, key: KeyLike, **kwargs: Any) -> defer.Deferred[bytes | None]:
        """Like :meth:`AmatersClient.get`; sent to the next node if this one fails."""
        return defer.Deferred.fromCoroutine(self._call("get", (collection, key), kwargs, read=True))

    def set(self, collection: str, key: KeyLike, value: bytes, **kwargs: Any) -> defer.Deferred[None]:
        """Like :meth:`AmatersClient.set`; not sent again if the node fails (see the class doc)."""
        return defer.Deferred.fromCoroutine(self._call("set", (collection, key, value), kwargs, read=False))

    def delete(self, collection: str, key: KeyLike, **kwargs: Any) -> defer.Deferred[bool]:
        """Like :meth:`AmatersClient.delete` (a write)."""
        return defer.Deferred.fromCoroutine(self._call("delete", (collection, key), kwargs, read=False))

    def range(self, collection: str, *args: Any, **kwargs: Any) -> defer.Deferred[list[tuple[bytes, bytes]]]:
        """Like :meth:`AmatersClient.range`; sent to the next node if this one fails."""
        return defer.Deferred.fromCoroutine(self._call("range", (collection, *args), kwargs, read=True))

    def batch(self, ops: Sequence[BatchOp], **kwargs: Any) -> defer.Deferred[list[Any]]:
        """Like :meth:`AmatersClient.batch` (a write when it holds one)."""
        read = all(op.kind == "get" for op in ops)
        return defer.Deferred.fromCoroutine(self._call("batch", (ops,), kwargs, read=read))

    def create_collection(self, name: str) -> defer.Deferred[bool]:
        return defer.Deferred.fromCoroutine(self._call("create_collection", (name,), {}, read=False))

    def list_collections(self) -> defer.Deferred[list[str]]:
        return defer.Deferred.fromCoroutine(self._call("list_collections", (), {}, read=True))

    def close(self) -> defer.Deferred[None]:
        """Close the connection to the current node."""
        client, self._client = self._client, None
        if client is None:
            return defer.succeed(None)
        return client.close()


def connect_cluster(reactor: Any, addresses: Sequence[str], **options: Any) -> defer.Deferred[ClusterClient]:
    """Connect to the first reachable node of ``addresses`` (``host:port`` each); fires with a
    :class:`ClusterClient`.  ``options`` are :func:`connect`'s (``ca_cert``, ``plaintext``, ...)."""

    async def start() -> ClusterClient:
        cluster = ClusterClient(reactor, addresses, options)
        await cluster._connected()
        return cluster

    return defer.Deferred.fromCoroutine(start())
