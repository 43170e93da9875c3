"""Compression: CipherBlob ``compression`` checked on SET, and optional per-frame compression.

**Blobs.**  A CipherBlob's ``data`` may be compressed by the client (``compression`` = lz4 or
zstd); the server stores and returns it as sent, and the CRC32 in ``metadata.checksum`` covers the
stored (compressed) bytes.  On SET (alone or in a BATCH) the :class:`BlobCompressionStage` checks
that compressed data really decompresses, to exactly ``metadata.size`` bytes: otherwise
``VALIDATION_INVALID_VALUE``; a claimed size over ``limits.max_value_bytes`` is
``VALIDATION_SIZE_EXCEEDED``.  The check streams through the data counting bytes and keeps nothing,
so a decompression bomb costs at most ``metadata.size`` bytes of work and 64 KiB of memory; blobs
over ``compression.pool_threshold_bytes`` are checked in the ``cpu`` thread pool.  Formats: ``lz4``
is one LZ4 *frame* (``lz4.frame``), ``zstd`` one or more concatenated Zstandard frames.

**Frames.**  A client may offer per-frame compression in its handshake (``frame_compression``);
the server picks the first algorithm of its ``compression.frames`` that the client offered and
answers with it and ``frame_compression_threshold``.  From then on either side may send, instead of
a frame at least that large, ``Envelope{compressed: CompressedFrame{algorithm, size, data}}`` whose
data decompresses to the original Envelope; it is used only when it saves at least
:data:`MIN_SAVING` of the bytes.  The receiver refuses a ``size`` over its frame limit.

**Measured** (``scripts/measure-compression``): AES-256-GCM ciphertext does not compress at all
(compressed/original 1.000 from 16 KiB up, 1.01-1.18 below: it grows) whether the plaintext was
JSON (zstd 0.17 on the plaintext), text or random bytes, and neither do TFHE-style LWE ciphertexts
(1.000-1.004: their masks are uniformly random); see ``docs/limits.md``.  Hence per-frame
compression is off by default (``compression.frames = []``), and it is only used when it saves
:data:`MIN_SAVING`.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import lz4.frame
import zstandard
from twisted.internet import defer

from amaters.config import CompressionConfig, Config, LimitsConfig
from amaters.errors import InvalidValue, MalformedMessage, SizeExceeded
from amaters.proto import envelope_pb2
from amaters.query import operations as ops
from amaters.query.pipeline import PipelineStage, RequestContext
from amaters.types import CipherBlob, Compression

#: Output chunk while counting decompressed bytes.
_CHUNK = 64 * 1024

#: Per-frame compression is used only when it saves at least this fraction of a frame.
MIN_SAVING = 0.1

#: Frame algorithms by name, and their wire enum.
FRAME_ALGORITHMS = {"zstd": Compression.ZSTD, "lz4": Compression.LZ4}

#: zstd level for frames: fast (frames are compressed on the reactor thread).
ZSTD_FRAME_LEVEL = 1


class DecompressionError(ValueError):
    """The data is not a valid stream of the named format."""


def decompressed_length(data: bytes, algorithm: Compression, limit: int) -> int:
    """How many bytes ``data`` decompresses to; past ``limit`` it stops counting (within a chunk).

    Memory: one 64 KiB chunk while counting.

    Raises :class:`DecompressionError` for data that is corrupt, truncated or followed by garbage.
    """
    if algorithm == Compression.NONE:
        return len(data)
    total = 0
    try:
        if algorithm == Compression.ZSTD:
            reader = zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(data), read_size=_CHUNK, read_across_frames=True
            )
            with reader:
                while total <= limit:
                    chunk = reader.read(_CHUNK)
                    if not chunk:
                        break
                    total += len(chunk)
            if total <= limit and not _zstd_complete(data):
                raise DecompressionError("the zstd data is truncated")
            return total
        if algorithm == Compression.LZ4:
            decompressor = lz4.frame.LZ4FrameDecompressor()
            chunk = decompressor.decompress(data, max_length=_CHUNK)
            total = len(chunk)
            while total <= limit and not decompressor.eof and not decompressor.needs_input:
                chunk = decompressor.decompress(b"", max_length=_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
            if total <= limit and (not decompressor.eof or decompressor.unused_data):
                raise DecompressionError("the lz4 frame is truncated or followed by other data")
            return total
    except DecompressionError:
        raise
    except Exception as e:  # zstandard.ZstdError, RuntimeError from lz4: corrupt data
        raise DecompressionError(str(e)) from None
    raise DecompressionError(f"unknown compression type {int(algorithm)}")


def _zstd_complete(data: bytes) -> bool:
    """Whether ``data`` is whole zstd frames with nothing after them.

    The counting pass stops quietly at the end of truncated input, so this second pass runs (only
    once that pass found the expected size, which bounds its memory) to tell truncated data apart.
    """
    rest = data
    while rest:
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        decompressor.decompress(rest)
        if not decompressor.eof:
            return False
        rest = decompressor.unused_data
    return True


def _read_at_most(data: bytes, limit: int) -> bytes:
    """Up to ``limit`` bytes of zstd ``data`` decompressed (memory: about ``limit``)."""
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    parts: list[bytes] = []
    got = 0
    with reader:
        while got < limit:
            chunk = reader.read(min(_CHUNK, limit - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    return b"".join(parts)


def check_blob(blob: CipherBlob, max_value_bytes: int) -> None:
    """Raise unless a compressed ``blob`` decompresses to exactly ``blob.size`` bytes."""
    algorithm = blob.compression
    if algorithm == Compression.NONE:
        return
    if blob.size > max_value_bytes:
        raise SizeExceeded(
            f"the value's uncompressed size (metadata.size) is {blob.size} bytes; the limit is"
            f" {max_value_bytes}"
        )
    name = "lz4" if algorithm == Compression.LZ4 else "zstd"
    try:
        length = decompressed_length(blob.data, algorithm, blob.size)
    except DecompressionError:
        raise InvalidValue(f"the value is marked {name}-compressed but is not valid {name} data") from None
    if length != blob.size:
        shown = f"more than {blob.size}" if length > blob.size else str(length)
        raise InvalidValue(
            f"the value is {name}-compressed to {shown} bytes, but metadata.size says {blob.size}"
        )


def _compressed_blobs(op: Any) -> list[CipherBlob]:
    kind = type(op)
    if kind is ops.Set:
        value: CipherBlob = op.value
        return [value] if value.compression != Compression.NONE else []
    if kind is ops.Batch:
        return [
            item.value
            for item in op.ops
            if type(item) is ops.Set and item.value.compression != Compression.NONE
        ]
    return []


def compress_blob_data(data: bytes, algorithm: Compression) -> bytes:
    """``data`` compressed as a CipherBlob of that ``compression`` stores it."""
    if algorithm == Compression.ZSTD:
        return bytes(zstandard.ZstdCompressor(level=3).compress(data))
    if algorithm == Compression.LZ4:
        return bytes(lz4.frame.compress(data))
    return data


def decompress_blob_data(data: bytes, algorithm: Compression, size: int) -> bytes:
    """A CipherBlob's data decompressed; InvalidValue unless it is exactly ``size`` bytes."""
    if algorithm == Compression.NONE:
        return data
    name = "lz4" if algorithm == Compression.LZ4 else "zstd"
    try:
        if algorithm == Compression.ZSTD:
            out = _read_at_most(data, size + 1)
            if len(out) == size and not _zstd_complete(data):
                raise InvalidValue("the value's zstd data is truncated")
        elif algorithm == Compression.LZ4:
            decompressor = lz4.frame.LZ4FrameDecompressor()
            out = decompressor.decompress(data, max_length=size + 1)
            if len(out) == size and (not decompressor.eof or decompressor.unused_data):
                raise InvalidValue("the value's lz4 frame is truncated or followed by other data")
        else:
            raise InvalidValue(f"unknown compression type {int(algorithm)}")
    except (zstandard.ZstdError, RuntimeError):
        raise InvalidValue(f"the value is marked {name}-compressed but is not valid {name} data") from None
    if len(out) != size:
        raise InvalidValue(f"the value decompressed to {len(out)} bytes, but metadata.size says {size}")
    return bytes(out)


