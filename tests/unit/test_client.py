"""The Twisted client against the real server protocol over an in-memory connection; the cipher."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient

from amaters.client import AmatersClient, AmatersClientProtocol, BatchOp, _handshake
from amaters.config import LimitsConfig
from amaters.crypto import AESGCMCipher, DecryptionError, KeyFileError
from amaters.errors import (
    ErrorCategory,
    ErrorCode,
    InvalidCollection,
    InvalidValue,
    NetworkError,
    RequestTimeout,
    SizeExceeded,
)
from amaters.proto import envelope_pb2
from amaters.protocols.framing import encode_frame
from amaters.protocols.server import AmatersServerFactory
from amaters.query.executor import QueryExecutor
from amaters.query.pipeline import QueryPipeline
from amaters.storage.memory import MemoryBackend


@attrs.define
class Pair:
    client: AmatersClient
    protocol: AmatersClientProtocol
    factory: AmatersServerFactory
    pump: IOPump
    clock: Clock

    def wait(self, d: defer.Deferred[Any]) -> Any:
        """Pump bytes both ways until ``d`` fires; its result (or raise its failure)."""
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(1000):
            if results:
                break
            self.pump.pump()
        assert results, "no answer"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]


def pair(limits: LimitsConfig | None = None, cipher: AESGCMCipher | None = None, timeout: float = 30) -> Pair:
    clock = Clock()
    limits = limits or LimitsConfig()
    backend = MemoryBackend()
    backend.open()
    factory = AmatersServerFactory(
        QueryPipeline(QueryExecutor(backend, range_chunk_size=2), limits), limits, clock
    )
    protocol = AmatersClientProtocol(clock, timeout, "test-server")
    client_protocol, _, pump = connectedServerAndClient(
        lambda: factory.buildProtocol(None), lambda: protocol, greet=False, clock=clock
    )
    assert client_protocol is protocol
    d = defer.Deferred.fromCoroutine(_handshake(protocol, "test", None, None))
    results: list[Any] = []
    d.addBoth(results.append)
    pump.flush()
    handshake = results[0]
    return Pair(AmatersClient(protocol, handshake, cipher, clock), protocol, factory, pump, clock)


def test_round_trip_of_every_operation() -> None:
    """set, get, get_blob, delete, range, batch, collections, info, health and ping all work."""
    p = pair()
    c = p.client
    assert c.handshake.principal == "anonymous"
    p.wait(c.set("c", b"k", b"v"))
    assert p.wait(c.get("c", "k")) == b"v"
    blob = p.wait(c.get_blob("c", b"k"))
    assert blob.data == b"v" and blob.checksum_ok() and blob.size == 1
    assert p.wait(c.delete("c", b"k")) is True
    assert p.wait(c.delete("c", b"k")) is False
    assert p.wait(c.get("c", b"k")) is None
    for i in range(5):
        p.wait(c.set("r", b"%02d" % i, b"%d" % i))
    assert p.wait(c.range("r", b"01", b"04")) == [(b"01", b"1"), (b"02", b"2"), (b"03", b"3")]
    assert p.wait(c.range("r", limit=2)) == [(b"00", b"0"), (b"01", b"1")]
    results = p.wait(c.batch([BatchOp.set("b", "x", b"1"), BatchOp.get("b", "x"), BatchOp.delete("b", "x")]))
    assert results == [None, b"1", True]
    assert p.wait(c.create_collection("new")) is True
    assert p.wait(c.list_collections()) == ["b", "c", "new", "r"]
    assert p.wait(c.drop_collection("new")) is True
    info = p.wait(c.server_info())
    assert info.version[0] == 1 and "get" in info.capabilities
    assert p.wait(c.health_check()) == (True, "serving")
    assert p.wait(c.ping(b"x")) >= 0


def test_pipelined_requests_resolve_to_their_own_answers() -> None:
    """Many requests sent before any answer each get their own result."""
    p = pair()
    c = p.client
    sets = [c.set("c", b"k%d" % i, b"v%d" % i) for i in range(50)]
    gets = [c.get("c", b"k%d" % i) for i in range(50)]
    p.wait(defer.gatherResults(sets))
    assert p.wait(defer.gatherResults(gets)) == [b"v%d" % i for i in range(50)]


def test_server_errors_become_typed_exceptions() -> None:
    """A server error is raised as the AmatersError subclass for its code, with its category."""
    p = pair(limits=LimitsConfig(max_value_bytes=4))
    with pytest.raises(InvalidCollection) as info:
        p.wait(p.client.get("bad name", b"k"))
    assert info.value.code == ErrorCode.VALIDATION_INVALID_COLLECTION
    assert info.value.category == ErrorCategory.CLIENT_ERROR and not info.value.retryable
    with pytest.raises(SizeExceeded):
        p.wait(p.client.set("c", b"k", b"too long"))


def test_scan_streams_chunks_and_can_be_cancelled() -> None:
    """scan() yields the server's chunks in order; cancel() ends the stream early."""
    p = pair()
    for i in range(6):
        p.wait(p.client.set("c", b"%d" % i, b"v"))

    async def collect() -> list[list[bytes]]:
        chunks = []
        async for chunk in p.client.scan("c"):
            chunks.append([k for k, _ in chunk])
        return chunks

    assert p.wait(defer.Deferred.fromCoroutine(collect())) == [[b"0", b"1"], [b"2", b"3"], [b"4", b"5"]]
    stream = p.client.scan("c")
    p.wait(stream.cancel())
    assert stream.total_count is not None and stream.total_count <= 6


