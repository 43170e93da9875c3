"""The commonest requests read straight from their bytes: a GET, SET or DELETE of one key.

Parsing an ``Envelope`` through the protobuf runtime and walking its nested levels
(``envelope.query.query.get.key.data``) builds a Python object per level and per field; for a
request of a few dozen bytes that is most of its decoding cost.  :func:`keyed_request` reads the
same fields from the frame itself, for frames laid out the way every protobuf serializer writes
this message (fields in number order, each once, nothing else set): the request id, then the
query, which ends the frame.  Anything else (another request, a trace context, a field out of
order or repeated, an unknown field, a varint too long) gives None, and the caller parses the
frame with the runtime as before.  A SET's value, the ``CipherBlob`` message that ends the frame,
is given as the :class:`~amaters.types.CipherBlob` it carries: read from its bytes too
(:func:`blob_fields`) when this module runs compiled, parsed by the runtime when it runs
interpreted, where reading the metadata's varints in Python costs more than the runtime's parse
(a 100-byte value with its metadata: compiled 0.6 µs against the runtime's 1.2, interpreted
2.2).  What it does return is what the runtime reads from the same bytes
(``tests/unit/test_proto_requests.py`` checks it against the runtime on generated messages and on
arbitrary bytes), with one check left to the caller: the collection name is given as bytes, not
checked to be UTF-8 (the runtime refuses a frame whose name is not), so a caller takes only names
it has seen valid.  Nothing here validates the request.

Requests come in runs of one shape: the same collection, keys of one length, values of one size.
Everything of such a frame after its request id is fixed except the key's and the value's bytes:
the tags, every length and the collection name.  A frame read in full leaves its *layout* (those
fixed bytes before the key, the key's length, the fixed bytes between the key and the value),
remembered by the length from the query's tag to the frame's end; the next frame of that length
whose bytes match the layout is read with two comparisons.  A layout is only made from a frame
read in full, and a frame that matches one differs from it only in bytes no check reads (the
request id's, the key's, the value's), so it gives what the full reading gives.

This is the mirror of :mod:`amaters.proto.answers`, which writes the commonest answers directly.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from amaters.compiled import loaded_compiled
from amaters.proto import types_pb2
from amaters.proto.convert import blob_from_proto, compression_for_code
from amaters.types import CipherBlob

__all__ = ["DELETE", "GET", "SET", "KeyedRequest", "blob_fields", "keyed_request"]

#: Query's oneof fields (``get = 1``, ``set = 2``, ``delete = 3``) as their tag bytes: the kind
#: :func:`keyed_request` returns.
GET = 0x0A
SET = 0x12
DELETE = 0x1A

#: ``(request_id, kind, collection as UTF-8 bytes, key, a SET's value or None)``.
KeyedRequest = tuple[int, int, bytes, bytes, "CipherBlob | None"]

#: ``(data, checksum, size, compression code, created_at, version or None)`` of a CipherBlob.
BlobFields = tuple[bytes, int, int, int, int, "int | None"]

#: The tags of the levels that end with the frame, after Envelope.query's (checked first).
_LEVELS = (None, frozenset((0x0A,)), frozenset((GET, SET, DELETE)))
_CipherBlob = types_pb2.CipherBlob
_U64 = 1 << 64
_U32 = 1 << 32
_I64_SIGN = 1 << 63
_I32_LIMIT = 1 << 31
_COPY_BELOW = 64 * 1024
#: Whether this module runs compiled (see amaters/compiled.py).
_COMPILED = loaded_compiled(__file__)

#: ``(head, collection, kind, key offset in the query, key length, tail)`` of frames read in
#: full, by their length from the query's tag to the end: ``head`` runs from that tag to the
#: key's bytes, ``tail`` from the key's end to a SET's value (empty for a GET or DELETE).
Layout = tuple[bytes, bytes, int, int, int, bytes]
_layouts: dict[int, Layout] = {}
#: A run of requests has one or two shapes; past this many, forget them and start again.
_MAX_LAYOUTS = 64
#: Collection names longer than this are not remembered (valid names have at most 128
#: characters): a layout holds its name, and this runs before any rule is checked, so a name of a
#: megabyte would otherwise be kept.
_MAX_REMEMBERED_NAME = 128


def _varint(frame: bytes, i: int) -> tuple[int, int]:
    """The varint at ``i`` and the offset after it; IndexError when the frame ends first,
    ValueError past ten bytes."""
    first = frame[i]
    second = frame[i + 1]
    if first >= 0x80:
        if second < 0x80:  # two bytes: a length of 128 B to 16 KiB
            return (first & 0x7F) | (second << 7), i + 2
        third = frame[i + 2]
        if third < 0x80:  # three: a long-lived connection's request ids, up to two million
            return (first & 0x7F) | ((second & 0x7F) << 7) | (third << 14), i + 3
    value = 0
    shift = 0
    while True:
        b = frame[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def keyed_request(frame: bytes) -> KeyedRequest | None:
    """A GET, SET or DELETE frame's fields, or None: parse the frame with the protobuf runtime.

    The kind is :data:`GET`, :data:`SET` or :data:`DELETE`; a SET's value is its ``CipherBlob``
    message.
    """
    try:
        end = len(frame)
        b = frame[0]
        i = 1
        request_id = 0
        if b == 0x08:  # Envelope.request_id (1), varint
            b = frame[1]
            if b < 0x80:
                request_id = b
                i = 2
            elif frame[2] < 0x80:  # two bytes: ids 128 to 16,383, a connection's first ones
                request_id = (b & 0x7F) | (frame[2] << 7)
                i = 3
            elif frame[3] < 0x80:  # three: ids up to 2,097,151, a long-lived connection's
                request_id = (b & 0x7F) | ((frame[2] & 0x7F) << 7) | (frame[3] << 14)
                i = 4
            else:
                request_id, i = _varint(frame, 1)
                if request_id >= _U64:
                    return None
            b = frame[i]
            i += 1
        if b != 0x1A:  # Envelope.query (3)
            return None
        start = i - 1
        layout = _layouts.get(end - start)
        if layout is not None and frame.startswith(layout[0], start):
            _, collection, kind, key_at, key_length, tail = layout
            key_at += start
            key_end = key_at + key_length
            if kind != SET:
                return request_id, kind, collection, frame[key_at:key_end], None
            if frame.startswith(tail, key_end):
                value = _value(frame, key_end + len(tail), end)
                return request_id, SET, collection, frame[key_at:key_end], value
        # Envelope.query, its QueryRequest.query (1) and the Query's get, set or delete each run
        # to the end of the frame: a tag, then a length that takes two bytes from 128 on (a SET
        # of a 100-byte value), read here rather than by a call.
        kind = b
        for tags in _LEVELS:
            if tags is not None:
                kind = frame[i]
                i += 1
                if kind not in tags:
                    return None
            length = frame[i]
            i += 1
            if length >= 0x80:
                c = frame[i]
                if c < 0x80:
                    length = (length & 0x7F) | (c << 7)
                    i += 1
                else:
                    length, i = _varint(frame, i - 1)
            if i + length != end:
                return None
        if frame[i] != 0x0A:  # the query: collection (1) first
            return None
        length = frame[i + 1]
        i += 2
        if length >= 0x80:
            length, i = _varint(frame, i - 1)
        collection = frame[i : i + length]
        i += length
        if frame[i] != 0x12:  # key (2): Key { data (1) }
            return None
        length = frame[i + 1]
        i += 2
        if length >= 0x80:
            length, i = _varint(frame, i - 1)
        key_end = i + length
        if not length or key_end > end or frame[i] != 0x0A:
            return None
        length = frame[i + 1]
        i += 2
        if length >= 0x80:
            length, i = _varint(frame, i - 1)
        if i + length != key_end:
            return None
        key_at = i
        key = frame[i:key_end]
        if kind != SET:
            if key_end != end:
                return None
            _remember(frame, start, end, collection, kind, key_at, key_end, end)
            return request_id, kind, collection, key, None
        if frame[key_end] != 0x1A:  # SetQuery.value (3): CipherBlob, to the end
            return None
        length = frame[key_end + 1]
        i = key_end + 2
        if length >= 0x80:
            length, i = _varint(frame, i - 1)
        if i + length != end:
            return None
        _remember(frame, start, end, collection, SET, key_at, key_end, i)
        return request_id, SET, collection, key, _value(frame, i, end)
    except (IndexError, ValueError, DecodeError):
        return None


def _value(frame: bytes, i: int, end: int) -> CipherBlob:
    """The CipherBlob in ``frame[i:end]`` (the frame's end).  Raises DecodeError when the runtime
    cannot parse it either."""
    if _COMPILED:
        fields = blob_fields(frame, i, end)
        if fields is not None:
            data, checksum, size, compression, created_at, version = fields
            return CipherBlob(data, checksum, size, compression_for_code(compression), created_at, version)
    message = _CipherBlob()
    # A large value is parsed in place, not copied first.
    message.ParseFromString(frame[i:] if end - i < _COPY_BELOW else memoryview(frame)[i:])
    return blob_from_proto(message)


def blob_fields(buf: bytes, i: int, end: int) -> BlobFields | None:
    """The fields of the ``CipherBlob`` message in ``buf[i:end]`` as the runtime reads them, when
    it is laid out the way serializers write it (``data`` then ``metadata`` ending the message,
    the metadata's fields in number order, each at most once, every value in its type's range);
    None for anything else (a field repeated, out of order or unknown, a value the runtime would
    truncate or wrap), which the runtime then parses."""
    try:
        data = b""
        checksum = size = compression = created_at = 0
        version: int | None = None
        if i < end and buf[i] == 0x0A:  # data (1)
            length = buf[i + 1]
            i += 2
            if length >= 0x80:
                length, i = _varint(buf, i - 1)
            if i + length > end:
                return None
            data = buf[i : i + length]
            i += length
        if i < end and buf[i] == 0x12:  # metadata (2), to the end
            length = buf[i + 1]
            i += 2
            if length >= 0x80:
                length, i = _varint(buf, i - 1)
            if i + length != end:
                return None
            last = 0
            while i < end:
                tag = buf[i]
                field = tag >> 3
                if tag & 7 or field <= last or field > 5:  # varints only, in order, each once
                    return None
                last = field
                value = buf[i + 1]
                i += 2
                if value >= 0x80:
                    value, i = _varint(buf, i - 1)
                if value >= _U64:
                    return None
                if field == 1:  # size, uint64
                    size = value
                elif field == 2:  # compression, an enum (int32)
                    if value >= _I32_LIMIT:
                        return None
                    compression = value
                elif field == 3:  # checksum, uint32
                    if value >= _U32:
                        return None
                    checksum = value
                elif field == 4:  # created_at, int64 (two's complement)
                    created_at = value - _U64 if value >= _I64_SIGN else value
                else:  # version, optional uint32
                    if value >= _U32:
                        return None
                    version = value
        if i != end:
            return None
        return data, checksum, size, compression, created_at, version
    except (IndexError, ValueError):
        return None


def _remember(
    frame: bytes, start: int, end: int, collection: bytes, kind: int, key_at: int, key_end: int, value_at: int
) -> None:
    """Remember the layout of a frame just read in full (see the module's docstring)."""
    if len(collection) > _MAX_REMEMBERED_NAME:
        return
    if len(_layouts) >= _MAX_LAYOUTS:
        _layouts.clear()
    _layouts[end - start] = (
        frame[start:key_at],
        collection,
        kind,
        key_at - start,
        key_end - key_at,
        frame[key_end:value_at],
    )
