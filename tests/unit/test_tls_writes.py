"""The native listener's TLS layer encrypts and sends each write at once.

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


def connect(tmp_path: Path, server_factory: Any, clock: Clock) -> tuple[Collecting, IOPump]:
    client_app = Collecting()
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
