"""A raw HTTP/2 (h2c, prior knowledge) gRPC sender for tests that play a hostile client against a real
server's plain-TCP gRPC port.

It opens calls whose request message announces a large length and then sends the message's bytes
as fast as the server's HTTP/2 flow control lets it, never more: the bytes it manages to send are
exactly what the server agreed to take in.  The message body is sliced from one shared buffer, so the
client itself holds one copy whatever the number of calls.

Headers are HPACK literals without indexing (no Huffman, no dynamic table); the server's header
blocks are not decoded: a call counts as ended when the server closes its stream (HEADERS or DATA
with END_STREAM, or RST_STREAM), or the connection (GOAWAY, EOF).  Every wait is bounded.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 4, 5


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _integer(value: int, prefix_bits: int = 7) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _header_block(headers: Sequence[tuple[str, str]]) -> bytes:
    block = bytearray()
    for name, value in headers:
        n, v = name.encode(), value.encode()
        block += b"\x00" + _integer(len(n)) + n + _integer(len(v)) + v
    return bytes(block)


def _call_headers(stream: int, path: str, metadata: Sequence[tuple[str, str]], port: int) -> bytes:
    """The HEADERS frame that opens a call of ``path`` on ``stream``."""
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", f"127.0.0.1:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *metadata,
    ]
    return _frame(HEADERS, END_HEADERS, stream, _header_block(headers))


class _Connection:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setblocking(False)
        self.out: list[bytes | memoryview] = [PREFACE + _frame(SETTINGS, 0, 0)]
        self.queued = len(self.out[0])
        self.incoming = bytearray()
        self.window = 65535  # the connection's send window
        self.initial = 65535  # the server's SETTINGS_INITIAL_WINDOW_SIZE
        self.max_frame = 16384
        self.streams: dict[int, list[int]] = {}  # id -> [send window, bytes left, bytes sent]
        self.ended: set[int] = set()
        self.closed = False
        self.next_id = 1

    def open_call(self, path: str, metadata: Sequence[tuple[str, str]], length: int, port: int) -> int:
        stream = self.next_id
        self.next_id += 2
        self._queue(_call_headers(stream, path, metadata, port))
        self.streams[stream] = [self.initial, length, 0]
        return stream

    def receive(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno not in (errno.ECONNRESET, errno.EPIPE):
                raise
            data = b""
        if not data:
            self.closed = True
            return
        self.incoming += data
        while len(self.incoming) >= 9:
            length = int.from_bytes(self.incoming[:3], "big")
            if len(self.incoming) < 9 + length:
                break
            kind, flags = self.incoming[3], self.incoming[4]
            stream = int.from_bytes(self.incoming[5:9], "big") & 0x7FFFFFFF
            payload = bytes(self.incoming[9 : 9 + length])
            del self.incoming[: 9 + length]
            self._handle(kind, flags, stream, payload)

    def _handle(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            for i in range(0, len(payload) - 5, 6):
                ident, value = struct.unpack(">HI", payload[i : i + 6])
                if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                    for state in self.streams.values():
                        state[0] += value - self.initial
                    self.initial = value
                elif ident == SETTINGS_MAX_FRAME_SIZE:
                    self.max_frame = value
            self._queue(_frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self._queue(_frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            increment = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            if stream == 0:
                self.window += increment
            elif stream in self.streams:
                self.streams[stream][0] += increment
        elif kind == RST_STREAM or (kind in (HEADERS, DATA) and flags & END_STREAM):
            self.ended.add(stream)
        elif kind == GOAWAY:
            self.closed = True

    def fill(self, body: memoryview) -> int:
        """Queue DATA frames within the windows; returns the bytes queued."""
        queued = 0
        for stream, state in self.streams.items():
            while (
                stream not in self.ended
                and state[1] > 0
                and self.window > 0
                and state[0] > 0
                and self.queued < 1 << 20
            ):
                n = min(state[1], state[0], self.window, self.max_frame)
                start = state[2]
                last = n == state[1]
                header = struct.pack(">I", n)[1:] + bytes((DATA, END_STREAM if last else 0))
                self._queue(header + struct.pack(">I", stream))
                self._queue(body[start : start + n])
                state[2] = start + n
                state[0] -= n
                state[1] -= n
                self.window -= n
                queued += n
        return queued

    def _queue(self, data: bytes | memoryview) -> None:
        self.out.append(data)
        self.queued += len(data)

    def flush(self) -> None:
        if not self.out or self.closed:
            return
        try:
            sent = self.sock.sendmsg(self.out[:64])
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno not in (errno.ECONNRESET, errno.EPIPE):
                raise
            self.closed = True
            return
        self.queued -= sent
        while sent:
            head = self.out[0]
            if len(head) <= sent:
                sent -= len(head)
                self.out.pop(0)
            else:
                self.out[0] = memoryview(head)[sent:]
                sent = 0

    def close(self) -> None:
        self.sock.close()


def grpc_message(serialized: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(serialized)) + serialized


def flood(
    port: int,
    path: str,
    metadata: Sequence[tuple[str, str]],
    message: bytes,
    connections: int,
    calls_per_connection: int,
    limit_s: float,
    sample: Callable[[], None] = lambda: None,
    hold_s: float = 0.0,
) -> dict[str, int]:
    """Open ``connections`` x ``calls_per_connection`` calls of ``path``, each sending the whole gRPC
    message ``message`` (prefix included) as flow control allows, until every call has ended or sent
    everything, or ``limit_s`` passes; then keep the connections open up to ``hold_s`` more seconds,
    or until the server has ended every call (calls the server left open hold what it took in, and a
    call sent whole may be ended a moment later).  ``sample()`` is called about every 0.1 s.

    Returns ``sent`` (body bytes the server accepted), ``ended`` (calls the server ended),
    ``complete`` (calls whose whole message was sent) and ``calls``."""
    body = memoryview(message)
    conns = [_Connection(port) for _ in range(connections)]
    owners: list[tuple[_Connection, int]] = []
    for conn in conns:
        for _ in range(calls_per_connection):
            owners.append((conn, conn.open_call(path, metadata, len(message), port)))
    sent = 0
    started = time.monotonic()
    deadline = started + limit_s
    next_sample = 0.0

    def busy() -> bool:
        return any(not c.closed and s not in c.ended and c.streams[s][1] > 0 for c, s in owners) or any(
            c.out and not c.closed for c in conns
        )

    try:
        while time.monotonic() < deadline and busy():
            for conn in conns:
                if not conn.closed:
                    sent += conn.fill(body)
            writers = [c.sock for c in conns if c.out and not c.closed]
            readers = [c.sock for c in conns if not c.closed]
            readable, writable, _ = select.select(readers, writers, [], 0.05)
            for conn in conns:
                if conn.sock in readable:
                    conn.receive()
                if conn.sock in writable:
                    conn.flush()
            if time.monotonic() >= next_sample:
                sample()
                next_sample = time.monotonic() + 0.1
        hold_until = time.monotonic() + hold_s
        while time.monotonic() < hold_until:
            readers = [c.sock for c in conns if not c.closed]
            if not readers or all(s in c.ended for c, s in owners):
                break
            readable, _, _ = select.select(readers, [], [], 0.1)
            for conn in conns:
                if conn.sock in readable:
                    conn.receive()
            sample()
        sample()
        return {
            "sent": sent,
            "ended": sum(1 for c, s in owners if s in c.ended),
            "complete": sum(1 for c, s in owners if c.streams[s][1] == 0),
            "calls": len(owners),
        }
    finally:
        for conn in conns:
            conn.close()


def stalled_calls(port: int, path: str, message: bytes, calls: int) -> socket.socket:
    """A connection that announces a stream window of zero bytes and opens ``calls`` calls of
    ``path``, each sending the whole gRPC message ``message``: the server cannot send any of them a
    message until the client grants window, which it never does.  The caller closes the socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    out = PREFACE + _frame(SETTINGS, 0, 0, struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, 0))
    for stream in range(1, 2 * calls, 2):
        out += _call_headers(stream, path, (), port) + _frame(DATA, END_STREAM, stream, message)
    sock.sendall(out)
    return sock
