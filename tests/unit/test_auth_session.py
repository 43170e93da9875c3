"""The protocol's side of cred: the session holds the avatar and logs it out when the connection
ends, even when the login finishes after the client left; the peer certificate chain is handed on."""

from __future__ import annotations

from typing import Any

import jwt
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from amaters.auth.jwt import JWTChecker, load_jwt_keys
from amaters.auth.realm import PortalAuthenticator, build_portal
from amaters.auth.throttle import AuthThrottle
from amaters.config import JWTConfig, LimitsConfig
from amaters.interfaces import IPrincipal
from amaters.proto import envelope_pb2, types_pb2
from amaters.protocols.framing import FrameDecoder, encode_frame
from amaters.protocols.server import AmatersServerFactory, AmatersServerProtocol, _peer_certificate_chain
from amaters.query.executor import QueryExecutor
from amaters.query.pipeline import QueryPipeline
from amaters.storage.memory import MemoryBackend

SECRET = "session-test-secret-0123456789abcdef"


class Sink:
    def emit(self, event: object) -> None:
        pass


def server(authenticate: Any, clock: Clock) -> tuple[AmatersServerProtocol, StringTransport]:
    backend = MemoryBackend()
    backend.open()
    limits = LimitsConfig()
    factory = AmatersServerFactory(QueryPipeline(QueryExecutor(backend), limits), limits, clock, authenticate)
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, AmatersServerProtocol)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def handshake(protocol: AmatersServerProtocol, token: str) -> None:
    hs = envelope_pb2.Handshake(version=types_pb2.Version(major=1), client_name="test")
    hs.credentials.bearer_token = token
    envelope = envelope_pb2.Envelope(request_id=1, handshake=hs)
    protocol.dataReceived(encode_frame(envelope.SerializeToString()))


def answers(transport: StringTransport) -> list[str | None]:
    out = []
    for frame in FrameDecoder(2**31 - 1).feed(transport.value()):
        envelope = envelope_pb2.Envelope()
        envelope.ParseFromString(frame)
        out.append(envelope.WhichOneof("body"))
    return out


def portal_authenticator(clock: Clock) -> tuple[PortalAuthenticator, Any]:
    settings = JWTConfig(secret=SECRET)
    keys = load_jwt_keys(settings)
    assert keys is not None
    portal, realm = build_portal([JWTChecker(keys, settings, clock)])
    return PortalAuthenticator(portal, AuthThrottle(clock, 5), Sink()), realm


def test_session_logs_out_on_disconnect() -> None:
    """A logged-in connection holds one session in the realm until the connection is lost."""
    clock = Clock()
    clock.advance(1_750_000_000)
    authenticator, realm = portal_authenticator(clock)
    protocol, transport = server(authenticator, clock)
    handshake(protocol, jwt.encode({"sub": "a", "exp": 1_750_000_300}, SECRET))
    assert answers(transport) == ["handshake_response"]
    assert realm.session_count == 1
    protocol.connectionLost()
    assert realm.session_count == 0


def test_login_finishing_after_the_client_left_is_logged_out() -> None:
    """If the client disconnects while its login is still running, the avatar is logged out at once."""
    clock = Clock()
    pending: defer.Deferred[IPrincipal] = defer.Deferred()
    logged_out: list[bool] = []

    class Avatar:
        id = name = "a"
        roles = ("reader",)
        auth_method = "jwt"

        def logout(self) -> None:
            logged_out.append(True)

    protocol, _ = server(lambda credentials, peer, source: pending, clock)
    handshake(protocol, "anything")
    protocol.connectionLost()
    pending.callback(Avatar())  # type: ignore[arg-type]
    assert logged_out == [True]
    assert protocol.session is None


def test_peer_chain_includes_the_verified_intermediates() -> None:
    """The authenticator gets the leaf, then the rest of the chain OpenSSL verified it with."""

    class Handle:
        def __init__(self, chain: list[str] | None) -> None:
            self.chain = chain

        def get_verified_chain(self) -> list[str] | None:
            return self.chain

    class Transport:
        def __init__(self, leaf: str | None, chain: list[str] | None) -> None:
            self.leaf, self.handle = leaf, Handle(chain)

        def getPeerCertificate(self) -> str | None:
            return self.leaf

        def getHandle(self) -> Handle:
            return self.handle

    assert _peer_certificate_chain(Transport(None, None)) is None
    assert _peer_certificate_chain(Transport("leaf", None)) == "leaf"
    assert _peer_certificate_chain(Transport("leaf", ["leaf", "intermediate", "root"])) == [
        "leaf",
        "intermediate",
        "root",
    ]
