"""The native listener's TLS layer encrypts and sends each write at once, and tells a protocol
where a read holding several TLS records begins and ends.

The native protocol joins the answers of one read into one write itself, so the TLS layer under it
must not hold that write for another reactor iteration as Twisted's default TLS transport does.
Real OpenSSL on both sides, in memory (no sockets); the client keeps Twisted's default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import IOPump, connectedServerAndClient
from zope.interface import implementer

from amaters.interfaces import IReadScope
from amaters.tls.certs import generate_server_tls
from amaters.tls.context import (
    BatchedWritesTLSFactory,
    ReloadableServerTLS,
    client_tls_options,
    server_tls_options,
)


class Answering(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"answer to " + data)  # type: ignore[union-attr]


class Collecting(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def handshaken(
    tmp_path: Path, server_factory: Any, clock: Clock, client_app: protocol.Protocol
) -> tuple[Any, IOPump]:
    """A client (Twisted's default TLS) connected in memory to ``server_factory``, handshake done:
    the client's TLS protocol and the pump between them."""
    client_factory = TLSMemoryBIOFactory(
        client_tls_options("localhost", tmp_path / "ca.pem"),
        True,
        protocol.Factory.forProtocol(lambda: client_app),
        clock=clock,
    )
    client_tls, _, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None), clock=clock
    )
    pump.flush()  # the handshake
    return client_tls, pump


def connect(tmp_path: Path, server_factory: Any, clock: Clock) -> tuple[Collecting, IOPump]:
    client_app = Collecting()
    client_tls, pump = handshaken(tmp_path, server_factory, clock, client_app)
    client_tls.write(b"GET k")
    clock.advance(0)  # the client's own TLS transport sends on the next iteration
    pump.pump(advanceClock=False)  # the request reaches the server, which answers it
    return client_app, pump


@pytest.fixture()
def options(tmp_path: Path) -> Any:
    generate_server_tls(tmp_path, "localhost")
    return server_tls_options(tmp_path / "server.pem", tmp_path / "server.key")


def test_an_answer_leaves_in_the_iteration_that_wrote_it(tmp_path: Path, options: Any) -> None:
    clock = Clock()
    factory = BatchedWritesTLSFactory(ReloadableServerTLS(options), protocol.Factory.forProtocol(Answering))
    client, pump = connect(tmp_path, factory, clock)
    pump.pump(advanceClock=False)  # no reactor iteration between the write and the socket
    assert client.received == b"answer to GET k"
    assert not clock.getDelayedCalls()


def test_twisted_default_would_hold_it_for_another_iteration(tmp_path: Path, options: Any) -> None:
    # What the factory above avoids, so that the test above would notice a return to the default.
    clock = Clock()
    factory = TLSMemoryBIOFactory(
        ReloadableServerTLS(options), False, protocol.Factory.forProtocol(Answering), clock=clock
    )
    client, pump = connect(tmp_path, factory, clock)
    pump.pump(advanceClock=False)
    assert client.received == b""
    assert clock.getDelayedCalls()
    pump.flush()
    assert client.received == b"answer to GET k"


@implementer(IReadScope)
class Scoped(protocol.Protocol):
    """Records what the TLS layer hands over; raises on the piece numbered ``fail_at``."""

    def __init__(self, fail_at: int = -1) -> None:
        self.events: list[Any] = []
        self.fail_at = fail_at

    def readStarted(self) -> None:
        self.events.append("start")

    def readFinished(self) -> None:
        self.events.append("finish")

    def dataReceived(self, data: bytes) -> None:
        self.events.append(len(data))
        if len(self.events) - 1 == self.fail_at:
            raise RuntimeError("a piece failed")


def scoped_pair(tmp_path: Path, options: Any, app: protocol.Protocol) -> tuple[Any, IOPump, Clock]:
    clock = Clock()
    factory = BatchedWritesTLSFactory(ReloadableServerTLS(options), protocol.Factory.forProtocol(lambda: app))
    client_tls, pump = handshaken(tmp_path, factory, clock, Collecting())
    return client_tls, pump, clock


def test_a_read_of_several_records_is_scoped(tmp_path: Path, options: Any) -> None:
    """40 KiB sent in one write arrive in one read of three records, delivered between
    readStarted and readFinished; a small read passes straight through."""
    app = Scoped()
    client_tls, pump, clock = scoped_pair(tmp_path, options, app)
    client_tls.write(b"x" * 40_000)
    clock.advance(0)
    pump.pump(advanceClock=False)
    assert app.events == ["start", 16384, 16384, 40_000 - 2 * 16384, "finish"]
    app.events.clear()
    client_tls.write(b"y" * 100)
    clock.advance(0)
    pump.pump(advanceClock=False)
    assert app.events == [100]


def test_a_read_ends_even_when_a_record_raises(tmp_path: Path, options: Any) -> None:
    app = Scoped(fail_at=2)
    client_tls, pump, clock = scoped_pair(tmp_path, options, app)
    client_tls.write(b"x" * 40_000)
    clock.advance(0)
    with pytest.raises(RuntimeError, match="a piece failed"):
        pump.pump(advanceClock=False)
    assert app.events == ["start", 16384, 16384, "finish"]


def test_a_protocol_without_the_scope_gets_the_records_alone(tmp_path: Path, options: Any) -> None:
    app = Collecting()
    client_tls, pump, clock = scoped_pair(tmp_path, options, app)
    client_tls.write(b"x" * 40_000)
    clock.advance(0)
    pump.pump(advanceClock=False)
    assert app.received == b"x" * 40_000
