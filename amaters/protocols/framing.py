"""Length-prefixed frames: a 4-byte big-endian length, then that many bytes (one protobuf Envelope).

:class:`FrameReceiver` is an ``Int32StringReceiver`` with three differences that matter to a
database protocol:

- ``MAX_LENGTH`` comes from configuration, and an oversize length prefix calls
  :meth:`frameTooLarge` (the server answers with an error frame, then closes); Twisted's default
  silently drops anything over 99,999 bytes.
- A large frame arriving in many TCP/TLS reads is collected in a list and joined once, instead of
  re-concatenating the whole buffer on every read (quadratic for a 10 MB value).
- Frame delivery can be paused (:meth:`pauseFrames`) while the rest of the already-received bytes
  stay buffered; :meth:`resumeFrames` delivers them.  The server uses this for its per-connection
  in-flight limit, because pausing the transport does not stop bytes already read (or already
  decrypted by TLS) from arriving.

Many small frames in one read are split with ``struct.unpack_from`` on one buffer: no per-frame
copies besides the frame itself.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from twisted.protocols.basic import Int32StringReceiver

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
_unpack_from = _HEADER.unpack_from
_pack = _HEADER.pack

#: Above this many missing bytes a partial frame is collected as a list of chunks.
_COLLECT_THRESHOLD = 64 * 1024


def encode_frame(payload: bytes) -> bytes:
    """One frame: the 4-byte big-endian length of ``payload``, then ``payload``."""
    return _pack(len(payload)) + payload


#: ``frame_header(length)``: the 4-byte length prefix for a payload of ``length`` bytes (the
#: struct's own ``pack``, not a wrapper around it: it runs for every answer).
frame_header: Callable[[int], bytes] = _pack


class FrameDecoder:
    """Incremental frame splitter without any transport (used by tests, fuzzing and tools).

    ``feed(data)`` returns the complete frames found so far; raises ``ValueError`` for a length over
    ``max_length``.
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data
        frames: list[bytes] = []
        offset = 0
        end = len(buffer)
        while end - offset >= HEADER_SIZE:
            (length,) = _unpack_from(buffer, offset)
            if length > self.max_length:
                raise ValueError(f"frame of {length} bytes exceeds the limit of {self.max_length}")
            start = offset + HEADER_SIZE
            if end - start < length:
                break
            frames.append(buffer[start : start + length])
            offset = start + length
        self._buffer = buffer[offset:]
        return frames

    @property
    def pending(self) -> int:
        """Bytes received that are not yet part of a complete frame."""
        return len(self._buffer)


class FrameReceiver(Int32StringReceiver):
    """A length-prefixed frame protocol; subclasses implement ``stringReceived`` and ``frameTooLarge``.

    ``stringReceived`` is called once per complete frame, in order.  While frames are paused
    (:meth:`pauseFrames`), received bytes are buffered and no frame is delivered.
    """

    MAX_LENGTH = 64 * 1024 * 1024

    # The buffer of received bytes not yet delivered, as one bytes object...
    _rx: bytes = b""
    # ...or, while a large frame is arriving, the chunks of it (first chunk includes the header).
    _rx_chunks: list[bytes] | None = None
    _rx_chunks_size: int = 0
    _rx_needed: int = 0
    _frames_paused: bool = False
    _delivering: bool = False
    _too_large: bool = False
    # Set by a subclass while the frames that follow can be taken in one call (the server's batch
    # of keyed requests): ``take(buffer, offset)`` handles the complete frames it can at
    # ``offset`` and returns the offset after them, calling ``stringReceived`` for none.
    _take_frames: Callable[[bytes, int], int] | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._too_large:
            return
        chunks = self._rx_chunks
        if chunks is not None:
            chunks.append(data)
            self._rx_chunks_size += len(data)
            if self._rx_chunks_size < self._rx_needed:
                return
            self._rx = b"".join(chunks)
            self._rx_chunks = None
        elif self._rx:
            self._rx += data
        else:
            self._rx = data
        if not self._frames_paused and not self._delivering:
            self._deliver()

    def _deliver(self) -> None:
        """Deliver every complete frame in the buffer until paused or out of data."""
        self._delivering = True
        try:
            buffer = self._rx
            offset = 0
            end = len(buffer)
            while end - offset >= HEADER_SIZE and not self._frames_paused:
                (length,) = _unpack_from(buffer, offset)
                # MAX_LENGTH is read for every frame: a frame handler may change it (a login).
                if length > self.MAX_LENGTH:
                    self._rx = b""
                    self._too_large = True
                    self.frameTooLarge(length)
                    return
                start = offset + HEADER_SIZE
                stop = start + length
                if stop > end:
                    break
                offset = stop
                self.stringReceived(buffer[start:stop])
                if self._too_large:
                    return
                if self._rx is not buffer:
                    # Bytes arrived re-entrantly (a handler fed the protocol); ``_rx`` is the old
                    # buffer with them appended, so offsets into it are still right.
                    buffer = self._rx
                    end = len(buffer)
                take = self._take_frames
                if take is not None and not self._frames_paused:
                    offset = take(buffer, offset)
            rest = buffer[offset:] if offset else buffer
            self._rx = rest
            if not self._frames_paused and len(rest) >= HEADER_SIZE:
                (length,) = _unpack_from(rest, 0)
                needed = HEADER_SIZE + length
                if needed - len(rest) > _COLLECT_THRESHOLD:
                    self._rx_chunks = [rest]
                    self._rx_chunks_size = len(rest)
                    self._rx_needed = needed
                    self._rx = b""
        finally:
            self._delivering = False
            self.framesDelivered()

    def framesDelivered(self) -> None:
        """Called after each run of frame deliveries (override to flush batched writes)."""

    def pauseFrames(self) -> None:
        """Stop delivering frames; received bytes stay buffered."""
        self._frames_paused = True

    def resumeFrames(self) -> None:
        """Deliver buffered frames again (now, unless called from inside a delivery)."""
        if not self._frames_paused:
            return
        self._frames_paused = False
        self.deliverBuffered()

    def deliverBuffered(self) -> None:
        """Deliver the frames already buffered, now: unless inside a delivery (which goes on by
        itself), while a large frame is still arriving, or once input is discarded."""
        if not self._delivering and self._rx_chunks is None and not self._too_large:
            self._deliver()

    @property
    def framesPaused(self) -> bool:
        return self._frames_paused

    @property
    def bufferedBytes(self) -> int:
        """Bytes received and not yet delivered as frames (a partial frame, or paused frames)."""
        chunks = self._rx_chunks_size if self._rx_chunks is not None else 0
        return len(self._rx) + chunks

    def discardInput(self) -> None:
        """Drop every byte received and not yet delivered, and ignore whatever arrives from now on
        (the connection is being closed; its buffers are released at once)."""
        self._too_large = True
        self._rx = b""
        self._rx_chunks = None
        self._rx_chunks_size = 0

    def frameTooLarge(self, length: int) -> None:
        """A length prefix over ``MAX_LENGTH`` arrived.  No further frame is delivered.

        The default closes the connection; the server sends an error frame first.
        """
        self.transport.loseConnection()  # type: ignore[union-attr]

    def lengthLimitExceeded(self, length: int) -> None:
        # Int32StringReceiver's hook, kept for callers that use it: same behaviour.
        self.frameTooLarge(length)

    def sendFrame(self, payload: bytes) -> None:
        """Write one frame."""
        self.transport.write(_pack(len(payload)) + payload)  # type: ignore[union-attr]

    sendString = sendFrame
