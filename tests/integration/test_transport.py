"""The eager-write TCP transport on real loopback sockets: a write goes out from ``write`` itself when
nothing is queued, what the socket does not take is queued in order behind it, and a connection
being aborted sends nothing more."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task

from amaters.protocols.transport import EagerWriteServer, send_eagerly

pytestmark = pytest.mark.integration


class Peer(protocol.Protocol):
    """Collects what arrives; ``closed`` fires with the bytes once the connection is gone."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(bytes(self.received))


class ServerSide(protocol.Protocol):
    """The server's end: hands itself to the test once connected."""

    def __init__(self, connected: defer.Deferred[ServerSide]) -> None:
        self._connected = connected

    def connectionMade(self) -> None:
        self._connected.callback(self)


async def connected_pair() -> tuple[Any, ServerSide, Peer]:
    """A listening port made eager, one client connected to it: (port, server side, client side)."""
    server_side: defer.Deferred[ServerSide] = defer.Deferred()
    factory = protocol.Factory.forProtocol(lambda: ServerSide(server_side))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    assert send_eagerly(port)
    client = Peer()
    await protocol.ClientCreator(reactor, lambda: client).connectTCP(  # type: ignore[no-untyped-call]
        "127.0.0.1", port.getHost().port
    )
    server = await server_side
    assert type(server.transport) is EagerWriteServer
    return port, server, client


def drain(sock: socket.socket) -> bytes:
    """Everything the kernel holds for ``sock`` and lets through within a few milliseconds."""
    got = bytearray()
    for _ in range(5):
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            got += chunk
        time.sleep(0.002)  # let loopback move the sender's queued bytes across
    return bytes(got)


@pytest_twisted.ensureDeferred
async def test_a_write_with_nothing_queued_is_sent_from_write() -> None:
    """Nothing stays queued and the reactor is not asked to watch for writability: the bytes were
    sent by ``write``.  Twisted's own transport would hold them until its next iteration."""
    port, server, client = await connected_pair()
    try:
        transport: Any = server.transport
        transport.write(b"answer " * 100)
        assert transport.queued_bytes == 0 and transport.drained
        assert transport not in reactor.getWriters()  # type: ignore[attr-defined]
        transport.loseConnection()
        assert await client.closed == b"answer " * 100
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_is_queued_in_order() -> None:
    """A client that does not read fills the socket: the rest of a large write is queued, a later
    small write queues behind it (never overtakes it), and everything arrives in order."""
    port, server, client = await connected_pair()
    try:
        assert client.transport is not None
        client.transport.pauseProducing()  # type: ignore[attr-defined]
        transport: Any = server.transport
        transport.bufferSize = 64 * 1024 * 1024  # no producer pausing in the way of the test
        big = bytes(range(256)) * (32 * 1024 * 1024 // 256)
        transport.write(big)
        left = transport.queued_bytes
        assert 0 < left < len(big), "the socket took all of 32 MiB or none of it"
        assert not transport.drained
        # Read what reached the client behind the reactor's back: the server's socket has room
        # again while part of the write is still queued, so a send now would overtake it.
        early = drain(client.transport.socket)  # type: ignore[attr-defined]
        assert early
        transport.write(b"tail")
        assert transport.queued_bytes == left + 4 and not transport.drained
        client.transport.resumeProducing()  # type: ignore[attr-defined]
        transport.loseConnection()
        received = early + await client.closed
        assert len(received) == len(big) + 4
        assert received == big + b"tail"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_aborted_connection_sends_nothing_more() -> None:
    """After ``abortConnection`` a write is dropped, as Twisted's transport drops it."""
    port, server, client = await connected_pair()
    try:
        transport: Any = server.transport
        transport.abortConnection()
        transport.write(b"must not arrive")
        assert await client.closed == b""
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_only_plain_tcp_ports_are_changed(tmp_path: Path) -> None:
    """A UNIX socket's port is left as it is."""
    port = reactor.listenUNIX(str(tmp_path / "s"), protocol.Factory())  # type: ignore[attr-defined]
    try:
        transport = port.transport
        assert not send_eagerly(port)
        assert port.transport is transport
    finally:
        await port.stopListening()
    await task.deferLater(reactor, 0, lambda: None)