def test_request_timeout_fails_only_that_request() -> None:
    """A request without an answer within the timeout fails with a retryable NETWORK_TIMEOUT."""
    p = pair(timeout=5)
    d = p.client.get("c", b"k")  # not pumped: the server never sees it
    failures: list[Failure] = []
    d.addErrback(failures.append)
    p.clock.advance(5)
    assert failures and failures[0].check(RequestTimeout)
    assert failures[0].value.retryable
    assert p.wait(p.client.get("c", b"k")) is None


def test_connection_loss_fails_pending_requests() -> None:
    """Requests pending when the connection drops fail with a NetworkError."""
    clock = Clock()
    protocol = AmatersClientProtocol(clock, 30, "somewhere")
    protocol.makeConnection(StringTransport())
    d = protocol.request(envelope_pb2.Envelope(ping=envelope_pb2.Ping()))
    failures: list[Failure] = []
    d.addErrback(failures.append)
    protocol.connectionLost(Failure(ConnectionError("reset")))
    assert failures[0].check(NetworkError)
    assert failures[0].value.code == ErrorCode.NETWORK_CONNECTION_RESET
    assert protocol.request(envelope_pb2.Envelope(ping=envelope_pb2.Ping())).called


def test_connection_error_from_the_server_is_what_pending_requests_see() -> None:
    """When the server sends a connection-level error (id 0) and closes, pending requests get it."""
    clock = Clock()
    protocol = AmatersClientProtocol(clock, 30, "somewhere")
    protocol.makeConnection(StringTransport())
    d = protocol.request(envelope_pb2.Envelope(ping=envelope_pb2.Ping()))
    failures: list[Failure] = []
    d.addErrback(failures.append)
    error = envelope_pb2.Envelope(request_id=0)
    error.error.code = ErrorCode.VALIDATION_SIZE_EXCEEDED  # type: ignore[assignment]
    error.error.message = "frame too large"
    protocol.dataReceived(encode_frame(error.SerializeToString()))
    protocol.connectionLost(Failure(ConnectionError("closed")))
    assert failures[0].check(SizeExceeded)
    assert failures[0].value.message == "frame too large"


def test_answers_after_a_timeout_are_ignored() -> None:
    """A late answer to a timed-out request is dropped without disturbing later requests."""
    p = pair(timeout=1)
    late = p.client.get("c", b"k")
    late.addErrback(lambda f: None)
    p.clock.advance(1)
    p.pump.flush()
    assert p.wait(p.client.ping()) >= 0


