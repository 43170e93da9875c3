"""The native protocol server: one :class:`AmatersServerProtocol` per connection, its factory, and
the ``listener`` service that binds it (TLS by default) and drains it on stop.

A connection's life (``docs/protocol.md`` has the wire details):

1. The first frame must be a ``Handshake``.  A different major protocol version gets
   ``PROTOCOL_UNSUPPORTED_VERSION`` and the connection closes; otherwise the credentials go to the
   ``authenticate`` hook, and the answer carries the server's versions, capabilities and the
   principal.  No handshake within ``limits.handshake_timeout``: an error frame, then close.
2. Requests may be pipelined; each is answered with its request id, in completion order.  With
   ``limits.max_inflight_per_connection`` requests unanswered the connection stops reading; it
   resumes as answers go out.  It also stops reading while the transport's write buffer is full
   (a client that does not read its answers cannot make the server buffer without bound).
3. RANGE answers stream as ``StreamBatch`` frames then one ``StreamEnd``; the next chunk is read
   from storage only while the transport accepts writes; ``CancelStream`` ends a stream early.
4. A bad request gets an error answer and the connection stays open; only protocol violations
   (no handshake first, an oversize frame) close it.  A frame that is not a valid Envelope gets
   ``PROTOCOL_MALFORMED_MESSAGE`` with request id 0 and the connection stays usable.
5. On shutdown the listener stops accepting, new requests get ``SERVER_SHUTTING_DOWN``, requests
   in flight finish, and connections close, all within ``server.shutdown_timeout``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import attrs
from google.protobuf.message import DecodeError
from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IPushProducer,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from amaters import PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS, __version__
from amaters.auth.principal import (
    ANONYMOUS,
    Authenticator,
    Credentials,
    Principal,
    default_authenticator,
)
from amaters.errors import (
    AmatersError,
    AuthError,
    MalformedMessage,
    Overloaded,
    ProtocolError,
    RequestTimeout,
    ServerError,
    ShuttingDown,
    SizeExceeded,
    Unavailable,
    UnsupportedVersion,
)
from amaters.fdlimit import raise_open_file_limit
from amaters.interfaces import IPrincipal, IRangeCursor, IReadScope
from amaters.protect.compression import compress_frame, decompress_frame
from amaters.proto import aql_pb2, envelope_pb2
from amaters.proto.answers import query_answer
from amaters.proto.convert import (
    error_to_proto,
    fill_blob,
    fill_key_values,
    fill_result,
    version_from_proto,
    version_to_proto,
)
from amaters.protocols.budget import ReceiveBudget
from amaters.protocols.framing import HEADER_SIZE, FrameReceiver, frame_header
from amaters.protocols.keyed import (
    answer_cached_gets,
    run_lone,
    set_answer_frame,
    set_answer_frames,
    take_keyed_frames,
)
from amaters.protocols.transport import EagerWriteServer, send_eagerly, tcp_transport
from amaters.protocols.wirecheck import TooManyElements, count_elements
from amaters.query import operations as ops
from amaters.query.executor import CAPABILITIES
from amaters.query.pipeline import QueryPipeline, RequestContext
from amaters.tls.certs import ensure_server_tls
from amaters.tls.context import BatchedWritesTLSFactory, ReloadableServerTLS, server_tls_options

if TYPE_CHECKING:
    from amaters.config import Config, LimitsConfig

Envelope = envelope_pb2.Envelope


# -- sessions ------------------------------------------------------------------------------------


@attrs.define
class Session:
    """Per-connection state after a successful handshake."""

    principal: IPrincipal
    client_name: str
    version: tuple[int, int, int]
    credentials: Credentials | None = None
    peer_certificate: Any = None
    #: W3C trace context the handshake carried (parents the spans of requests that carry none).
    trace_context: dict[str, str] | None = None
    #: The cred logout of the principal (called once, when the connection ends).
    logout: Callable[[], None] | None = None

    def end(self) -> None:
        """Log the principal out (once)."""
        logout, self.logout = self.logout, None
        if logout is not None:
            logout()


def _peer_certificate_chain(transport: Any) -> Any:
    """The client's certificate as the authenticator gets it: None, the leaf, or the leaf followed
    by the chain OpenSSL verified it with (so intermediates the client sent can be checked again)."""
    leaf = transport.getPeerCertificate()
    if leaf is None:
        return None
    handle: Any = transport.getHandle() if hasattr(transport, "getHandle") else None
    chain = handle.get_verified_chain() if hasattr(handle, "get_verified_chain") else None
    return [leaf, *chain[1:]] if chain else leaf


# -- the protocol --------------------------------------------------------------------------------

_HANDSHAKE, _AUTHENTICATING, _READY, _CLOSING = "handshake", "authenticating", "ready", "closing"

#: Answers batched during a run of frame deliveries are written once they reach this size.
_OUT_BATCH_BYTES = 256 * 1024


@implementer(IPushProducer)
class _WriteFlow:
    """Registered with the transport: learns when its write buffer is full and drained again."""

    def __init__(self, protocol: AmatersServerProtocol) -> None:
        self.protocol = protocol

    def pauseProducing(self) -> None:
        self.protocol._write_paused(True)

    def resumeProducing(self) -> None:
        self.protocol._write_paused(False)

    def stopProducing(self) -> None:
        pass


class _RangeStream:
    """One RANGE answer in progress: reads a chunk ahead so the last batch says has_more=False."""

    __slots__ = (
        "cancelled",
        "ctx",
        "cursor",
        "done",
        "held",
        "protocol",
        "pumping",
        "reading",
        "request_id",
        "sent",
        "sequence",
    )

    def __init__(self, protocol: AmatersServerProtocol, request_id: int, ctx: RequestContext) -> None:
        self.protocol = protocol
        self.request_id = request_id
        self.ctx = ctx
        self.cursor: Any = None  # an IRangeCursor once the range is open
        self.held: list[Any] | None = None
        self.sent = 0
        self.sequence = 0
        self.cancelled = False
        self.done = False
        self.pumping = False
        self.reading = False

    def start(self, cursor: IRangeCursor) -> None:
        self.cursor = cursor
        self.pump()

    def pump(self) -> None:
        """Read and send chunks while the transport accepts writes."""
        if self.pumping or self.reading or self.done or self.cursor is None:
            return
        self.pumping = True
        try:
            while not self.done:
                if self.cancelled:
                    self._end()
                    return
                if self.protocol._write_blocked:
                    return  # resumed by the protocol when the transport drains
                self.reading = True
                d = self.cursor.next_chunk()
                d.addCallbacks(self._chunk, self._failed)
                if self.reading:
                    return  # not ready yet: _chunk continues the pump
        finally:
            self.pumping = False

    def _chunk(self, chunk: list[Any]) -> None:
        self.reading = False
        if self.done:
            return
        if self.cancelled:
            self._end()
            return
        if not chunk:
            if self.held:
                self._send_batch(self.held, False)
            self.held = None
            self._end()
            return
        if self.held:
            self._send_batch(self.held, True)
        self.held = list(chunk)
        if not self.pumping:
            self.pump()

    def _failed(self, failure: Failure) -> None:
        self.reading = False
        if self.done:
            return
        error = self.protocol._as_amaters_error(failure, "range")
        self.protocol._send(
            Envelope(
                request_id=self.request_id,
                stream=aql_pb2.StreamResponse(error=error_to_proto(error), sequence=self.sequence),
            )
        )
        self._finish()

    def _send_batch(self, chunk: list[Any], has_more: bool) -> None:
        envelope = Envelope(request_id=self.request_id)
        stream = envelope.stream
        stream.sequence = self.sequence
        batch = stream.batch
        fill_key_values(batch.values, chunk)
        batch.has_more = has_more
        self.protocol._send(envelope)
        self.sequence += 1
        self.sent += len(chunk)

    def _end(self) -> None:
        self.protocol._send(
            Envelope(
                request_id=self.request_id,
                stream=aql_pb2.StreamResponse(
                    end=aql_pb2.StreamEnd(total_count=self.sent), sequence=self.sequence
                ),
            )
        )
        self._finish()

    def _finish(self) -> None:
        self.done = True
        self.held = None
        if self.cursor is not None:
            self.cursor.close()
        self.protocol._stream_finished(self)

    def abandon(self) -> None:
        """The connection is gone: release the cursor, send nothing."""
        self.done = True
        self.held = None
        if self.cursor is not None:
            self.cursor.close()


@implementer(IHandshakeListener, IReadScope)
class AmatersServerProtocol(FrameReceiver):
    """One client connection of the native protocol."""

    _log = Logger()
    factory: AmatersServerFactory
    #: Connection and byte counting (amaters.ops.observability sets it on each connection): an
    #: object with ``opened()`` and ``closed()``, and ``received`` and ``sent`` byte counts the
    #: protocol adds to itself, so that no wrapper layer sits in the data path.  None: nothing
    #: counted.
    _meter: Any = None

    def __init__(self) -> None:
        self._state = _HANDSHAKE
        self.session: Session | None = None
        self._inflight = 0
        self._reading_paused = False
        self._write_blocked = False
        self._out: list[bytes] | None = None
        self._out_size = 0
        self._streams: dict[int, _RangeStream] = {}
        #: Requests in flight with a timeout: request id -> (deadline, what, timeout), watched by
        #: one timer per connection (``_deadline_timer``) rather than one per request.
        self._deadlines: dict[int, tuple[float, str, float]] = {}
        self._deadline_timer: IDelayedCall | None = None
        self._timed_out: set[int] = set()
        self._handshake_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._last_activity = 0.0
        self._source = ""
        self._flow: _WriteFlow | None = None
        self._lost = False
        # Protection (docs/limits.md): bytes seen at all, the frame and close deadlines, answers
        # held while the transport's buffer is full, and the negotiated per-frame compression.
        self._received_any = False
        self._frames_seen = 0
        self._frame_timer: IDelayedCall | None = None
        self._close_timer: IDelayedCall | None = None
        self._held: collections.deque[bytes] = collections.deque()
        self._held_bytes = 0
        #: Bytes handed to the transport since it last reported its buffer drained, or (on an
        #: eager-write transport) since a write left nothing queued.
        self._sent_since_drain = 0
        self._tcp: EagerWriteServer | None = None
        #: Whether the TLS handshake under the connection has finished (IHandshakeListener).
        self._tls_done = False
        self._dropped = False
        self._offered_compression: list[str] = []
        self._frame_codec = ""
        self._frame_threshold = 0
        # The trace context of the request being dispatched (Envelope.trace_context), for _context.
        self._trace_context: dict[str, str] | None = None
        # Bytes held in the receive buffers as last charged to the factory's ReceiveBudget, and
        # whether they count as unauthenticated (until the handshake succeeds).
        self._charged = 0
        self._prelogin = True
        # Clustered mode: the revision scope of each request in flight, until its first answer.
        self._revision_scopes: dict[int, Any] = {}
        # Requests of the current read answered at once, whose pipeline afters run together at the
        # end of the read (framesDelivered; QueryPipeline.settle).  While other connections are
        # open, a read's only request is settled at the end of the reactor turn instead, with
        # theirs (the factory's ``answered``).
        self._finished: list[Any] = []
        # Whether the frame being handled is the only one its read brought.
        self._frame_alone = False
        # GET, SET and DELETE requests of the current read not run yet: they go through the
        # pipeline together (QueryPipeline.admit_many, then run_admitted) before any other frame
        # is handled, or at the end of the read.  At most ``_batch_room`` of them (the in-flight limit's room).
        self._batch: list[tuple[RequestContext, Any]] = []
        self._batch_room = 0
        # Requests of a batch not answered yet because the transport pushed back mid-batch, in
        # order: ``(ctx, op, None)`` admitted by the stages and still to run, or ``(ctx, op,
        # (done, outcome))`` already decided.  Nothing else is read or handled until they are
        # done (when the transport drains), and then ``_pushed_back``: the handling of the frame
        # that was being handled when they were set aside.
        self._admitted: collections.deque[tuple[RequestContext, Any, Any]] = collections.deque()
        self._pushed_back: Callable[[], None] | None = None
        # Inside a read that TLS hands over record by record (IReadScope): the records so far,
        # handled as one read at its end.
        self._read_pieces: list[bytes] | None = None

    # -- connection lifecycle -----------------------------------------------------------------

    def connectionMade(self) -> None:
        if self._meter is not None:
            self._meter.opened()
        factory = self.factory
        # Until the handshake succeeds only a handshake-sized frame is accepted.
        self.MAX_LENGTH = factory.limits.max_handshake_frame_bytes
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        host = getattr(peer, "host", None)
        self._source = f"{host}:{getattr(peer, 'port', '')}" if host else str(peer)
        factory.connection_made(self)
        self._tcp = tcp_transport(self.transport)
        clock = factory.clock
        self._last_activity = clock.seconds()
        self._handshake_timer = clock.callLater(factory.limits.handshake_timeout, self._handshake_expired)
        self._flow = _WriteFlow(self)
        self.transport.registerProducer(self._flow, True)  # type: ignore[union-attr]
        if factory.draining:
            self._refuse_and_close(0, ShuttingDown("the server is shutting down"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._meter is not None:
            self._meter.closed()
        self._lost = True
        self._state = _CLOSING
        for timer in (
            self._handshake_timer,
            self._idle_timer,
            self._frame_timer,
            self._close_timer,
            self._deadline_timer,
        ):
            if timer is not None and timer.active():
                timer.cancel()
        self._held.clear()
        self._held_bytes = 0
        self.discardInput()
        self._pushed_back = None
        if self._admitted:
            admitted, self._admitted = self._admitted, collections.deque()
            gone = Unavailable("the connection was closed before the request ran")
            for ctx, op, decided in admitted:
                if decided is None:
                    self.factory.pipeline.abandon(ctx, op, gone)
        self._recharge()
        self._deadlines.clear()
        self._deadline_timer = None
        for stream in list(self._streams.values()):
            stream.abandon()
        self._streams.clear()
        self._inflight = 0
        if self.session is not None:
            try:
                self.session.end()
            except Exception:
                self._log.failure("Logging out {source} failed", source=self._source)
        self.factory.connection_lost(self)

    def _close(self) -> None:
        """Flush what was written, then close (TLS close_notify included)."""
        if self._lost:
            return
        self._state = _CLOSING
        self._flush_out()
        transport: Any = self.transport
        if self._flow is not None:
            self._flow = None
            transport.unregisterProducer()
        # Nothing more is handled: drop what is buffered, and read again (if reading was paused) so
        # that the peer's close, and TLS's close_notify, are seen.
        self.discardInput()
        self._recharge()
        if self._reading_paused:
            self._reading_paused = False
            transport.resumeProducing()
        held, self._held = self._held, collections.deque()
        self._held_bytes = 0
        for data in held:
            self._transport_write(data)  # bounded by limits.max_buffered_response_bytes
        if self._close_timer is None:
            # A peer that does not read would keep a closing connection open forever.
            self._close_timer = self.factory.clock.callLater(
                self.factory.limits.close_timeout, self._close_expired
            )
        transport.loseConnection()

    def _close_expired(self) -> None:
        self._close_timer = None
        if not self._lost:
            self._log.info("Cutting connection from {source}: it did not close in time", source=self._source)
            self.abort()

    def abort(self) -> None:
        """Drop the connection now (used when a drain runs out of time)."""
        if not self._lost:
            self.transport.abortConnection()  # type: ignore[union-attr]

    # -- timers -------------------------------------------------------------------------------

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        tls_pending = ISSLTransport.providedBy(self.transport) and not self._tls_done
        if self._state in (_HANDSHAKE, _AUTHENTICATING) and not self._received_any and tls_pending:
            # The TLS handshake itself has not finished (slowloris): nothing can be sent; cut it.
            self._log.info(
                "Dropping connection from {source}: no handshake within {timeout} s",
                source=self._source,
                timeout=self.factory.limits.handshake_timeout,
            )
            self._state = _CLOSING
            self.abort()
            return
        if self._state in (_HANDSHAKE, _AUTHENTICATING):
            self._refuse_and_close(
                0,
                RequestTimeout(f"no handshake within {self.factory.limits.handshake_timeout:g} s; closing"),
            )

    def _schedule_idle(self) -> None:
        idle = self.factory.limits.idle_timeout
        if idle > 0 and not self._lost:
            self._idle_timer = self.factory.clock.callLater(idle, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        idle = self.factory.limits.idle_timeout
        if idle <= 0 or self._lost:
            return
        clock = self.factory.clock
        quiet = clock.seconds() - self._last_activity
        if quiet >= idle and self._inflight == 0:
            self._log.debug("Closing idle connection from {source}", source=self._source)
            self._close()
            return
        wait = idle - quiet if quiet < idle else idle
        self._idle_timer = clock.callLater(wait, self._idle_check)

    # -- frames in ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        pieces = self._read_pieces
        if pieces is not None:
            pieces.append(data)
            return
        meter = self._meter
        if meter is not None:
            meter.received += len(data)
        self._last_activity = self.factory.clock.seconds()
        self._received_any = True
        super().dataReceived(data)
        self._recharge()
        # ``bufferedBytes`` and ``framesPaused`` read directly: this runs for every read.
        if (self._rx or self._rx_chunks is not None) and not self._frames_paused:
            if self._frame_timer is None and not self._lost and self._state is not _CLOSING:
                self._start_frame_timer()
        elif self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None

    def _recharge(self) -> None:
        """Charge the bytes now held in the receive buffers to the factory's budget; past a limit,
        refuse the connection and drop its buffer (docs/limits.md, memory budget)."""
        chunks = self._rx_chunks
        held = len(self._rx) + (self._rx_chunks_size if chunks is not None else 0)
        delta = held - self._charged
        if not delta:
            return
        self._charged = held
        budget = self.factory.budget
        authenticated = not self._prelogin
        budget.charge(delta, authenticated)
        if delta > 0:
            setting = budget.over(authenticated)
            if setting is not None:
                self._over_budget(setting)

    def _over_budget(self, setting: str) -> None:
        budget = self.factory.budget
        budget.refused += 1
        self._log.warn(
            "Closing connection from {source}: {setting} is used up ({total} bytes buffered by all"
            " connections, {unauthenticated} before login)",
            source=self._source,
            setting=setting,
            total=budget.total,
            unauthenticated=budget.unauthenticated,
        )
        self.discardInput()
        self._recharge()
        self._refuse_and_close(
            0,
            Overloaded(
                f"the server's memory for requests being received is used up ({setting}); retry later",
                retry_after_ms=1000,
            ),
        )

    def _start_frame_timer(self) -> None:
        timeout = self.factory.limits.frame_timeout
        if timeout > 0:
            self._frame_timer = self.factory.clock.callLater(
                timeout, self._frame_expired, self._frames_seen, timeout
            )

    def _frame_expired(self, seen: int, timeout: float) -> None:
        self._frame_timer = None
        if self._lost or self._state is _CLOSING or self.framesPaused or not self.bufferedBytes:
            return
        if self._frames_seen != seen:
            self._start_frame_timer()  # frames are arriving; this is a new one
            return
        self._log.info(
            "Closing connection from {source}: a frame did not arrive within {timeout} s",
            source=self._source,
            timeout=timeout,
        )
        self._refuse_and_close(
            0, RequestTimeout(f"a frame did not arrive completely within {timeout:g} s; closing")
        )

    def stringReceived(self, frame: bytes) -> None:
        if self._state is _CLOSING:
            return
        self._frames_seen += 1
        # During a delivery ``_rx`` is the whole read (FrameReceiver._deliver).
        self._frame_alone = len(self._rx) == len(frame) + HEADER_SIZE
        if self._out is None:
            self._out = []
        factory = self.factory
        if self._state is _READY and not factory.draining and not factory.session_revisions:
            # A GET, SET or DELETE read from the frame's bytes (the commonest requests; anything
            # else, or anything the rules refuse, is parsed below as before).
            read = factory.pipeline.validator.keyed_frame(frame)
            if read is not None:
                self._trace_context = None
                request_id, op = read
                try:
                    batch = self._batch
                    if batch:
                        # A later request of a read whose first one started a batch: it joins
                        # (``_on_operation``'s first case, without the call).
                        batch.append((self._context(request_id), op))
                        if len(batch) >= self._batch_room:
                            self._run_batch()
                    elif self._frame_alone and self._delivering and not self._revision_scopes:
                        # Alone in its read: run, and answered, in one call (``_on_operation``'s
                        # last case, without the calls).
                        ctx = self._context(request_id)
                        done, outcome, size = run_lone(
                            factory.pipeline,
                            ctx,
                            op,
                            self._finished,
                            self._out,
                            _OUT_BATCH_BYTES - self._out_size,
                            self._frame_threshold if self._frame_codec else -1,
                        )
                        if size < 0:
                            self._ran(request_id, ctx, op, done, outcome)
                        else:
                            self._out_size += size  # queued, as ``_queue`` does
                    else:
                        self._on_operation(request_id, op)
                except Exception:
                    self._send_error(request_id, self._as_amaters_error(Failure(), "query"))
                return
        envelope = Envelope()
        if len(frame) > 2 * factory.limits.max_frame_elements and not self._parse_cost_ok(frame):
            return
        try:
            envelope.ParseFromString(frame)
        except DecodeError:
            if self._batch:
                self._run_batch()
            self._send_error(0, MalformedMessage("the frame is not a valid Envelope message"))
            return
        kind = envelope.WhichOneof("body")
        if kind != "query":
            # Anything else sees the effects of the queries before it, and is answered after them.
            if self._batch and not self._run_batch():
                self._pushed_back = partial(self.stringReceived, frame)
                return
            if kind == "compressed":
                inner = self._uncompress(envelope)
                if inner is None:
                    return
                envelope = inner
                kind = envelope.WhichOneof("body")
        request_id = envelope.request_id
        if self._state is not _READY:
            self._before_ready(request_id, kind, envelope)
            return
        handler = _HANDLERS.get(kind)
        if handler is None:
            self._send_error(request_id, _unknown_request(kind))
            return
        if factory.draining:
            self._send_error(request_id, ShuttingDown("the server is shutting down; retry on another server"))
            return
        if factory.pipeline.reads_trace_context:
            # Decoding the map costs about 0.15 µs even when it is empty: only when a stage uses it.
            trace_context = envelope.trace_context
            self._trace_context = dict(trace_context) if trace_context else None
        else:
            self._trace_context = None
        if factory.session_revisions:
            self._handle_with_revisions(handler, request_id, kind, envelope)
            return
        try:
            handler(self, request_id, getattr(envelope, kind))
        except Exception:
            error = self._as_amaters_error(Failure(), kind or "request")
            self._send_error(request_id, error)

    def _parse_cost_ok(self, payload: bytes) -> bool:
        """Whether ``payload`` holds few enough fields to parse (else MALFORMED_MESSAGE is answered)."""
        if self._batch:
            self._run_batch()
        limit = self.factory.limits.max_frame_elements
        try:
            count_elements(payload, Envelope.DESCRIPTOR, limit)
        except TooManyElements as e:
            self._log.info(
                "Refused a frame of {size} bytes from {source}: {reason}",
                size=len(payload),
                source=self._source,
                reason=str(e),
            )
            self._send_error(
                0, MalformedMessage(f"the frame is too costly to parse: {e} (limits.max_frame_elements)")
            )
            return False
        return True

    def _handle_with_revisions(self, handler: Any, request_id: int, kind: Any, envelope: Any) -> None:
        """Run a request under a revision scope (clustered mode): its answer reports the revisions
        it saw; reads wait for the revisions the client sent."""
        from amaters.cluster import session

        scope = session.RevisionScope(envelope.revisions)
        self._revision_scopes[request_id] = scope
        token = session.enter(scope)
        try:
            handler(self, request_id, getattr(envelope, kind))
        except Exception:
            error = self._as_amaters_error(Failure(), kind or "request")
            self._send_error(request_id, error)
        finally:
            session.leave(token)

    def readStarted(self) -> None:
        self._read_pieces = []

    def readFinished(self) -> None:
        # The read's records are handled as the one read they came in: one pass of the framing,
        # one settling of the afters, one write of the answers.  No reactor turn happened since
        # readStarted, and a read is at most the transport's buffer size.  A connection lost
        # meanwhile ignores them, as it ignores any later read.
        pieces, self._read_pieces = self._read_pieces, None
        if pieces:
            self.dataReceived(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def framesDelivered(self) -> None:
        if self._batch:
            self._run_batch()
        finished = self._finished
        if finished:
            factory = self.factory
            if len(finished) == 1 and len(factory.connections) > 1:
                # One request in the read: its afters are run with those of the other connections'
                # reads handled in this reactor turn, each stage once for all of them.  (With a
                # single connection there are none, and the end of the turn would only cost a
                # timer and one more poll per request.)
                factory.answered.append(finished[0])
                factory.settle_later()
            else:
                # Before the write: next to the requests their code and data are still in the
                # CPU's caches, after the write's system calls they are not.
                factory.pipeline.settle(finished)
            finished.clear()
        self._flush_out()

    def deliverBuffered(self) -> None:
        super().deliverBuffered()
        # The bytes delivered leave the budget (dataReceived does the same after its delivery).
        self._recharge()

    def frameTooLarge(self, length: int) -> None:
        if self._batch:
            self._run_batch()
        limit = self.MAX_LENGTH
        setting = "limits.max_handshake_frame_bytes" if self._prelogin else "limits.max_frame_bytes"
        log = self._log.info if self._prelogin else self._log.warn
        log(
            "Closing connection from {source}: frame of {length} bytes over the {limit}-byte limit"
            " ({setting})",
            source=self._source,
            length=length,
            limit=limit,
            setting=setting,
        )
        what = "before the handshake " if self._prelogin else ""
        self._refuse_and_close(
            0, SizeExceeded(f"frame of {length} bytes {what}exceeds {setting} ({limit}); closing")
        )

    # -- frames out ---------------------------------------------------------------------------

    def _send(self, envelope: envelope_pb2.Envelope) -> None:
        if self._lost:
            return
        if self._revision_scopes:
            scope = self._revision_scopes.pop(envelope.request_id, None)
            if scope is not None and scope.seen:
                envelope.revisions.update(scope.seen)
        self._send_payload(envelope.SerializeToString())

    def _send_payload(self, payload: bytes) -> None:
        """Send a serialized Envelope (compressed when large and the client asked for it)."""
        size = len(payload)
        if self._frame_codec and size >= self._frame_threshold:
            payload = compress_frame(payload, self._frame_codec) or payload
            size = len(payload)
        self._queue(frame_header(size), payload)

    def _queue(self, header: bytes, data: bytes) -> None:
        """Send ``header`` then ``data`` (frames): with the other answers of the read being handled
        when there is one, else now."""
        out = self._out
        if out is not None:
            # Inside a run of frame deliveries: answers go out together when it ends, or once
            # they are large (so that a full transport stops the run before it grows).
            out.append(header)
            out.append(data)
            self._out_size += len(data)
            if self._out_size >= _OUT_BATCH_BYTES:
                self._out = []
                self._out_size = 0
                self._write(b"".join(out))
        else:
            self._write(header + data)

    def _transport_write(self, data: bytes) -> None:
        """Write to the transport now, counting the bytes (see ``_meter``)."""
        if self._meter is not None:
            self._meter.sent += len(data)
        self._sent_since_drain += len(data)
        self.transport.write(data)  # type: ignore[union-attr]
        tcp = self._tcp
        if tcp is not None and tcp.drained:
            # An eager-write transport that took the write whole holds nothing.
            self._sent_since_drain = 0

    def _flush_out(self) -> None:
        out = self._out
        self._out = None
        self._out_size = 0
        if out and not self._lost:
            self._write(b"".join(out))

    def _write(self, data: bytes) -> None:
        """Write, or hold while the transport's buffer is full (bounded; see _write_paused)."""
        if not self._write_blocked and not self._held:
            self._transport_write(data)
            return
        if self._dropped:
            return
        held = self._held
        held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > self.factory.limits.max_buffered_response_bytes and len(held) > 1:
            self._log.warn(
                "Closing connection from {source}: {size} bytes of answers wait for a client that"
                " does not read them (limits.max_buffered_response_bytes)",
                source=self._source,
                size=self._held_bytes,
            )
            held.clear()
            self._held_bytes = 0
            self._sent_since_drain = 0  # aborted: the transport discards what it buffered
            self._state = _CLOSING
            self._dropped = True
            self.abort()

    @property
    def buffered_response_bytes(self) -> int:
        """Answer bytes not yet sent, from our own write accounting: those held here, plus, while
        the transport says its buffer is full, what we handed it since it last said it had drained
        (an upper bound of what it still buffers)."""
        if self._write_blocked:
            return self._held_bytes + self._sent_since_drain
        return self._held_bytes

    def handshakeCompleted(self) -> None:
        """The TLS handshake under this connection finished (``IHandshakeListener``)."""
        self._tls_done = True

    def _uncompress(self, envelope: envelope_pb2.Envelope) -> envelope_pb2.Envelope | None:
        """The Envelope inside a compressed one (None: an error was answered)."""
        if not self._frame_codec:
            self._send_error(0, ProtocolError("per-frame compression was not negotiated"))
            return None
        try:
            payload = decompress_frame(envelope.compressed, self.MAX_LENGTH)
            if len(payload) > 2 * self.factory.limits.max_frame_elements and not self._parse_cost_ok(payload):
                return None
            inner = Envelope()
            inner.ParseFromString(payload)
        except AmatersError as e:
            self._send_error(0, e)
            return None
        except DecodeError:
            self._send_error(0, MalformedMessage("a compressed frame does not hold a valid Envelope"))
            return None
        if inner.WhichOneof("body") == "compressed":
            self._send_error(inner.request_id, ProtocolError("a compressed frame holds another one"))
            return None
        return inner

    def _send_error(self, request_id: int, error: AmatersError) -> None:
        self._send(Envelope(request_id=request_id, error=error_to_proto(error)))

    def going_away(self) -> None:
        """The server began draining: tell the client (an error frame for request id 0 with
        SERVER_SHUTTING_DOWN), keep answering what it already sent, and let it close first.

        A well-behaved client stops sending, waits for its outstanding answers and closes; requests
        it sent before it read the notice get SERVER_SHUTTING_DOWN, so none is cut off unanswered.
        A connection still handshaking is refused and closed at once.
        """
        if self._lost or self._state is _CLOSING:
            return
        notice = ShuttingDown(
            "the server is shutting down; finish outstanding requests and reconnect elsewhere"
        )
        if self._state is not _READY:
            self._refuse_and_close(0, notice)
            return
        self._send_error(0, notice)
        self._flush_out()

    def _refuse_and_close(self, request_id: int, error: AmatersError) -> None:
        if self._lost or self._state is _CLOSING:
            return
        self._send_error(request_id, error)
        self._close()

    def _as_amaters_error(self, failure: Failure, what: str) -> AmatersError:
        if isinstance(failure.value, AmatersError):
            return failure.value
        self._log.failure(
            "Unexpected error handling {what} from {source}", failure, what=what, source=self._source
        )
        return ServerError("internal server error; the server log has the details")

    # -- handshake ----------------------------------------------------------------------------

    def _before_ready(self, request_id: int, kind: str | None, envelope: envelope_pb2.Envelope) -> None:
        if self._state is _AUTHENTICATING:
            # Frames pipelined behind the handshake wait (pauseFrames); this cannot happen.
            self._send_error(request_id, ProtocolError("the handshake is still in progress"))
            return
        if kind != "handshake":
            self._refuse_and_close(request_id, ProtocolError("the first frame must be a Handshake"))
            return
        handshake = envelope.handshake
        client_version = version_from_proto(handshake.version)
        if client_version[0] != PROTOCOL_VERSION[0]:
            supported = ", ".join(".".join(map(str, v)) for v in SUPPORTED_PROTOCOL_VERSIONS)
            self._refuse_and_close(
                request_id,
                UnsupportedVersion(
                    f"protocol version {'.'.join(map(str, client_version))} is not supported;"
                    f" this server speaks {supported}"
                ),
            )
            return
        if self.factory.draining:
            self._refuse_and_close(request_id, ShuttingDown("the server is shutting down"))
            return
        credentials = None
        which = handshake.credentials.WhichOneof("kind")
        if which is not None:
            credentials = Credentials(which, getattr(handshake.credentials, which))
        peer_certificate = None
        transport = self.transport
        if ISSLTransport.providedBy(transport):
            peer_certificate = _peer_certificate_chain(transport)
        self._state = _AUTHENTICATING
        # Requests pipelined behind the handshake wait for its outcome, and nothing more is read.
        self._update_reading()
        client_name = handshake.client_name[:200]
        self._offered_compression = list(handshake.frame_compression)[:8]
        self._trace_context = dict(handshake.trace_context) if handshake.trace_context else None
        version = (PROTOCOL_VERSION[0], min(client_version[1], PROTOCOL_VERSION[1]), 0)
        try:
            d = self.factory.authenticate(credentials, peer_certificate, self._source)
        except Exception:
            d = defer.fail()
        d.addCallbacks(
            self._authenticated,
            self._not_authenticated,
            callbackArgs=(request_id, client_name, version, credentials, peer_certificate),
            errbackArgs=(request_id,),
        )

    def _authenticated(
        self,
        principal: IPrincipal,
        request_id: int,
        client_name: str,
        version: tuple[int, int, int],
        credentials: Credentials | None,
        peer_certificate: Any,
    ) -> None:
        logout = getattr(principal, "logout", None)  # cred avatars (amaters.auth) carry their logout
        if self._lost or self._state is not _AUTHENTICATING:
            if callable(logout):
                logout()  # the connection ended while the login was in progress
            return
        self.session = Session(
            principal,
            client_name,
            version,
            credentials,
            peer_certificate,
            self._trace_context,
            logout if callable(logout) else None,
        )
        self._trace_context = None
        self._state = _READY
        self._prelogin = False
        self.factory.budget.move_to_authenticated(self._charged)
        self.MAX_LENGTH = self.factory.limits.max_frame_bytes
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        self._log.info(
            "Accepted {client} from {source} as {principal} ({method})",
            client=client_name,
            source=self._source,
            principal=principal.name,
            method=principal.auth_method,
        )
        policy = self.factory.frame_compression
        codec = policy.negotiate(self._offered_compression) if policy is not None else ""
        threshold = policy.threshold if policy is not None and codec else 0
        self._send(
            Envelope(
                request_id=request_id,
                handshake_response=envelope_pb2.HandshakeResponse(
                    version=version_to_proto(version),
                    supported_versions=[version_to_proto(v) for v in SUPPORTED_PROTOCOL_VERSIONS],
                    capabilities=CAPABILITIES,
                    principal_name=principal.name,
                    roles=list(principal.roles),
                    server_name=f"amaters {__version__}",
                    frame_compression=codec,
                    frame_compression_threshold=threshold,
                ),
            )
        )
        # From the next frame on, both sides may compress (the answer above is never compressed).
        self._frame_codec, self._frame_threshold = codec, threshold
        self._schedule_idle()
        self._flush_out()
        self._update_reading()

    def _not_authenticated(self, failure: Failure, request_id: int) -> None:
        if self._lost:
            return
        if isinstance(failure.value, AuthError):
            error: AmatersError = failure.value
            self._log.info(
                "Refused connection from {source}: {reason}", source=self._source, reason=error.message
            )
        else:
            self._log.failure("Authentication failed unexpectedly for {source}", failure, source=self._source)
            error = AuthError("authentication failed")
        self._state = _HANDSHAKE
        self._refuse_and_close(request_id, error)
        self._flush_out()

    # -- flow control -------------------------------------------------------------------------

    def _request_started(self) -> None:
        self._inflight += 1
        if self._inflight >= self.factory.limits.max_inflight_per_connection:
            self._update_reading()

    def _request_finished(self) -> None:
        if self._lost:
            return
        self._inflight -= 1
        if self._reading_paused:
            self._update_reading()
        if self._inflight == 0 and self.factory.draining and self.factory.drain_grace_over:
            self._flush_out()
            self._close()

    def _update_reading(self) -> None:
        if self._lost or self._state is _CLOSING:
            return
        pause = (
            self._write_blocked
            or self._inflight >= self.factory.limits.max_inflight_per_connection
            or self._state is _AUTHENTICATING
            or bool(self._admitted)
            or self._pushed_back is not None
        )
        if pause and not self._reading_paused:
            self._reading_paused = True
            self.pauseFrames()
            self.transport.pauseProducing()  # type: ignore[union-attr]
        elif not pause and self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]
            self.resumeFrames()

    def _write_paused(self, paused: bool) -> None:
        self._write_blocked = paused
        if not paused:
            self._sent_since_drain = 0
        held = self._held
        while held and not self._write_blocked and not self._lost:
            data = held.popleft()
            self._held_bytes -= len(data)
            self._transport_write(data)
        if (self._admitted or self._pushed_back is not None) and not self._write_blocked and not self._lost:
            self._resume_admitted()
        self._update_reading()
        if not paused:
            for stream in list(self._streams.values()):
                stream.pump()

    # -- requests -----------------------------------------------------------------------------

    def _context(self, request_id: int) -> RequestContext:
        session = self.session
        assert session is not None
        # The request's bytes arrived at _last_activity: a good start time, and no clock call.
        ctx = RequestContext(request_id, session.principal, self._source, self._last_activity, session)
        if self._trace_context:
            ctx.annotations["trace_context"] = self._trace_context
        return ctx

    def _track(self, request_id: int, d: defer.Deferred[Any], what: str) -> None:
        """Count ``d`` as in flight and answer with a timeout error if it runs too long."""
        self._request_started()
        if not d.called:
            timeout = self.factory.limits.request_timeout
            if what in ("filter", "update", "upload_keys"):
                # Homomorphic evaluation has its own, longer deadline (fhe.query_timeout).
                timeout = max(timeout, self.factory.fhe_query_timeout)
            # From the arrival of the request's bytes (``_last_activity``, as ``ctx.started``).
            deadline = self._last_activity + timeout
            self._deadlines[request_id] = (deadline, what, timeout)
            timer = self._deadline_timer
            if timer is None:
                self._deadline_timer = self.factory.clock.callLater(timeout, self._deadlines_due)
            elif timer.getTime() > deadline:
                # Deadlines differ by kind (a FILTER's is longer): the earliest one sets the timer.
                timer.reset(max(0.0, deadline - self.factory.clock.seconds()))

    def _untrack(self, request_id: int) -> bool:
        """The request finished: whether it still needs an answer (it did not time out).

        The caller sends the answer, then calls ``_request_finished`` (which may close the
        connection when draining, so it must come after the answer).
        """
        # Nothing to cancel: the connection's deadline timer skips requests no longer listed.
        if self._deadlines.pop(request_id, None) is not None:
            return True
        if request_id in self._timed_out:
            self._timed_out.discard(request_id)
            return False
        return True

    def _deadlines_due(self) -> None:
        """The deadline timer: time out every request past its deadline, then wait for the next.

        Requests finish in the usual case long before their deadline, so the timer is left alone
        when they do; it runs at most once per ``request_timeout`` while requests are in flight.
        """
        self._deadline_timer = None
        if self._lost:
            return
        clock = self.factory.clock
        now = clock.seconds()
        due = [(rid, entry) for rid, entry in self._deadlines.items() if entry[0] <= now]
        for request_id, (_, what, timeout) in due:
            if self._lost:
                return
            if self._deadlines.pop(request_id, None) is not None:
                self._request_expired(request_id, what, timeout)
        if self._deadlines and not self._lost and self._deadline_timer is None:
            first = min(entry[0] for entry in self._deadlines.values())
            self._deadline_timer = clock.callLater(max(0.0, first - now), self._deadlines_due)

    def _request_expired(self, request_id: int, what: str, timeout: float) -> None:
        self._timed_out.add(request_id)
        self._log.warn(
            "A {what} request from {source} ran longer than {timeout} s",
            what=what,
            source=self._source,
            timeout=timeout,
        )
        self._send_error(
            request_id,
            RequestTimeout(f"the {what} request did not finish within {timeout:g} s on the server"),
        )

    def _on_query(self, request_id: int, request: aql_pb2.QueryRequest) -> None:
        try:
            op = self.factory.pipeline.decode_query(request.query)
        except AmatersError as e:
            if self._batch:
                self._run_batch()
            self._send_query_error(request_id, e)
            return
        self._on_operation(request_id, op)

    def _on_operation(self, request_id: int, op: ops.Operation) -> None:
        """Run a query's validated operation and answer it (now, with the others of the read, or
        when it finishes)."""
        pipeline = self.factory.pipeline
        ctx = self._context(request_id)
        if type(op) in _KEYED and self._delivering:
            batch = self._batch
            if batch:
                batch.append((ctx, op))
                if len(batch) >= self._batch_room:
                    self._run_batch()
                return
            if not self._frame_alone and not self._revision_scopes:
                # The first of a read of several: the others may join it.
                room = self.factory.limits.max_inflight_per_connection - self._inflight
                if room > 1:
                    self._batch_room = min(room, _BATCH_MOST)
                    batch.append((ctx, op))
                    self._take_frames = self._take_keyed
                    return
        elif self._batch and not self._run_batch():
            self._pushed_back = partial(self._on_operation, request_id, op)
            return
        if type(op) in _STREAMED:
            # Streamed: StreamBatch frames as chunks are read (a FILTER's as they are evaluated).
            self._start_range(request_id, ctx, cast("ops.Range | ops.Filter", op))
            return
        # A request answered at once during a read has its afters run at the end of the read, with
        # the others' (framesDelivered).
        done, outcome = pipeline.run(ctx, op, self._finished if self._delivering else None)
        self._ran(request_id, ctx, op, done, outcome)

    def _take_keyed(self, buffer: bytes, offset: int) -> int:
        """The frame loop's ``take`` while a read's batch is open: the keyed frames that follow at
        ``offset`` join the batch in one call (:func:`~amaters.protocols.keyed.take_keyed_frames`),
        up to one short of its room, so that the frame that fills it, and any other frame, comes
        through ``stringReceived``, which runs the batch."""
        batch = self._batch
        factory = self.factory
        session = self.session
        if not batch or self._state is not _READY or factory.draining or factory.session_revisions:
            return offset
        assert session is not None
        before = len(batch)
        offset = take_keyed_frames(
            factory.pipeline.validator,
            buffer,
            offset,
            self.MAX_LENGTH,
            batch,
            self._batch_room - 1,
            session.principal,
            self._source,
            self._last_activity,
            session,
        )
        self._frames_seen += len(batch) - before
        return offset

    def _run_batch(self) -> bool:
        """Run the GET, SET and DELETE requests collected from the current read, together:
        whether all of them were answered (False: the transport pushed back, and the rest wait in
        ``_admitted`` until it drains; reading stops meanwhile)."""
        batch, self._batch = self._batch, []
        self._take_frames = None
        try:
            _, decided = self.factory.pipeline.admit_many(batch, self._finished)
        except Exception:
            self._fail_each(batch, "requests")
            return True
        admitted = self._admitted
        if not decided and not admitted and not self._write_blocked and not self._lost:
            kind = type(batch[0][1])
            if kind is ops.Set:
                for _, op in batch:
                    if type(op) is not ops.Set:
                        break
                else:
                    # All SETs, all let through, none waiting before them: written together at once.
                    self._answer_sets(batch)
                    return True
            elif kind is ops.Get and self._out is not None and not self._revision_scopes:
                # The GETs the query cache answers, answered in one call; the rest as below.
                answered, size, outcome = answer_cached_gets(
                    self.factory.pipeline,
                    batch,
                    self._finished,
                    self._out,
                    _OUT_BATCH_BYTES - self._out_size,
                    self._frame_threshold if self._frame_codec else -1,
                )
                self._out_size += size
                if answered:
                    batch = batch[answered:]
                if outcome is not None:
                    ctx, op = batch.pop(0)
                    admitted.append((ctx, op, outcome))
        for ctx, op in batch:
            admitted.append((ctx, op, decided.get(ctx)))
        return self._run_admitted()

    def _fail_each(self, items: list[tuple[RequestContext, Any]], what: str) -> None:
        """Answer each of ``items`` with the error being handled (call it from an ``except``)."""
        error = self._as_amaters_error(Failure(), what)
        for ctx, _ in items:
            self._send_error(ctx.request_id, error)

    def _run_admitted(self) -> bool:
        """Answer the requests in ``_admitted`` in order, running those the stages let through,
        until the transport pushes back: whether all were answered."""
        admitted = self._admitted
        pipeline = self.factory.pipeline
        finished = self._finished
        ran = self._ran
        while admitted:
            if self._write_blocked or self._lost:
                self._update_reading()
                return False
            ctx, op, decided = admitted.popleft()
            if decided is None and type(op) is ops.Set and admitted:
                following = admitted[0]
                if following[2] is None and type(following[1]) is ops.Set:
                    self._run_sets(ctx, op)
                    continue
            try:
                done, outcome = pipeline.run_admitted(ctx, op, finished) if decided is None else decided
                ran(ctx.request_id, ctx, op, done, outcome)
            except Exception:
                self._send_error(ctx.request_id, self._as_amaters_error(Failure(), op.name))
        return True

    def _run_sets(self, ctx: RequestContext, op: ops.Set) -> None:
        """Run ``op`` and the SETs that follow it in ``_admitted``, written together (their answers
        are a few bytes each), and answer them."""
        admitted = self._admitted
        sets = [(ctx, op)]
        while admitted:
            following = admitted[0]
            if following[2] is not None or type(following[1]) is not ops.Set:
                break
            admitted.popleft()
            sets.append((following[0], following[1]))
        self._answer_sets(sets)

    def _answer_sets(self, sets: list[tuple[RequestContext, Any]]) -> None:
        """Write the SETs ``sets`` (each let through by every stage) together, and answer them."""
        try:
            together, outcomes = self.factory.pipeline.run_admitted_sets(sets, self._finished)
        except Exception:
            self._fail_each(sets, "set")
            return
        if together and outcomes[0][0]:
            # All written at once: the same answer for each (``_ran`` would send it too).
            if not self._lost:
                self._queue(b"", set_answer_frames([each.request_id for each, _ in sets]))
            return
        ran = self._ran
        for (each, set_op), (done, outcome) in zip(sets, outcomes, strict=True):
            ran(each.request_id, each, set_op, done, outcome)

    def _resume_admitted(self) -> None:
        """The transport drained: answer the requests set aside, then handle the frame that was
        waiting for them, as one delivery (its answers written together, its afters settled)."""
        self._delivering = True
        try:
            if self._run_admitted() and self._pushed_back is not None:
                handle, self._pushed_back = self._pushed_back, None
                self._frame_alone = False
                handle()
        finally:
            self._delivering = False
            self.framesDelivered()
        if not self._frames_paused and self._rx:
            # Reading resumed meanwhile (resumeFrames does not deliver inside a delivery).
            self.deliverBuffered()

    def _ran(self, request_id: int, ctx: RequestContext, op: Any, done: bool, outcome: Any) -> None:
        """Answer a request the pipeline ran: now if it is done, else when its Deferred fires."""
        if done:
            # Answered synchronously (memory backend, cache hit): skip the callback machinery.
            response = ctx.response
            if response is not None and not self._revision_scopes:
                # Already encoded (a query-cache hit): sent as it is.
                if not self._lost:
                    self._send_payload(query_answer(request_id, response))
                return
            self._answer_query(request_id, op.name, outcome)
            return
        d: defer.Deferred[Any] = outcome
        self._track(request_id, d, op.name)
        d.addCallbacks(
            self._query_done, self._query_failed, callbackArgs=(request_id, op), errbackArgs=(request_id, op)
        )

    def _answer_query(self, request_id: int, op_name: str, result: Any) -> None:
        if op_name == "set" and not self._revision_scopes:
            # The commonest write answer, already serialized (the same bytes as the Envelope's).
            if not self._lost:
                self._queue(b"", set_answer_frame(request_id))
            return
        envelope = Envelope(request_id=request_id)
        if op_name == "get" and result is not None:
            fill_blob(envelope.query_response.result.single.value, result)  # the hottest answer
        else:
            fill_result(envelope.query_response.result, op_name, result)
        self._send(envelope)

    def _query_done(self, result: Any, request_id: int, op: Any) -> None:
        if self._untrack(request_id):
            self._answer_query(request_id, op.name, result)
        self._request_finished()

    def _query_failed(self, failure: Failure, request_id: int, op: Any) -> None:
        if self._untrack(request_id):
            self._send_query_error(request_id, self._as_amaters_error(failure, op.name))
        self._request_finished()

    def _send_query_error(self, request_id: int, error: AmatersError) -> None:
        self._send(
            Envelope(request_id=request_id, query_response=aql_pb2.QueryResponse(error=error_to_proto(error)))
        )

    def _on_batch(self, request_id: int, request: aql_pb2.BatchRequest) -> None:
        pipeline = self.factory.pipeline
        try:
            op = pipeline.decode_batch(request)
        except AmatersError as e:
            self._send_batch_error(request_id, e)
            return
        d = pipeline.execute(self._context(request_id), op)
        self._track(request_id, d, "batch")
        d.addCallbacks(
            self._batch_done, self._batch_failed, callbackArgs=(request_id, op), errbackArgs=(request_id,)
        )

    def _batch_done(self, results: list[Any], request_id: int, op: ops.Batch) -> None:
        if self._untrack(request_id):
            envelope = Envelope(request_id=request_id)
            out = envelope.batch_response.results
            out.SetInParent()
            add = out.results.add
            for item, result in zip(op.ops, results, strict=True):
                fill_result(add(), item.name, result)
            self._send(envelope)
        self._request_finished()

    def _batch_failed(self, failure: Failure, request_id: int) -> None:
        if self._untrack(request_id):
            self._send_batch_error(request_id, self._as_amaters_error(failure, "batch"))
        self._request_finished()

    def _send_batch_error(self, request_id: int, error: AmatersError) -> None:
        self._send(
            Envelope(request_id=request_id, batch_response=aql_pb2.BatchResponse(error=error_to_proto(error)))
        )

    # -- streams ------------------------------------------------------------------------------

    def _start_range(self, request_id: int, ctx: RequestContext, op: ops.Range | ops.Filter) -> None:
        if request_id in self._streams:
            self._send_stream_error(
                request_id, ProtocolError("a stream with this request id is already running")
            )
            return
        stream = _RangeStream(self, request_id, ctx)
        self._streams[request_id] = stream
        self._request_started()
        d = self.factory.pipeline.open_range(ctx, op)
        d.addCallbacks(self._range_opened, self._range_failed, callbackArgs=(stream,), errbackArgs=(stream,))

    def _range_opened(self, cursor: IRangeCursor, stream: _RangeStream) -> None:
        if stream.done or self._lost:
            cursor.close()
            return
        stream.start(cursor)

    def _range_failed(self, failure: Failure, stream: _RangeStream) -> None:
        if stream.done or self._lost:
            return
        stream._failed(failure)

    def _stream_finished(self, stream: _RangeStream) -> None:
        if self._streams.pop(stream.request_id, None) is not None:
            self._request_finished()

    def _send_stream_error(self, request_id: int, error: AmatersError) -> None:
        self._send(
            Envelope(request_id=request_id, stream=aql_pb2.StreamResponse(error=error_to_proto(error)))
        )

    def _on_cancel_stream(self, request_id: int, request: envelope_pb2.CancelStreamRequest) -> None:
        stream = self._streams.get(request.stream_id)
        found = stream is not None and not stream.cancelled and not stream.done
        if stream is not None and found:
            stream.cancelled = True
            # A stream waiting for its cursor, or for a chunk, ends when that arrives; one waiting
            # for the transport to drain ends now.
            if stream.cursor is not None and not stream.reading and not stream.pumping:
                stream._end()
        self._send(
            Envelope(
                request_id=request_id,
                cancel_stream_response=envelope_pb2.CancelStreamResponse(cancelled=found),
            )
        )

    # -- everything else ----------------------------------------------------------------------

    def _run_simple(
        self, request_id: int, op: ops.Operation, render: Callable[[Any], envelope_pb2.Envelope]
    ) -> None:
        d = self.factory.pipeline.execute(self._context(request_id), op)
        self._track(request_id, d, op.name)

        def done(result: Any) -> None:
            if self._untrack(request_id):
                envelope = render(result)
                envelope.request_id = request_id
                self._send(envelope)
            self._request_finished()

        def failed(failure: Failure) -> None:
            if self._untrack(request_id):
                self._send_error(request_id, self._as_amaters_error(failure, op.name))
            self._request_finished()

        d.addCallbacks(done, failed)

    def _on_create_collection(self, request_id: int, request: envelope_pb2.CreateCollectionRequest) -> None:
        name = self.factory.pipeline.decode_collection(request.name)
        self._run_simple(request_id, ops.CreateCollection(name), _collection_changed)

    def _on_drop_collection(self, request_id: int, request: envelope_pb2.DropCollectionRequest) -> None:
        name = self.factory.pipeline.decode_collection(request.name)
        self._run_simple(request_id, ops.DropCollection(name), _collection_changed)

    def _on_list_collections(self, request_id: int, request: envelope_pb2.ListCollectionsRequest) -> None:
        self._run_simple(
            request_id,
            ops.ListCollections(),
            lambda names: Envelope(collection_response=envelope_pb2.CollectionResponse(names=names)),
        )

    def _on_server_info(self, request_id: int, request: aql_pb2.ServerInfoRequest) -> None:
        self._run_simple(request_id, ops.ServerInfo(), _server_info_envelope)

    def _on_health_check(self, request_id: int, request: aql_pb2.HealthCheckRequest) -> None:
        service_name = request.service if request.HasField("service") else None
        self._run_simple(request_id, ops.HealthCheck(service_name), _health_envelope)

    def _on_fhe_key_upload(self, request_id: int, request: envelope_pb2.FheKeyUpload) -> None:
        from amaters.fhe.service import KeyUpload

        chunk = KeyUpload(
            key_set_id=request.key_set_id,
            evaluator=request.evaluator,
            schema=request.schema,
            specs_sha256=request.specs_sha256,
            total_size=request.total_size,
            offset=request.offset,
            data=request.data,
            last=request.last,
            warm_ciphertext=request.warm_ciphertext,
        )

        def render(result: Any) -> envelope_pb2.Envelope:
            out = Envelope()
            answer = out.fhe_key_upload_response
            answer.received = result.received
            answer.complete = result.complete
            answer.already_present = result.already_present
            return out

        self._run_simple(request_id, ops.UploadKeys(chunk), render)

    def _on_ping(self, request_id: int, request: envelope_pb2.Ping) -> None:
        self._send(Envelope(request_id=request_id, pong=envelope_pb2.Pong(payload=request.payload)))