class BlobCompressionStage(PipelineStage):
    """Checks compressed CipherBlobs on SET; large ones in ``pool`` (anything with ``run``)."""

    name = "compression"

    def __init__(self, config: CompressionConfig, limits: LimitsConfig, pool: Any) -> None:
        self.config = config
        self.limits = limits
        self.pool = pool

    def before_many(self, items: list[tuple[RequestContext, Any]]) -> object:
        """Nothing to check unless a SET of the read carries a compressed value; then
        :meth:`before` for each (a large one is checked in the pool)."""
        for _, op in items:
            if type(op) is ops.Set and op.value.compression:
                return NotImplemented
        return None

    def before(self, ctx: RequestContext, op: Any) -> object:
        kind = type(op)
        if kind is ops.Set:
            if not op.value.compression:  # COMPRESSION_NONE: nothing to check
                return None
        elif kind is not ops.Batch:
            return None
        config = self.config
        if not config.verify_blobs:
            return None
        blobs = _compressed_blobs(op)
        if not blobs:
            return None
        limit = self.limits.max_value_bytes
        small = [b for b in blobs if len(b.data) <= config.pool_threshold_bytes]
        large = [b for b in blobs if len(b.data) > config.pool_threshold_bytes]
        for blob in small:
            check_blob(blob, limit)
        if not large:
            return None

        def check_all() -> None:
            for blob in large:
                check_blob(blob, limit)

        d: defer.Deferred[None] = self.pool.run(check_all)
        return d

    def prepare_reload(self, old: Config, new: Config) -> Callable[[], None] | None:
        if new.compression == self.config and new.limits == self.limits:
            return None
        compression, limits = new.compression, new.limits

        def commit() -> None:
            self.config = compression
            self.limits = limits

        return commit