# -- client-side encryption --------------------------------------------------------------------


def test_cipher_keeps_plaintext_off_the_server(tmp_path: Path) -> None:
    """With a cipher the server stores ciphertext; the client reads back the plaintext."""
    cipher = AESGCMCipher.generate(tmp_path / "k.key")
    p = pair(cipher=cipher)
    p.wait(p.client.set("c", b"k", b"attack at dawn"))
    stored = p.wait(p.client.get_blob("c", b"k"))
    assert b"attack" not in stored.data
    assert p.wait(p.client.get("c", b"k")) == b"attack at dawn"
    assert p.wait(p.client.range("c")) == [(b"k", b"attack at dawn")]


def test_ciphertext_is_bound_to_its_key(tmp_path: Path) -> None:
    """A ciphertext moved to another key (or collection) fails to decrypt instead of lying."""
    cipher = AESGCMCipher.generate(tmp_path / "k.key")
    sealed = cipher.encrypt(b"secret", "c", b"a")
    assert cipher.decrypt(sealed, "c", b"a") == b"secret"
    with pytest.raises(DecryptionError):
        cipher.decrypt(sealed, "c", b"b")
    with pytest.raises(DecryptionError):
        cipher.decrypt(sealed, "d", b"a")
    with pytest.raises(DecryptionError):
        cipher.decrypt(sealed[:-1] + bytes([sealed[-1] ^ 1]), "c", b"a")
    assert issubclass(DecryptionError, InvalidValue)


def test_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    """keygen writes mode 0600, refuses to replace a key file, and from_file reads it back."""
    path = tmp_path / "k.key"
    cipher = AESGCMCipher.generate(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(KeyFileError):
        AESGCMCipher.generate(path)
    loaded = AESGCMCipher.from_file(path)
    assert loaded.decrypt(cipher.encrypt(b"x", "c", b"k"), "c", b"k") == b"x"
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(KeyFileError):
        AESGCMCipher.from_file(tmp_path / "bad.key")
    with pytest.raises(KeyFileError):
        AESGCMCipher.from_file(tmp_path / "missing.key")


def test_keep_alive_pings_beat_the_idle_timeout() -> None:
    """With limits.idle_timeout = 1 s, a client pinging every 0.3 s stays connected for 2 s of clock
    time while a quiet client on the same server is closed after 1 s."""
    limits = LimitsConfig(idle_timeout=1.0)
    alive = pair(limits=limits)
    quiet = pair(limits=limits)
    alive.client.start_keepalive(0.3)
    for _ in range(20):  # 2 s in steps of 0.1 s, bytes pumped both ways after each step
        for p in (alive, quiet):
            p.clock.advance(0.1)
            p.pump.flush()
    assert quiet.client.closed
    assert not alive.client.closed
    assert alive.wait(alive.client.ping()) >= 0
    alive.client.stop_keepalive()


def test_a_large_value_tail_parses_as_the_same_set() -> None:
    """The rest of a SET followed by its value as a second encoding of the same field parses as the
    one message a plain encoding gives (protobuf merges repeated message fields)."""
    from amaters.client import _value_tail
    from amaters.proto import envelope_pb2
    from amaters.proto.convert import fill_blob
    from amaters.types import CipherBlob, crc32

    data = bytes(range(256)) * 5000  # over 127 bytes: multi-byte lengths at every level
    whole = envelope_pb2.Envelope(request_id=7)
    query = whole.query.query.set
    query.collection = "c"
    query.key.data = b"k"
    fill_blob(query.value, CipherBlob.wrap(data, created_at=1))

    head = envelope_pb2.Envelope(request_id=7)
    query = head.query.query.set
    query.collection = "c"
    query.key.data = b"k"
    fill_blob(query.value, CipherBlob(b"", crc32(data), len(data), created_at=1))
    parsed = envelope_pb2.Envelope()
    parsed.ParseFromString(head.SerializeToString() + b"".join(_value_tail(data)))
    assert parsed == whole
