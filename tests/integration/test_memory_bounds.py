"""Memory bounds of the native protocol against a real ``twistd -n amaters`` subprocess, measured by
the server process's resident memory (``/proc/<pid>/status``) and raw sockets.

- Before login only a handshake-sized frame is accepted: 32 connections from one address each
  announcing a 60 MB frame and sending data for it are closed at the length prefix, and the
  server's RSS stays (and ends) within 50 MB of its baseline.
- After login, the bytes all connections hold for frames still arriving stay within
  ``limits.max_buffered_bytes``: the connection that would pass it is refused with
  SERVER_OVERLOADED, the others keep being served, and the memory comes back when they go.
- A frame holding more fields than ``limits.max_frame_elements`` is refused before it is parsed,
  and the connection stays usable.

The figures are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from pathlib import Path

import pytest
from harness import ServerProcess
from rawwire import connect, handshake_frame, logged_in, read_frame, rss_bytes, wait_for

from amaters.errors import ErrorCode
from amaters.proto import envelope_pb2
from amaters.protocols.framing import encode_frame

pytestmark = pytest.mark.integration

MB = 1024 * 1024
Envelope = envelope_pb2.Envelope


def _start(tmp_path: Path, *settings: str) -> ServerProcess:
    server = ServerProcess(tmp_path / "server", ["tls.enabled=false", "storage.backend=memory", *settings])
    server.start().wait_ready()
    return server


def _flood(sockets: list[socket.socket], frame_length: int, pid: int, limit_s: float) -> tuple[int, int]:
    """Send each socket a length prefix of ``frame_length`` and then data for it (1 byte short of the
    whole frame), all at once, until the server closes them or ``limit_s`` passes.  Returns (bytes
    the server accepted, peak RSS of the server seen meanwhile)."""
    chunk = b"\0" * MB
    left = {s: frame_length - 1 for s in sockets}
    for s in sockets:
        s.setblocking(False)
        s.send(struct.pack(">I", frame_length))
    sent = 0
    peak = rss_bytes(pid)
    deadline = time.monotonic() + limit_s
    next_sample = 0.0
    while left and time.monotonic() < deadline:
        _, writable, _ = select.select([], list(left), [], 0.2)
        for s in writable:
            try:
                n = s.send(chunk[: min(len(chunk), left[s])])
            except OSError as e:
                assert e.errno in (errno.EPIPE, errno.ECONNRESET), e
                del left[s]
                continue
            sent += n
            left[s] -= n
            if left[s] <= 0:
                del left[s]
        if time.monotonic() >= next_sample:
            peak = max(peak, rss_bytes(pid))
            next_sample = time.monotonic() + 0.1
    return sent, max(peak, rss_bytes(pid))


def test_partial_60mb_frames_before_login_are_refused_and_memory_stays_flat(tmp_path: Path) -> None:
    """32 connections from one address each send a 60 MB frame's prefix and data before logging in:
    each gets SIZE_EXCEEDED naming limits.max_handshake_frame_bytes and is closed, and the server's
    RSS never goes 50 MB above its baseline, nor stays there after they are gone."""
    server = _start(tmp_path)
    try:
        assert server.process is not None
        pid = server.process.pid
        # Warm up one full handshake so lazily loaded code is part of the baseline.
        logged_in(server.port).close()
        time.sleep(0.3)
        baseline = rss_bytes(pid)
        sockets = [connect(server.port) for _ in range(32)]
        sent, peak = _flood(sockets, 60 * 1000 * 1000, pid, limit_s=30.0)
        refused = 0
        for s in sockets:
            s.setblocking(True)
            answer = read_frame(s, timeout=5.0)
            if answer is not None and answer.error.code == ErrorCode.VALIDATION_SIZE_EXCEEDED:
                assert "limits.max_handshake_frame_bytes" in answer.error.message
                refused += 1
            s.close()
        wait_for(lambda: rss_bytes(pid) - baseline < 50 * MB, 10.0)
        after = rss_bytes(pid)
        print(
            f"\npre-login flood: baseline {baseline / MB:.1f} MB, peak {peak / MB:.1f} MB, after"
            f" {after / MB:.1f} MB; {sent / MB:.0f} MB sent by clients; {refused}/32 refused"
        )
        assert refused == 32
        assert peak - baseline < 50 * MB
        assert after - baseline < 50 * MB
        assert server.readyz() == 200
    finally:
        server.stop()
        server.cleanup()


def test_buffered_request_bytes_stay_within_the_memory_budget(tmp_path: Path) -> None:
    """With limits.max_buffered_bytes = 24 MiB, six logged-in connections each sending a partial
    8 MiB frame cannot make the server hold more: the ones past the budget get SERVER_OVERLOADED
    (retryable) and are closed, a client that sends small requests is still served, and RSS comes
    back (within 50 MB of its baseline) once the slow senders are gone."""
    server = _start(tmp_path, "limits.max_frame_bytes=8388608", "limits.max_buffered_bytes=25165824")
    try:
        assert server.process is not None
        pid = server.process.pid
        good = logged_in(server.port)
        time.sleep(0.3)
        baseline = rss_bytes(pid)
        slow = [logged_in(server.port) for _ in range(6)]
        sent, peak = _flood(slow, 8 * 1000 * 1000, pid, limit_s=20.0)
        overloaded = 0
        for s in slow:
            s.setblocking(True)
            s.settimeout(0.5)
            try:
                answer = read_frame(s, timeout=0.5)
            except TimeoutError:
                continue  # still waiting for the rest of its frame: within the budget
            if answer is not None and answer.error.code == ErrorCode.SERVER_OVERLOADED:
                assert "limits.max_buffered_bytes" in answer.error.message
                overloaded += 1
        good.settimeout(5.0)
        good.sendall(
            encode_frame(Envelope(request_id=7, ping=envelope_pb2.Ping(payload=b"x")).SerializeToString())
        )
        pong = read_frame(good)
        assert pong is not None and pong.WhichOneof("body") == "pong"
        for s in slow:
            s.close()
        wait_for(lambda: rss_bytes(pid) - baseline < 20 * MB, 10.0)  # usually; 50 MB is the bound
        after = rss_bytes(pid)
        print(
            f"\nbudget 24 MiB: baseline {baseline / MB:.1f} MB, peak {peak / MB:.1f} MB, after"
            f" {after / MB:.1f} MB; {sent / MB:.0f} MB sent; {overloaded}/6 refused"
        )
        assert overloaded >= 3  # at most two 8 MB frames (plus one read each) fit in 24 MiB
        assert peak - baseline < 24 * MB + 40 * MB
        assert after - baseline < 50 * MB
    finally:
        server.stop()
        server.cleanup()


def test_a_frame_too_costly_to_parse_is_refused_before_parsing(tmp_path: Path) -> None:
    """A 6 MB BATCH of three million empty queries is refused with MALFORMED_MESSAGE naming
    limits.max_frame_elements; the connection stays usable and a normal batch still works."""
    server = _start(tmp_path)
    try:
        s = logged_in(server.port)
        field = Envelope.DESCRIPTOR.fields_by_name["batch"].number
        body = b"\x0a\x00" * 3_000_000  # BatchRequest.queries = 1, empty, three million times
        payload = bytes([field << 3 | 2]) + _varint(len(body)) + body
        s.sendall(encode_frame(payload))
        answer = read_frame(s)
        assert answer is not None and answer.error.code == ErrorCode.PROTOCOL_MALFORMED_MESSAGE
        assert "limits.max_frame_elements" in answer.error.message
        s.sendall(
            encode_frame(Envelope(request_id=9, ping=envelope_pb2.Ping(payload=b"y")).SerializeToString())
        )
        pong = read_frame(s)
        assert pong is not None and pong.request_id == 9
    finally:
        server.stop()
        server.cleanup()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def test_bytes_pipelined_behind_a_handshake_are_bounded(tmp_path: Path) -> None:
    """A handshake followed at once by a large frame: the large frame is read only after the login,
    against the post-login limit (the handshake-sized limit does not refuse it)."""
    server = _start(tmp_path)
    try:
        s = connect(server.port)
        big = Envelope(request_id=5, ping=envelope_pb2.Ping(payload=b"z" * 100_000)).SerializeToString()
        s.sendall(handshake_frame() + encode_frame(big))
        first = read_frame(s)
        assert first is not None and first.WhichOneof("body") == "handshake_response"
        second = read_frame(s)
        assert second is not None and second.request_id == 5 and len(second.pong.payload) == 100_000
    finally:
        server.stop()
        server.cleanup()
