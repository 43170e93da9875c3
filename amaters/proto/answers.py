"""The commonest answers encoded straight to bytes: a successful SET, and a query answer whose
``QueryResponse`` is already serialized (a GET served from the query cache).

Building an ``Envelope`` with its nested levels and serializing it costs about twice as much as
writing the few bytes directly; a GET answer carrying a value costs about 1.4 µs through the
protobuf runtime, so the query cache keeps the serialized ``QueryResponse`` of each entry whose
value is small (:func:`query_response`) and a hit is answered by :func:`query_answer`, a few byte
concatenations.
The output is byte for byte what ``Envelope.SerializeToString()`` gives for the same message
(``tests/unit/test_proto_answers.py`` checks it against the protobuf runtime), so a client cannot
tell the difference.
"""

from __future__ import annotations

from typing import Any

from amaters.proto import aql_pb2
from amaters.proto.convert import fill_result

__all__ = ["query_answer", "query_response", "set_answer"]

_MASK64 = (1 << 64) - 1
_SMALL = [bytes((value,)) for value in range(0x80)]


def _varint(value: int) -> bytes:
    """A protobuf varint of an unsigned 64-bit value."""
    if value < 0x80:
        return _SMALL[value]
    if value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    if value < 0x200000:
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
    value &= _MASK64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: Envelope.query_response (field 21, length-delimited): tag bytes.  Also named in
#: ``tests/unit/test_proto_answers.py``, which checks it against the descriptor.
_QUERY_RESPONSE = _varint((21 << 3) | 2)
#: Envelope.request_id is field 1, varint.
_REQUEST_ID = b"\x08"

#: ``query_response { result { success { affected_rows: 1 } } }`` after the request id.
_SET_OK = _QUERY_RESPONSE + _varint(6) + b"\x0a\x04\x1a\x02\x08\x01"


#: Envelope.request_id encoded, for the ids below 0x4000 seen so far (at most 16,384 short bytes).
_REQUEST_IDS: dict[int, bytes] = {0: b""}


def _request_id(request_id: int) -> bytes:
    """Envelope.request_id as serialized (nothing for 0, the default)."""
    encoded = _REQUEST_IDS.get(request_id)
    if encoded is not None:
        return encoded
    if 0x4000 <= request_id < 0x200000:
        # A long-lived connection's ids soon pass the remembered ones: _varint's three-byte case.
        return bytes((0x08, (request_id & 0x7F) | 0x80, ((request_id >> 7) & 0x7F) | 0x80, request_id >> 14))
    encoded = _REQUEST_ID + _varint(request_id)
    if request_id < 0x4000:
        _REQUEST_IDS[request_id] = encoded
    return encoded


def set_answer(request_id: int) -> bytes:
    """The serialized Envelope answering a successful SET (one row affected)."""
    return _request_id(request_id) + _SET_OK


def query_response(op_name: str, result: Any) -> bytes:
    """The serialized ``QueryResponse`` carrying ``result`` of an ``op_name`` query."""
    response = aql_pb2.QueryResponse()
    fill_result(response.result, op_name, result)
    return response.SerializeToString()


def query_answer(request_id: int, response: bytes) -> bytes:
    """The serialized Envelope answering ``request_id`` with a serialized ``QueryResponse``."""
    return _request_id(request_id) + _QUERY_RESPONSE + _varint(len(response)) + response