# -- per-frame compression -----------------------------------------------------------------------


def compress_frame(payload: bytes, algorithm: str) -> bytes | None:
    """The serialized ``Envelope{compressed}`` for ``payload``, or None if it saves too little."""
    if algorithm == "zstd":
        data = zstandard.ZstdCompressor(level=ZSTD_FRAME_LEVEL).compress(payload)
    elif algorithm == "lz4":
        data = lz4.frame.compress(payload)
    else:
        raise ValueError(f"unknown frame compression {algorithm!r}")
    if len(data) > len(payload) * (1.0 - MIN_SAVING):
        return None
    envelope = envelope_pb2.Envelope(
        compressed=envelope_pb2.CompressedFrame(
            algorithm=int(FRAME_ALGORITHMS[algorithm]),  # type: ignore[arg-type]
            size=len(payload),
            data=data,
        )
    )
    return envelope.SerializeToString()


def decompress_frame(frame: envelope_pb2.CompressedFrame, limit: int) -> bytes:
    """The inner Envelope's bytes; raises MalformedMessage (or SizeExceeded over ``limit``)."""
    size = frame.size
    if size > limit:
        raise SizeExceeded(f"a compressed frame of {size} bytes exceeds the frame limit of {limit}")
    algorithm = int(frame.algorithm)
    try:
        if algorithm == Compression.ZSTD:
            # Not ZstdDecompressor.decompress: it trusts the content size in the frame header over
            # max_output_size, so a small frame could make it allocate gigabytes.
            payload = _read_at_most(frame.data, size + 1)
            if len(payload) == size and not _zstd_complete(frame.data):
                raise MalformedMessage("a compressed frame's zstd data is truncated")
        elif algorithm == Compression.LZ4:
            decompressor = lz4.frame.LZ4FrameDecompressor()
            payload = decompressor.decompress(frame.data, max_length=size + 1)
            if not decompressor.eof:
                raise MalformedMessage("a compressed frame's lz4 data is truncated")
        else:
            raise MalformedMessage(f"unknown frame compression {algorithm}")
    except (zstandard.ZstdError, RuntimeError):
        raise MalformedMessage("a compressed frame does not decompress") from None
    if len(payload) != size:
        raise MalformedMessage(
            f"a compressed frame decompressed to {len(payload)} bytes, not the {size} it declared"
        )
    return bytes(payload)


class FrameCompressionPolicy:
    """Which per-frame compression the server accepts (``compression.frames``) and from what size."""

    def __init__(self, config: CompressionConfig) -> None:
        self.config = config

    def negotiate(self, offered: list[str]) -> str:
        """The server's first allowed algorithm the client offered, or "" for none."""
        for name in self.config.frames:
            if name in offered:
                return name
        return ""

    @property
    def threshold(self) -> int:
        return self.config.frame_threshold_bytes

    def prepare_reload(self, old: Config, new: Config) -> Callable[[], None] | None:
        if new.compression == self.config:
            return None
        settings = new.compression

        def commit() -> None:
            self.config = settings  # new connections negotiate with it; open ones keep theirs

        return commit


__all__ = [
    "FRAME_ALGORITHMS",
    "MIN_SAVING",
    "BlobCompressionStage",
    "DecompressionError",
    "FrameCompressionPolicy",
    "check_blob",
    "compress_blob_data",
    "compress_frame",
    "decompress_blob_data",
    "decompress_frame",
    "decompressed_length",
]
