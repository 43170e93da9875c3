"""CipherBlob compression checks on SET, and per-frame compression negotiated in the handshake."""

from __future__ import annotations

import os
from typing import Any

import attrs
import lz4.frame
import pytest
import zstandard
from protocol_helpers import make, q_get, q_set
from twisted.internet import defer

from amaters.config import CompressionConfig, LimitsConfig, default_config
from amaters.errors import ErrorCode, InvalidValue, MalformedMessage, SizeExceeded
from amaters.protect.compression import (
    BlobCompressionStage,
    FrameCompressionPolicy,
    check_blob,
    compress_blob_data,
    compress_frame,
    decompress_blob_data,
    decompress_frame,
    decompressed_length,
)
from amaters.proto import envelope_pb2, types_pb2
from amaters.protocols.framing import encode_frame
from amaters.protocols.server import ANONYMOUS
from amaters.query import operations as ops
from amaters.query.pipeline import RequestContext
from amaters.types import CipherBlob, Compression, crc32

Envelope = envelope_pb2.Envelope
TEXT = b'{"name": "alice", "balance": 100}\n' * 2000


def compressed(data: bytes, algorithm: Compression, size: int | None = None) -> CipherBlob:
    stored = compress_blob_data(data, algorithm)
    return CipherBlob(stored, crc32(stored), len(data) if size is None else size, algorithm)


@pytest.mark.parametrize("algorithm", [Compression.LZ4, Compression.ZSTD])
def test_valid_compressed_blobs_pass(algorithm: Compression) -> None:
    """A blob that decompresses to exactly metadata.size bytes is accepted, empty ones included."""
    for data in (TEXT, b"", os.urandom(1000)):
        check_blob(compressed(data, algorithm), 1 << 30)
        assert decompress_blob_data(compress_blob_data(data, algorithm), algorithm, len(data)) == data


@pytest.mark.parametrize("algorithm", [Compression.LZ4, Compression.ZSTD])
def test_wrong_size_corrupt_or_truncated_blobs_are_invalid_values(algorithm: Compression) -> None:
    """A wrong metadata.size, corrupt data, truncated data or trailing garbage: VALIDATION_INVALID_VALUE."""
    with pytest.raises(InvalidValue) as info:
        check_blob(compressed(TEXT, algorithm, size=len(TEXT) - 1), 1 << 30)
    assert info.value.code == ErrorCode.VALIDATION_INVALID_VALUE and "metadata.size" in info.value.message
    with pytest.raises(InvalidValue):
        check_blob(compressed(TEXT, algorithm, size=len(TEXT) + 1), 1 << 30)
    stored = compress_blob_data(TEXT, algorithm)
    for bad in (b"not compressed at all", stored[:-4], stored + b"junk"):
        with pytest.raises(InvalidValue):
            check_blob(CipherBlob(bad, crc32(bad), len(TEXT), algorithm), 1 << 30)
    with pytest.raises(InvalidValue):
        decompress_blob_data(stored[:-4], algorithm, len(TEXT))


def test_claimed_size_over_the_value_limit_is_refused_before_decompressing() -> None:
    """metadata.size over limits.max_value_bytes is VALIDATION_SIZE_EXCEEDED."""
    with pytest.raises(SizeExceeded):
        check_blob(compressed(TEXT, Compression.ZSTD), len(TEXT) - 1)


def test_a_decompression_bomb_costs_only_the_claimed_size() -> None:
    """1 GB of zeros in a few KB: counting stops just past the claimed size, with bounded memory."""
    bomb = zstandard.ZstdCompressor().compress(bytes(64 * 1024 * 1024))
    assert len(bomb) < 10_000
    assert decompressed_length(bomb, Compression.ZSTD, 100_000) <= 100_000 + 64 * 1024
    with pytest.raises(InvalidValue):
        check_blob(CipherBlob(bomb, crc32(bomb), 100_000, Compression.ZSTD), 1 << 30)
    lz = lz4.frame.compress(bytes(8 * 1024 * 1024))
    assert decompressed_length(lz, Compression.LZ4, 1000) <= 1000 + 64 * 1024