def _unknown_request(kind: str | None) -> AmatersError:
    if kind is None:
        return ProtocolError("the envelope carries no request")
    if kind == "handshake":
        return ProtocolError("the handshake is already done")
    return ProtocolError(f"{kind} is not a request a client may send")


def _collection_changed(changed: bool) -> envelope_pb2.Envelope:
    return Envelope(collection_response=envelope_pb2.CollectionResponse(changed=changed))


def _server_info_envelope(info: ops.ServerInfoResult) -> envelope_pb2.Envelope:
    return Envelope(
        server_info_response=aql_pb2.ServerInfoResponse(
            version=version_to_proto(info.version),
            supported_versions=[version_to_proto(v) for v in info.supported_versions],
            capabilities=info.capabilities,
            uptime_seconds=info.uptime_seconds,
        )
    )


def _health_envelope(health: ops.HealthResult) -> envelope_pb2.Envelope:
    status = aql_pb2.HEALTH_SERVING if health.serving else aql_pb2.HEALTH_NOT_SERVING
    return Envelope(health_check_response=aql_pb2.HealthCheckResponse(status=status, message=health.message))


#: Most GET/SET/DELETE requests of one read run together (QueryPipeline.admit_many).
_BATCH_MOST = 256


#: The operations a read's requests run together (``_on_query``), and those answered as a stream.
_KEYED = frozenset((ops.Get, ops.Set, ops.Delete))
_STREAMED = frozenset((ops.Range, ops.Filter))

