"""Conversions between the protobuf messages and amaters' own types (no validation here).

Validation of what a client sent lives in :mod:`amaters.query.validation`; this module only moves
fields, so the native protocol, the client and a later gRPC adapter share one mapping.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from amaters.errors import AmatersError, error_for_code
from amaters.proto import errors_pb2, query_pb2, types_pb2
from amaters.types import CipherBlob, Compression

Version = tuple[int, int, int]

__all__ = [
    "Version",
    "blob_from_proto",
    "blob_to_proto",
    "error_from_proto",
    "error_to_proto",
    "fill_blob",
    "fill_key_values",
    "fill_result",
    "version_from_proto",
    "version_to_proto",
]


def version_to_proto(version: Version) -> types_pb2.Version:
    return types_pb2.Version(major=version[0], minor=version[1], patch=version[2])


def version_from_proto(message: types_pb2.Version) -> Version:
    return (message.major, message.minor, message.patch)


def fill_blob(out: types_pb2.CipherBlob, blob: CipherBlob) -> None:
    """Write ``blob`` into the (empty) message ``out`` in place.

    Filling nested messages in place is about three times cheaper than building each level with
    keyword arguments (which copies every level again); this is on every read's path.
    """
    out.data = blob.data
    metadata = out.metadata
    metadata.size = blob.size
    if blob.compression:
        metadata.compression = int(blob.compression)  # type: ignore[assignment]
    metadata.checksum = blob.checksum
    if blob.created_at:
        metadata.created_at = blob.created_at
    if blob.version is not None:
        metadata.version = blob.version


def blob_to_proto(blob: CipherBlob) -> types_pb2.CipherBlob:
    """The wire form of a stored value."""
    message = types_pb2.CipherBlob()
    fill_blob(message, blob)
    return message


_COMPRESSION_BY_CODE: dict[int, Compression] = {int(member): member for member in Compression}


def compression_for_code(code: int) -> Compression:
    """The Compression a wire code names; an unknown code reads as NONE.  A dict lookup, not
    ``Compression(code)``: the enum's constructor is slow, and this runs for every value received."""
    return _COMPRESSION_BY_CODE.get(code, Compression.NONE)


def blob_from_proto(message: types_pb2.CipherBlob) -> CipherBlob:
    """The CipherBlob a message carries, exactly as sent (the checksum is not checked here)."""
    metadata = message.metadata
    compression = compression_for_code(metadata.compression)
    # Positional (data, checksum, size, compression, created_at, version): a third cheaper than
    # keywords for the frozen class, and this runs for every value received.
    return CipherBlob(
        message.data,
        metadata.checksum,
        metadata.size,
        compression,
        metadata.created_at,
        metadata.version if metadata.HasField("version") else None,
    )


def fill_key_values(out: Any, pairs: Iterable[tuple[Any, ...]]) -> None:
    """Append ``(key, blob)`` pairs to a repeated ``KeyValue`` field in place; a FILTER's rows are
    ``(key, blob, encrypted boolean)`` triples and carry ``encrypted_predicate_result`` too."""
    add = out.add
    for row in pairs:
        item = add()
        item.key.data = row[0]
        fill_blob(item.value, row[1])
        if len(row) > 2:
            item.encrypted_predicate_result = row[2]


def error_to_proto(error: AmatersError) -> errors_pb2.ErrorResponse:
    """The ErrorResponse for an exception (its message must already be safe to show)."""
    message = errors_pb2.ErrorResponse(
        code=int(error.code),  # type: ignore[arg-type]
        message=error.message,
        category=int(error.category),  # type: ignore[arg-type]
    )
    if error.details:
        message.details = error.details
    if error.retry_after_ms is not None:
        # Upstream's field is in whole seconds: round up so a client never retries too early.  The
        # exact milliseconds go in amaters' own retry_after_ms field (ignored by upstream clients).
        message.retry_after = (error.retry_after_ms + 999) // 1000
        message.retry_after_ms = error.retry_after_ms
    return message


def _retry_after_ms(message: errors_pb2.ErrorResponse) -> int | None:
    """The retry hint in milliseconds: amaters' exact field, else upstream's seconds."""
    if message.HasField("retry_after_ms"):
        return message.retry_after_ms
    if message.HasField("retry_after"):
        return message.retry_after * 1000
    return None


def error_from_proto(message: errors_pb2.ErrorResponse) -> AmatersError:
    """The exception an ErrorResponse stands for, as the most specific class for its code."""
    return error_for_code(
        int(message.code),
        message.message,
        category=int(message.category),
        retry_after_ms=_retry_after_ms(message),
        details=message.details if message.HasField("details") else None,
    )


def fill_result(out: query_pb2.QueryResult, op_name: str, result: Any) -> None:
    """Write an operation's result into the (empty) QueryResult ``out``."""
    if op_name == "get":
        if result is None:
            out.single.SetInParent()
        else:
            fill_blob(out.single.value, result)
    elif op_name == "set":
        out.success.affected_rows = 1
    elif op_name == "delete":
        out.success.affected_rows = 1 if result else 0
    elif op_name == "range":
        out.multi.SetInParent()
        fill_key_values(out.multi.values, result)
    elif op_name == "filter":
        out.multi.SetInParent()
        values = out.multi.values
        for key, blob, flag in result:
            kv = values.add()
            kv.key.data = key
            fill_blob(kv.value, blob)
            kv.encrypted_predicate_result = flag
    elif op_name == "update":
        out.success.affected_rows = result
    else:
        raise ValueError(f"{op_name} has no QueryResult form")