class Pool:
    """A cpu pool stand-in that runs work when the test says."""

    def __init__(self) -> None:
        self.work: list[tuple[Any, defer.Deferred[Any]]] = []

    def run(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.work.append((lambda: f(*args), d))
        return d

    def finish(self) -> None:
        work, self.work = self.work, []
        for f, d in work:
            try:
                d.callback(f())
            except Exception:
                d.errback()


def ctx() -> RequestContext:
    return RequestContext(1, ANONYMOUS, "127.0.0.1:1")


def test_stage_checks_small_blobs_inline_and_large_ones_in_the_pool() -> None:
    """Small compressed blobs are checked at once; large ones in the cpu pool; plain ones not at all."""
    pool = Pool()
    stage = BlobCompressionStage(CompressionConfig(pool_threshold_bytes=1000), LimitsConfig(), pool)
    assert stage.before(ctx(), ops.Set("c", b"k", CipherBlob.wrap(b"plain"))) is None
    assert stage.before(ctx(), ops.Get("c", b"k")) is None
    small_bad = CipherBlob(b"xx", crc32(b"xx"), 5, Compression.LZ4)
    with pytest.raises(InvalidValue):
        stage.before(ctx(), ops.Batch((ops.Set("c", b"a", small_bad),)))
    large = os.urandom(5000)
    large_bad = compressed(large, Compression.ZSTD, size=4999)
    assert len(large_bad.data) > 1000
    d = stage.before(ctx(), ops.Set("c", b"k", large_bad))
    assert isinstance(d, defer.Deferred) and not d.called
    pool.finish()
    failure = d.result
    d.addErrback(lambda _: None)
    assert isinstance(failure.value, InvalidValue)
    ok = stage.before(ctx(), ops.Set("c", b"k", compressed(large, Compression.ZSTD)))
    assert isinstance(ok, defer.Deferred)
    pool.finish()
    assert ok.called and ok.result is None


def test_stage_can_be_turned_off_and_reloaded() -> None:
    """verify_blobs = false skips the check; a reload applies new settings when committed."""
    stage = BlobCompressionStage(CompressionConfig(verify_blobs=False), LimitsConfig(), Pool())
    bad = CipherBlob(b"xx", crc32(b"xx"), 5, Compression.LZ4)
    assert stage.before(ctx(), ops.Set("c", b"k", bad)) is None
    old = default_config()
    commit = stage.prepare_reload(old, old)
    assert commit is not None
    commit()
    with pytest.raises(InvalidValue):
        stage.before(ctx(), ops.Set("c", b"k", bad))
    assert stage.prepare_reload(old, old) is None


# -- frames --------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["zstd", "lz4"])
def test_frames_round_trip_and_incompressible_ones_stay_plain(algorithm: str) -> None:
    """A compressible payload becomes a smaller CompressedFrame that decompresses back; random
    bytes (like ciphertext) are left uncompressed."""
    payload = Envelope(request_id=7, ping=envelope_pb2.Ping(payload=TEXT)).SerializeToString()
    wire = compress_frame(payload, algorithm)
    assert wire is not None and len(wire) < len(payload) / 10
    outer = Envelope()
    outer.ParseFromString(wire)
    assert outer.WhichOneof("body") == "compressed"
    assert decompress_frame(outer.compressed, 1 << 20) == payload
    assert compress_frame(os.urandom(100_000), algorithm) is None


def test_compressed_frames_over_the_limit_or_lying_are_refused() -> None:
    """A declared size over the frame limit, or data that does not match it, is refused."""
    payload = b"a" * 100_000
    outer = Envelope()
    outer.ParseFromString(compress_frame(payload, "zstd") or b"")
    with pytest.raises(SizeExceeded):
        decompress_frame(outer.compressed, 50_000)
    outer.compressed.size = 99_999
    with pytest.raises(MalformedMessage):
        decompress_frame(outer.compressed, 1 << 20)
    outer.compressed.algorithm = types_pb2.COMPRESSION_NONE
    with pytest.raises(MalformedMessage):
        decompress_frame(outer.compressed, 1 << 20)


def test_policy_negotiates_the_servers_first_choice_the_client_offered() -> None:
    """The server's order wins among what the client offered; nothing common means none."""
    policy = FrameCompressionPolicy(CompressionConfig(frames=["zstd", "lz4"]))
    assert policy.negotiate(["lz4", "zstd"]) == "zstd"
    assert policy.negotiate(["lz4"]) == "lz4"
    assert policy.negotiate(["gzip"]) == ""
    assert FrameCompressionPolicy(CompressionConfig()).negotiate(["zstd"]) == ""
    old = default_config()
    new = attrs.evolve(old, compression=CompressionConfig(frames=["lz4"]))
    commit = FrameCompressionPolicy(old.compression).prepare_reload(old, new)
    assert commit is not None


def test_server_negotiates_then_compresses_large_answers_and_accepts_compressed_requests() -> None:
    """With compression.frames = [zstd], a client offering zstd gets it in the handshake answer;
    large answers come compressed, small ones plain, and a compressed request is understood."""
    h = make()
    h.factory.frame_compression = FrameCompressionPolicy(
        CompressionConfig(frames=["zstd"], frame_threshold_bytes=1000)
    )
    hs = envelope_pb2.Handshake(
        version=types_pb2.Version(major=1), client_name="t", frame_compression=["lz4", "zstd"]
    )
    h.send(Envelope(request_id=1, handshake=hs))
    (answer,) = h.received()
    response = answer.handshake_response
    assert response.frame_compression == "zstd" and response.frame_compression_threshold == 1000
    value = b"compressible " * 500
    request = q_set(2, "c", b"k", value).SerializeToString()
    wire = compress_frame(request, "zstd")
    assert wire is not None
    h.protocol.dataReceived(encode_frame(wire))
    (stored,) = h.received()
    assert stored.request_id == 2 and stored.query_response.HasField("result")
    h.send(q_get(3, "c", b"k"))
    (outer,) = h.received()
    assert outer.WhichOneof("body") == "compressed"
    inner = Envelope()
    inner.ParseFromString(decompress_frame(outer.compressed, 1 << 20))
    assert inner.request_id == 3 and inner.query_response.result.single.value.data == value
    h.send(q_get(4, "c", b"missing"))
    (small,) = h.received()
    assert small.WhichOneof("body") == "query_response"


def test_compressed_frames_without_negotiation_are_refused_but_the_connection_stays() -> None:
    """A compressed frame when none was negotiated gets an error; the connection keeps working."""
    h = make()
    assert h.handshake().handshake_response.frame_compression == ""
    inner = q_get(2, "c", b"k").SerializeToString()
    wire = Envelope(
        compressed=envelope_pb2.CompressedFrame(
            algorithm=types_pb2.COMPRESSION_ZSTD, size=len(inner), data=zstandard.compress(inner)
        )
    ).SerializeToString()
    h.protocol.dataReceived(encode_frame(wire))
    (refused,) = h.received()
    assert refused.error.code == ErrorCode.PROTOCOL_INVALID_REQUEST
    h.send(q_get(3, "c", b"k"))
    (ok,) = h.received()
    assert ok.request_id == 3 and not h.closing


def test_a_compressed_frame_bomb_is_refused_without_inflating_it() -> None:
    """A small frame whose zstd header claims 1 GiB is refused after reading just past its declared
    size (ZstdDecompressor.decompress would trust the header and allocate it all)."""
    bomb = zstandard.ZstdCompressor().compress(bytes(256 * 1024 * 1024))
    frame = envelope_pb2.CompressedFrame(algorithm=types_pb2.COMPRESSION_ZSTD, size=1000, data=bomb)
    with pytest.raises(MalformedMessage):
        decompress_frame(frame, 1 << 20)
    with pytest.raises(InvalidValue):
        decompress_blob_data(bomb, Compression.ZSTD, 1000)
