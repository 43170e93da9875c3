"""The client's side of a server drain: it stops sending and closes once its answers are in."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from amaters.client import AmatersClientProtocol
from amaters.errors import ErrorCode, ShuttingDown
from amaters.proto import envelope_pb2
from amaters.protocols.framing import encode_frame


def notice() -> bytes:
    frame = envelope_pb2.Envelope(request_id=0)
    frame.error.code = ErrorCode.SERVER_SHUTTING_DOWN  # type: ignore[assignment]
    frame.error.category = 1  # type: ignore[assignment]
    frame.error.message = "the server is shutting down"
    return encode_frame(frame.SerializeToString())


def answer(request_id: int) -> bytes:
    frame = envelope_pb2.Envelope(request_id=request_id, pong=envelope_pb2.Pong())
    return encode_frame(frame.SerializeToString())


def test_after_the_notice_new_requests_fail_at_once_and_the_client_closes_when_done() -> None:
    """Once told the server is shutting down, the client sends nothing new (new requests fail with
    a retryable ShuttingDown), waits for its outstanding answer, then closes the connection."""
    transport = StringTransport()
    protocol = AmatersClientProtocol(Clock(), 30, "server")
    protocol.makeConnection(transport)
    pending = protocol.request(envelope_pb2.Envelope(ping=envelope_pb2.Ping()))
    sent_before = transport.value()
    protocol.dataReceived(notice())
    assert not transport.disconnecting
    refused: list[Failure] = []
    protocol.request(envelope_pb2.Envelope(ping=envelope_pb2.Ping())).addErrback(refused.append)
    assert refused[0].check(ShuttingDown) and refused[0].value.retryable
    assert transport.value() == sent_before, "nothing is sent after the notice"
    protocol.dataReceived(answer(1))
    assert pending.called
    assert transport.disconnecting


def test_an_idle_client_closes_on_the_notice() -> None:
    transport = StringTransport()
    protocol = AmatersClientProtocol(Clock(), 30, "server")
    protocol.makeConnection(transport)
    protocol.dataReceived(notice())
    assert transport.disconnecting