_HANDLERS: dict[str, Callable[[AmatersServerProtocol, int, Any], None]] = {
    "query": AmatersServerProtocol._on_query,
    "batch": AmatersServerProtocol._on_batch,
    "cancel_stream": AmatersServerProtocol._on_cancel_stream,
    "create_collection": AmatersServerProtocol._on_create_collection,
    "drop_collection": AmatersServerProtocol._on_drop_collection,
    "list_collections": AmatersServerProtocol._on_list_collections,
    "server_info": AmatersServerProtocol._on_server_info,
    "health_check": AmatersServerProtocol._on_health_check,
    "ping": AmatersServerProtocol._on_ping,
    "fhe_key_upload": AmatersServerProtocol._on_fhe_key_upload,
}


# -- the factory ---------------------------------------------------------------------------------


class AmatersServerFactory(Factory):
    """Builds connections; tracks them so a drain can wait for (or cut) every one."""

    protocol = AmatersServerProtocol  # type: ignore[assignment]
    noisy = False
    _log = Logger()

    def __init__(
        self,
        pipeline: QueryPipeline,
        limits: LimitsConfig,
        clock: Any,
        authenticate: Authenticator | None = None,
        frame_compression: Any = None,
        *,
        fhe_query_timeout: float = 600.0,
        session_revisions: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.limits = limits
        self.clock = clock
        self.authenticate: Authenticator = authenticate or default_authenticator(False)
        #: Per-frame compression a handshake may negotiate (None: never).
        self.frame_compression: Any = frame_compression
        #: FILTER, UPDATE and key uploads run up to this long (fhe.query_timeout).
        self.fhe_query_timeout = fhe_query_timeout
        #: Clustered mode: requests carry and answers report shard revisions (amaters.cluster.session).
        self.session_revisions = session_revisions
        self.connections: set[AmatersServerProtocol] = set()
        #: Request bytes held by all connections (limits.max_buffered_bytes and friends).
        self.budget = ReceiveBudget(limits, clock)
        self.draining = False
        #: While draining, idle connections are closed by the server only after a grace period
        #: (clients told of the shutdown close first).
        self.drain_grace_over = False
        self._grace_timer: Any = None
        self._drained: list[defer.Deferred[None]] = []
        #: Requests every connection answered at once during this reactor turn, whose pipeline
        #: afters (metrics, the access log, load shedding's count...) run together at its end.
        self.answered: list[Any] = []
        self._settle_call: Any = None

    def settle_later(self) -> None:
        """Run the afters of the requests in :attr:`answered` at the end of this reactor turn."""
        if self._settle_call is None:
            self._settle_call = self.clock.callLater(0, self._settle_answered)

    def _settle_answered(self) -> None:
        self._settle_call = None
        answered = self.answered
        if answered:
            items = answered[:]
            answered.clear()
            self.pipeline.settle(items)

    def update_limits(self, limits: LimitsConfig) -> None:
        """Reloaded limits: new frames and new connections use them."""
        self.limits = limits
        self.budget.limits = limits
        self.pipeline.update_limits(limits)

    def connection_made(self, protocol: AmatersServerProtocol) -> None:
        self.connections.add(protocol)

    def connection_lost(self, protocol: AmatersServerProtocol) -> None:
        self.connections.discard(protocol)
        if not self.connections and self._drained:
            if self._grace_timer is not None and self._grace_timer.active():
                self._grace_timer.cancel()
            self._grace_timer = None
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    def start_drain(self, grace: float = 2.0) -> defer.Deferred[None]:
        """Refuse new requests and announce the shutdown on every connection.

        Clients close their connections once their outstanding requests are answered; after
        ``grace`` seconds the server closes the idle ones that are still open, and busy ones when
        they finish.  The Deferred fires when every connection is closed.
        """
        self.draining = True
        d: defer.Deferred[None] = defer.Deferred()
        if not self.connections:
            self.drain_grace_over = True
            d.callback(None)
            return d
        self._drained.append(d)
        for protocol in list(self.connections):
            protocol.going_away()
        self._grace_timer = self.clock.callLater(grace, self._end_drain_grace)
        return d

    def _end_drain_grace(self) -> None:
        self._grace_timer = None
        self.drain_grace_over = True
        for protocol in list(self.connections):
            if protocol._inflight == 0:
                protocol._close()

    def abort_all(self) -> None:
        for protocol in list(self.connections):
            protocol.abort()


# -- the listener service ------------------------------------------------------------------------


class ListenerService(service.Service):
    """The ``listener`` service: binds ``server.listen`` (TLS unless ``tls.enabled`` is false).

    ``is_accepting`` feeds readiness; ``port`` is the listening port (``port.getHost().port`` gives
    the bound port number when listening on port 0); ``tls`` is the swappable TLS creator.
    """

    name = "listener"
    _log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        pipeline: QueryPipeline,
        authenticate: Authenticator | None = None,
        *,
        wrap_factory: Callable[[Any], Any] | None = None,
        gate_factory: Callable[[Any], Any] | None = None,
        frame_compression: Any = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.pipeline = pipeline
        self.factory = AmatersServerFactory(
            pipeline,
            config.limits,
            reactor,
            authenticate or default_authenticator(config.auth.enabled),
            frame_compression,
            fhe_query_timeout=config.fhe.query_timeout,
            session_revisions=config.storage.backend == "etcd",
        )
        self.port: IListeningPort | None = None
        self.tls: Any = None
        self.tls_files: Any = None
        #: Wraps the protocol factory inside TLS when listening (connection and byte metrics).
        self.wrap_factory = wrap_factory
        #: Wraps the listening factory outside TLS (the connection limits: refuse before TLS work).
        self.gate_factory = gate_factory

    @property
    def is_accepting(self) -> bool:
        return bool(self.running) and self.port is not None and not self.factory.draining

    def startService(self) -> defer.Deferred[None]:
        super().startService()
        return defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        config = self.config
        before, after = raise_open_file_limit()
        if after != before:
            self._log.info("Raised the open-file limit from {before} to {after}", before=before, after=after)
        endpoint = serverFromString(self.reactor, config.server.listen)
        factory: Any = self.factory if self.wrap_factory is None else self.wrap_factory(self.factory)
        if config.tls.enabled:
            files = ensure_server_tls(config)
            self.tls_files = files
            if files.generated:
                self._log.info(
                    "Generated a private CA and server certificate under {directory}",
                    directory=str(files.cert.parent),
                )
            self._log.info(
                "TLS certificate {cert}, key {key}; clients trust CA {ca} (SHA-256 {fingerprint})",
                cert=str(files.cert),
                key=str(files.key),
                ca=str(files.ca) if files.ca else "(configured externally)",
                fingerprint=files.ca_fingerprint or "-",
            )
            options = server_tls_options(
                files.cert,
                files.key,
                client_ca=config.tls.ca or None,
                client_auth=config.tls.client_auth,
                crl=config.tls.crl or None,
            )
            self.tls = ReloadableServerTLS(options)
            factory = BatchedWritesTLSFactory(self.tls, factory)
            factory.tls_creator = self.tls  # held on the wrapper so reload can swap certificates
        else:
            self._log.warn("TLS is disabled (tls.enabled = false): traffic is not encrypted in transit")
        if self.gate_factory is not None:
            factory = self.gate_factory(factory)
        self.port = await endpoint.listen(factory)
        # Answers go out in the write that makes them, not one reactor turn later (transport.py).
        send_eagerly(self.port)
        host = self.port.getHost()
        self._log.info(
            "Listening for the native protocol on {host}:{port} ({security})",
            host=getattr(host, "host", str(host)),
            port=getattr(host, "port", ""),
            security="TLS" if config.tls.enabled else "plain TCP",
        )

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            await defer.maybeDeferred(port.stopListening)
        timeout = self.config.server.shutdown_timeout
        drained = self.factory.start_drain(grace=min(2.0, timeout / 2))
        busy = len(self.factory.connections)
        if busy:
            self._log.info("Draining {count} connection(s)", count=busy)
        # Leave a fifth of the shutdown budget for the storage flush that follows.
        timer = self.reactor.callLater(timeout * 0.8, self._drain_expired)
        try:
            await drained
        finally:
            if timer.active():
                timer.cancel()
            self.factory.budget.stop()

    def _drain_expired(self) -> None:
        left = len(self.factory.connections)
        if left:
            self._log.warn(
                "Shutdown timeout: closing {count} connection(s) with requests still running", count=left
            )
            self.factory.abort_all()


__all__ = [
    "ANONYMOUS",
    "CAPABILITIES",
    "AmatersServerFactory",
    "AmatersServerProtocol",
    "Authenticator",
    "Credentials",
    "ListenerService",
    "Principal",
    "Session",
    "default_authenticator",
]
