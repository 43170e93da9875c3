"""The real server (in-process service tree) over loopback TLS, driven by the real client."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from inprocess import InProcessServer, start_server
from twisted.internet import defer, reactor, task

from amaters.client import AmatersClient, BatchOp, connect
from amaters.errors import (
    ErrorCode,
    InvalidValue,
    NetworkError,
    ShuttingDown,
    SizeExceeded,
)
from amaters.protocols.transport import EagerWriteServer
from amaters.query import operations as ops
from amaters.query.pipeline import PipelineStage, RequestContext
from amaters.tls.certs import generate_server_tls, issue_certificate

pytestmark = pytest.mark.integration


Server = InProcessServer


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    s = await start_server(tmp_path)
    try:
        yield s
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_set_get_overwrite_delete(server: Server) -> None:
    """A value round-trips; an overwrite replaces it; a delete removes it."""
    c = await server.client()
    await c.set("c", b"k", b"one")
    assert await c.get("c", b"k") == b"one"
    await c.set("c", b"k", b"two")
    assert await c.get("c", b"k") == b"two"
    assert await c.delete("c", b"k") is True
    assert await c.get("c", b"k") is None


@pytest_twisted.ensureDeferred
async def test_answers_are_sent_from_the_write_that_makes_them(server: Server) -> None:
    """The listener's connections run on the eager-write TCP transport under TLS, and a request
    answered on it leaves nothing queued for the reactor to send later."""
    c = await server.client()
    await c.set("c", b"k", b"v")
    (connection,) = server.listener.factory.connections
    tcp_transport = connection.transport.transport
    assert type(tcp_transport) is EagerWriteServer
    assert await c.get("c", b"k") == b"v"
    assert tcp_transport.queued_bytes == 0


@pytest_twisted.ensureDeferred
async def test_missing_keys(server: Server) -> None:
    """GET of a missing key is None; DELETE of a missing key is False; neither is an error."""
    c = await server.client()
    assert await c.get("nowhere", b"nothing") is None
    assert await c.delete("nowhere", b"nothing") is False
    await c.set("c", b"a", b"x")
    assert await c.get("c", b"b") is None


@pytest_twisted.ensureDeferred
async def test_empty_and_ten_megabyte_values(server: Server) -> None:
    """An empty value and a 10 MB value both come back byte for byte."""
    c = await server.client()
    await c.set("c", b"empty", b"")
    assert await c.get("c", b"empty") == b""
    big = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    await c.set("c", b"big", big)
    assert await c.get("c", b"big") == big


@pytest_twisted.ensureDeferred
async def test_binary_and_punctuation_keys(server: Server) -> None:
    """Keys with bytes 00 FF 7F 80 and punctuation-heavy keys are stored and found exactly."""
    c = await server.client()
    keys = [
        b"\x00",
        b"\xff",
        b"\x7f",
        b"\x80",
        b"\x00\xff\x7f\x80",
        b"a\x00b",
        b"!@#$%^&*()_+-=[]{}|;':\",./<>?`~ \t\n\\",
        "ключ-🔑".encode(),
    ]
    for i, k in enumerate(keys):
        await c.set("bin", k, b"value %d" % i)
    for i, k in enumerate(keys):
        assert await c.get("bin", k) == b"value %d" % i
    listed = [k for k, _ in await c.range("bin")]
    assert listed == sorted(keys)


@pytest_twisted.ensureDeferred
async def test_range_over_twenty_keys(server: Server) -> None:
    """[0005, 0015) over keys 0000..0019 gives 0005..0014 in order; start > end gives nothing."""
    c = await server.client()
    for i in range(20):
        await c.set("r", b"%04d" % i, b"v%d" % i)
    found = await c.range("r", b"0005", b"0015")
    assert found == [(b"%04d" % i, b"v%d" % i) for i in range(5, 15)]
    assert await c.range("r", b"0015", b"0005") == []
    assert len(await c.range("r", b"0005", b"0015", limit=4)) == 4


@pytest_twisted.ensureDeferred
async def test_large_range_streams_in_chunks_and_cancels(server: Server) -> None:
    """A 3000-key range arrives in bounded chunks; a cancelled scan ends without the rest."""
    c = await server.client()
    await c.batch([BatchOp.set("big", b"%05d" % i, b"x" * 100) for i in range(3000)])
    sizes = []
    async for chunk in c.scan("big"):
        sizes.append(len(chunk))
    assert sum(sizes) == 3000 and max(sizes) <= 256 and len(sizes) > 1
    stream = c.scan("big")
    first = await stream.__anext__()
    assert len(first) > 0
    await stream.cancel()
    assert await c.ping() >= 0  # the connection is still healthy


@pytest_twisted.ensureDeferred
async def test_concurrent_clients_then_a_fresh_reader(server: Server) -> None:
    """20 clients write 50 keys each at once; a fresh client then reads every value back."""
    writers = [await server.client() for _ in range(20)]

    async def write(n: int, client: AmatersClient) -> None:
        await defer.gatherResults(
            [client.set("load", b"w%02d-%02d" % (n, i), b"%d:%d" % (n, i)) for i in range(50)]
        )

    await defer.gatherResults([defer.Deferred.fromCoroutine(write(n, w)) for n, w in enumerate(writers)])
    reader = await server.client()
    for n in range(20):
        for i in range(50):
            assert await reader.get("load", b"w%02d-%02d" % (n, i)) == b"%d:%d" % (n, i)
    assert len(await reader.range("load")) == 1000


@pytest_twisted.ensureDeferred
async def test_rapid_connect_and_disconnect(server: Server) -> None:
    """Connections opened and dropped quickly (with and without a handshake) leave the server serving."""
    for _ in range(15):
        client = await connect(reactor, "127.0.0.1", server.port, ca_cert=server.ca)
        await client.close()
    for _ in range(10):
        raw = socket.create_connection(("127.0.0.1", server.port))
        raw.close()
    c = await server.client()
    assert await c.ping() >= 0
    for _ in range(100):
        if len(server.listener.factory.connections) == 1:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    assert len(server.listener.factory.connections) == 1


@pytest_twisted.ensureDeferred
async def test_bad_batch_applies_nothing(server: Server) -> None:
    """A batch with one invalid item is refused as a whole: none of its writes are visible."""
    c = await server.client()
    await c.set("b", b"keep", b"original")
    with pytest.raises(Exception) as info:
        await c.batch(
            [
                BatchOp.set("b", b"keep", b"changed"),
                BatchOp.set("b", b"new", b"value"),
                BatchOp.set("bad collection!", b"x", b"y"),
            ]
        )
    assert getattr(info.value, "code", None) == ErrorCode.VALIDATION_INVALID_COLLECTION
    assert await c.get("b", b"keep") == b"original"
    assert await c.get("b", b"new") is None


@pytest_twisted.ensureDeferred
async def test_client_side_encryption_end_to_end(server: Server, tmp_path: Path) -> None:
    """With a key file the server stores only ciphertext; a value that was not encrypted is refused."""
    from amaters.crypto import AESGCMCipher

    cipher = AESGCMCipher.generate(tmp_path / "client.key")
    c = await server.client(cipher=cipher)
    await c.set("secret", b"k", b"plaintext value")
    assert await c.get("secret", b"k") == b"plaintext value"
    stored = await server.root.components.backend.get("secret", b"k")
    assert b"plaintext" not in stored.data and stored.checksum_ok()
    other = await server.client()  # no key file: stores plaintext
    await other.set("secret", b"k2", b"not encrypted")
    with pytest.raises(InvalidValue):
        await c.get("secret", b"k2")


@pytest_twisted.ensureDeferred
async def test_alpn_and_certificate_verification(server: Server, tmp_path: Path) -> None:
    """The connection negotiates ALPN amaters/1; a client trusting another CA is refused."""
    c = await server.client()
    assert c._protocol.transport.negotiatedProtocol == b"amaters/1"  # type: ignore[union-attr]
    other = tmp_path / "other"
    generate_server_tls(other)
    with pytest.raises(NetworkError) as info:
        await connect(reactor, "127.0.0.1", server.port, ca_cert=str(other / "ca.pem"))
    assert info.value.code == ErrorCode.NETWORK_TLS_HANDSHAKE
    assert "certificate verify failed" in info.value.message


@pytest_twisted.ensureDeferred
async def test_oversize_frame_is_refused_and_closed(tmp_path: Path) -> None:
    """A frame over limits.max_frame_bytes gets an error frame and the connection closes."""
    s = await start_server(tmp_path, "limits.max_frame_bytes=4096")
    try:
        c = await s.client()
        with pytest.raises(SizeExceeded) as info:
            await c.set("c", b"k", b"x" * 8192)
        assert "max_frame_bytes" in info.value.message
        await c._protocol.close()
        assert c.closed
        fresh = await s.client()
        await fresh.set("c", b"k", b"small")
        assert await fresh.get("c", b"k") == b"small"
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_plaintext_when_tls_is_disabled(tmp_path: Path) -> None:
    """With tls.enabled = false the same protocol runs over plain TCP."""
    s = await start_server(tmp_path, "tls.enabled=false")
    try:
        c = await s.client()
        await c.set("c", b"k", b"v")
        assert await c.get("c", b"k") == b"v"
        assert not (tmp_path / "tls").exists()
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_client_certificates_when_required(tmp_path: Path) -> None:
    """With tls.client_auth = required, only clients with a certificate from tls.ca get in."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509 import load_pem_x509_certificate

    generate_server_tls(tmp_path / "tls")
    ca_key = serialization.load_pem_private_key((tmp_path / "tls" / "ca.key").read_bytes(), None)
    ca_cert = load_pem_x509_certificate((tmp_path / "tls" / "ca.pem").read_bytes())
    key, cert = issue_certificate(ca_key, ca_cert, "alice", client=True)  # type: ignore[arg-type]
    (tmp_path / "alice.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "alice.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    s = await start_server(tmp_path, f"tls.ca={tmp_path / 'tls' / 'ca.pem'}", "tls.client_auth=required")
    try:
        c = await s.client(client_cert=str(tmp_path / "alice.pem"), client_key=str(tmp_path / "alice.key"))
        assert await c.ping() >= 0
        with pytest.raises(NetworkError):
            await connect(reactor, "127.0.0.1", s.port, ca_cert=s.ca)
    finally:
        await s.close()


class Gate(PipelineStage):
    """Holds SETs until released, so a test can stop the server with requests in flight."""

    name = "gate"

    def __init__(self) -> None:
        self.held: list[defer.Deferred[None]] = []
        self.arrived: defer.Deferred[None] = defer.Deferred()

    def before(self, ctx: RequestContext, op: ops.Operation) -> object:
        if op.name != "set":
            return None
        d: defer.Deferred[None] = defer.Deferred()
        self.held.append(d)
        if not self.arrived.called:
            self.arrived.callback(None)
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d in held:
            d.callback(None)


@pytest_twisted.ensureDeferred
async def test_drain_on_stop(tmp_path: Path) -> None:
    """On stop: in-flight requests finish, new ones get SERVER_SHUTTING_DOWN, then connections close."""
    s = await start_server(tmp_path)
    gate = Gate()
    s.root.components.pipeline.add_stage(gate)
    c = await s.client()
    inflight = c.set("c", b"k", b"v")
    await gate.arrived
    stopping = s.root.stopService()
    assert not s.listener.is_accepting
    with pytest.raises(ShuttingDown) as info:
        await c.get("c", b"k")
    assert info.value.retryable
    with pytest.raises(NetworkError) as refused:
        await connect(reactor, "127.0.0.1", s.port, ca_cert=s.ca, timeout=5)
    assert refused.value.code == ErrorCode.NETWORK_CONNECTION_REFUSED
    assert not stopping.called
    gate.release()
    await inflight  # the request in flight completed successfully
    await stopping
    await c._protocol.close()
    assert c.closed
    await s.close()
