"""Each protection limit against the real server (in-process service tree) over loopback TLS.

Other loopback addresses (127.0.0.2, 127.0.0.3) stand for other hosts.  Raw sockets play the
misbehaving clients; they are non-blocking and polled between reactor turns, because the server
runs on this same reactor.  Every wait is bounded.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from inprocess import start_server
from twisted.internet import defer, reactor, task

from amaters.client import connect
from amaters.errors import ErrorCategory, ErrorCode, NetworkError, Overloaded
from amaters.query.pipeline import PipelineStage, RequestContext

pytestmark = pytest.mark.integration


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await sleep(0.02)


def raw(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.setblocking(False)
    try:
        s.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    return s


def closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(4096, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError as e:
        return e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)


async def wait_closed(s: socket.socket, timeout: float) -> float:
    """Seconds until the server closed ``s`` (fails after ``timeout``)."""
    started = time.monotonic()
    await until(lambda: closed_by_server(s), timeout)
    return time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_burst_beyond_the_bucket_gets_retryable_errors_and_others_are_unaffected(
    tmp_path: Path,
) -> None:
    """A client bursting past rate_limit.per_client_burst gets SERVER_OVERLOADED (retryable, with
    retry_after_ms) while a client from another address is served; after the wait it succeeds."""
    s = await start_server(tmp_path, "rate_limit.per_client_rps=5", "rate_limit.per_client_burst=10")
    try:
        greedy = await s.client()
        other = await s.client(bind_address="127.0.0.2")
        results = await defer.DeferredList(
            [greedy.get("c", b"k%d" % i) for i in range(30)], consumeErrors=True
        )
        refused = [r.value for ok, r in results if not ok]
        assert sum(1 for ok, _ in results if ok) == 10 and len(refused) == 20
        for error in refused:
            assert isinstance(error, Overloaded)
            assert error.category == ErrorCategory.RETRYABLE
            assert error.retry_after_ms is not None and 1 <= error.retry_after_ms <= 200
        for i in range(10):
            assert await other.get("c", b"k%d" % i) is None
        await sleep(max(e.retry_after_ms for e in refused if e.retry_after_ms) / 1000.0 + 0.05)
        assert await greedy.get("c", b"k") is None
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_connection_floods_stop_at_the_limits_and_others_are_served(tmp_path: Path) -> None:
    """Connections past max_connections_per_ip (one address) and max_connections (all) are closed at
    once; the connected client keeps working, and slots free up when the flood goes away."""
    s = await start_server(
        tmp_path, "limits.max_connections=8", "limits.max_connections_per_ip=5", "limits.handshake_timeout=30"
    )
    flood: list[socket.socket] = []
    try:
        client = await s.client()
        factory = s.listener.port.factory
        flood += [raw(s.port, "127.0.0.2") for _ in range(20)]
        await until(lambda: factory.limiter.total + factory.limiter.refused_per_ip >= 21)
        await until(lambda: sum(closed_by_server(x) for x in flood) == 15)
        assert factory.limiter.per_source["127.0.0.2"] == 5
        await client.set("c", b"k", b"still served")
        assert await client.get("c", b"k") == b"still served"
        more = [raw(s.port, "127.0.0.3") for _ in range(10)]
        flood += more
        await until(lambda: sum(closed_by_server(x) for x in more) == 8)
        assert factory.limiter.total == 8 and factory.limiter.refused_total == 8
        assert await client.get("c", b"k") == b"still served"
        with pytest.raises(NetworkError) as refused:
            await connect(reactor, "127.0.0.1", s.port, ca_cert=s.ca, timeout=5)
        assert refused.value.code in (ErrorCode.NETWORK_CONNECTION_RESET, ErrorCode.NETWORK_TLS_HANDSHAKE)
        for x in flood:
            x.close()
        await until(lambda: factory.limiter.total == 1)
        fresh = await s.client()
        assert await fresh.get("c", b"k") == b"still served"
    finally:
        for x in flood:
            x.close()
        await s.close()


@pytest_twisted.ensureDeferred
async def test_half_a_frame_then_a_stall_is_dropped_after_the_frame_timeout(tmp_path: Path) -> None:
    """A client that sends half a frame and stalls gets NETWORK_TIMEOUT and is disconnected after
    limits.frame_timeout; another client is served meanwhile."""
    s = await start_server(tmp_path, "limits.frame_timeout=1")
    try:
        stalled = await s.client()
        other = await s.client()
        started = time.monotonic()
        stalled._protocol.transport.write(b"\x00\x00\x01\x00" + b"\x0a" * 100)  # 100 of 256 bytes
        assert await other.ping() >= 0
        await until(lambda: stalled.closed, 10)
        elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 5
        with pytest.raises(NetworkError) as info:
            await stalled.ping()
        # The connection is closed; the error says why the server closed it (the frame timeout).
        assert info.value.code == ErrorCode.NETWORK_CONNECTION_RESET
        assert "did not arrive completely within 1 s" in info.value.message
        assert await other.ping() >= 0
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_slowloris_tls_handshakes_are_dropped_after_the_handshake_timeout(tmp_path: Path) -> None:
    """A raw TCP connection that sends nothing, or half a ClientHello, is dropped after
    limits.handshake_timeout (no TLS handshake ever completes, so nothing else could close it)."""
    s = await start_server(tmp_path, "limits.handshake_timeout=1")
    silent = raw(s.port)
    partial = raw(s.port)
    try:
        await sleep(0.1)
        # A TLS record header announcing a 512-byte ClientHello, then only part of it.
        partial.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20)
        client = await s.client()
        for sock in (silent, partial):
            elapsed = await wait_closed(sock, 10)
            assert elapsed < 5
        assert await client.ping() >= 0  # a finished handshake is not affected
        await until(lambda: len(s.listener.factory.connections) == 1)
    finally:
        silent.close()
        partial.close()
        await s.close()


class Gate(PipelineStage):
    """Holds GETs of the named collection until released."""

    name = "gate"

    def __init__(self, collection: str) -> None:
        self.collection = collection
        self.held: list[defer.Deferred[None]] = []

    def before(self, ctx: RequestContext, op: Any) -> object:
        if op.name != "get" or op.collection != self.collection:
            return None
        d: defer.Deferred[None] = defer.Deferred()
        self.held.append(d)
        return d


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_reads_cannot_make_the_server_buffer_without_bound(
    tmp_path: Path,
) -> None:
    """A client that stops reading: the server stops reading its requests, holds at most
    limits.max_buffered_response_bytes (plus one frame) of answers, then drops it; others are served.
    The bound is measured on the server's protocol object (held answers + transport buffers)."""
    limit = 2 * 1024 * 1024
    value = b"v" * (512 * 1024)
    s = await start_server(tmp_path, f"limits.max_buffered_response_bytes={limit}", "limits.idle_timeout=0")
    gate = Gate("held")
    s.root.components.pipeline.add_stage(gate)
    try:
        other = await s.client()
        greedy = await s.client()
        await greedy.set("held", b"big", value)
        await greedy.set("free", b"big", value)
        # The greedy client stops reading, then asks for 40 x 512 KiB (20 MiB).
        greedy._protocol.transport.pauseProducing()
        pending = [greedy.get("held", b"big", timeout=30) for _ in range(40)]
        for d in pending:
            d.addErrback(lambda _: None)
        await until(lambda: len(gate.held) == 40)
        server_side = next(p for p in s.listener.factory.connections if p._inflight == 40)
        peak = 0
        for d in list(gate.held):
            d.callback(None)
            peak = max(peak, server_side.buffered_response_bytes)
            if server_side._lost or server_side._state == "closing":
                break
        assert peak <= limit + len(value) + 64 * 1024 + 1024 * 1024, peak  # + a frame, + socket slack
        await until(lambda: server_side._lost, 10)
        assert await other.get("free", b"big") == value  # everyone else is still served
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_is_paused_not_dropped(tmp_path: Path) -> None:
    """Without requests held in flight, a client that stops reading only makes the server stop
    reading its requests; when it reads again every answer arrives."""
    s = await start_server(tmp_path, "limits.max_buffered_response_bytes=1048576")
    try:
        client = await s.client()
        value = b"x" * (256 * 1024)
        await client.set("c", b"k", value)
        client._protocol.transport.pauseProducing()
        answers = [client.get("c", b"k", timeout=30) for _ in range(60)]  # 15 MiB of answers
        await sleep(0.5)
        server_side = next(iter(s.listener.factory.connections))
        assert server_side.buffered_response_bytes <= 1048576 + 2 * len(value) + 1024 * 1024
        client._protocol.transport.resumeProducing()
        results = await defer.gatherResults(answers)
        assert all(r == value for r in results)
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_frame_compression_and_compressed_blobs_end_to_end(tmp_path: Path) -> None:
    """Negotiated zstd frames carry a compressible value both ways; an lz4 CipherBlob is verified on
    SET and decompressed by the client on GET; a blob with a wrong size is refused."""
    s = await start_server(tmp_path, "compression.frames=zstd", "compression.frame_threshold_bytes=1024")
    try:
        client = await s.client(frame_compression=("zstd",))
        assert client.handshake.frame_compression == "zstd"
        text = b'{"k": "value"}' * 10_000
        await client.set("c", b"json", text)
        assert await client.get("c", b"json") == text
        await client.set("c", b"blob", text, compression="lz4")
        stored = await s.root.components.backend.get("c", b"blob")
        assert stored.size == len(text) and len(stored.data) < len(text) // 10
        assert await client.get("c", b"blob") == text
        plain = await s.client()
        assert plain.handshake.frame_compression == ""
        assert await plain.get("c", b"blob") == text
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_query_cache_serves_hits_and_never_stale_values(tmp_path: Path) -> None:
    """With cache.max_bytes set, repeated GETs are hits; every write is visible at once after."""
    s = await start_server(tmp_path, "cache.max_bytes=1048576")
    try:
        client = await s.client()
        cache = s.root.components.protection.cache
        await client.set("c", b"k", b"one")
        for _ in range(5):
            assert await client.get("c", b"k") == b"one"
        assert cache.hits >= 4
        await client.set("c", b"k", b"two")
        assert await client.get("c", b"k") == b"two"
        assert await client.delete("c", b"k") is True
        assert await client.get("c", b"k") is None
        assert await client.get("c", b"k") is None  # a cached absence, answered pre-encoded
        await client.set("c", b"k", b"three")
        assert await client.get("c", b"k") == b"three"
        # A large value (over ENCODED_MAX_BYTES): its hits are answered from the bytes kept
        # around it, and the client's checksum check passes on each one.
        large = bytes(range(256)) * 20
        await client.set("c", b"large", large)
        hits = cache.hits
        for _ in range(4):
            assert await client.get("c", b"large") == large
        assert cache.hits == hits + 3
        await client.drop_collection("c")
        assert await client.get("c", b"k") is None
    finally:
        await s.close()
